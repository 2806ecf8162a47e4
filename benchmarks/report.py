"""Markdown tables from benchmarks/results/*.json (pasted into the README's Performance part)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _results(pattern: str):
    for path in sorted(RESULTS.glob(pattern)):
        yield path, json.loads(path.read_text())


def _header(out: list, title: str, detail: str, path: Path, res: dict, columns: list, align: str) -> None:
    env = res["env"]
    out.append(f"**{title}** — {env.get('device_name', env['machine'])}, {detail}, commit {env['git_commit']}, "
               f"{env['date'][:10]} (`{path.name}`)\n")
    out.append("| " + " | ".join(columns) + " |")
    out.append(align)


def tables() -> str:
    out = []
    for path, res in _results("infonce_*.json"):
        _header(out, "InfoNCE forward+backward", f"torch {res['env']['torch']}", path, res,
                ["N", "D", "dtype", "method", "median ms", "TFLOP/s (8N²D)", "extra memory MiB",
                 "time vs open_clip", "memory vs open_clip"], "|---:|---:|---|---|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            out.append(f"| {r['n']} | {r['d']} | {r['dtype']} | {r['method']} | {r['median_s'] * 1e3:.1f} | {r['tflops']:.3f} | "
                       f"{r['extra_bytes'] / 2**20:.1f} | {r.get('time_vs_open_clip', float('nan')):.2f} | "
                       f"{r.get('extra_mem_vs_open_clip', float('nan')):.4f} |")
        out.append("")
    for path, res in _results("segment_gather_*.json"):
        _header(out, "Segment mean and column gather", f"copy bandwidth {res['copy_bandwidth_gb_per_s']:.1f} GB/s",
                path, res, ["op", "shape", "groups / keep", "method", "median ms", "GB/s", "of copy bw"],
                "|---|---|---:|---|---:|---:|---:|")
        for r in res["rows"]:
            gk = r.get("groups", r.get("keep"))
            out.append(f"| {r['op']} | {r['n']}×{r['d']} | {gk} | {r['method']} | {r['median_s'] * 1e3:.1f} | "
                       f"{r['gb_per_s']:.2f} | {r['fraction_of_copy_bw']:.0%} |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    sys.stdout.write(tables())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
