"""Markdown tables from benchmarks/results/*.json (pasted into the README's Performance part)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def tables() -> str:
    out = []
    for path in sorted(RESULTS.glob("infonce_*.json")):
        res = json.loads(path.read_text())
        env = res["env"]
        out.append(f"**InfoNCE forward+backward** — {env.get('device_name', env['machine'])}, torch {env['torch']}, "
                   f"commit {env['git_commit']}, {env['date'][:10]} (`{path.name}`)\n")
        out.append("| N | D | dtype | method | median ms | TFLOP/s (8N²D) | extra memory MiB | time vs open_clip | memory vs open_clip |")
        out.append("|---:|---:|---|---|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            out.append(f"| {r['n']} | {r['d']} | {r['dtype']} | {r['method']} | {r['median_s'] * 1e3:.1f} | {r['tflops']:.3f} | "
                       f"{r['extra_bytes'] / 2**20:.1f} | {r.get('time_vs_open_clip', float('nan')):.2f} | "
                       f"{r.get('extra_mem_vs_open_clip', float('nan')):.4f} |")
        out.append("")
    for path in sorted(RESULTS.glob("segment_gather_*.json")):
        res = json.loads(path.read_text())
        env = res["env"]
        out.append(f"**Segment mean and column gather** — {env.get('device_name', env['machine'])}, copy bandwidth "
                   f"{res['copy_bandwidth_gb_per_s']:.1f} GB/s (`{path.name}`)\n")
        out.append("| op | shape | groups / keep | method | median ms | GB/s | of copy bw |")
        out.append("|---|---|---:|---|---:|---:|---:|")
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
