"""Markdown tables from benchmarks/results/*.json (pasted into the README's Performance part);
the rendering is `semcomp_ext.bench.report.tables`."""

from __future__ import annotations

import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def tables() -> str:
    from semcomp_ext.bench.report import tables as render

    return render(RESULTS)


def main(argv=None) -> int:
    sys.stdout.write(tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
