"""Markdown tables from the result files of the benchmark scripts (benchmarks/results/
infonce_*.json and segment_gather_*.json), for the README's Performance part. No torch."""

from __future__ import annotations

import json
from pathlib import Path


def _results(folder: Path, pattern: str):
    for path in sorted(Path(folder).glob(pattern)):
        yield path, json.loads(path.read_text())


def _header(out: list, title: str, detail: str, path: Path, res: dict, columns: list, align: str) -> None:
    env = res["env"]
    out.append(f"**{title}** — {env.get('device_name', env['machine'])}, {detail}, commit {env['git_commit']}, "
               f"{env['date'][:10]} (`{path.name}`)\n")
    out.append("| " + " | ".join(columns) + " |")
    out.append(align)


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def tables(folder) -> str:
    """Every InfoNCE and segment/gather result file in `folder` as markdown tables."""
    out = []
    nan = float("nan")
    for path, res in _results(folder, "infonce_*.json"):
        _header(out, "InfoNCE forward+backward", f"torch {res['env']['torch']}", path, res,
                ["N", "D", "dtype", "method", "median ms", "TFLOP/s (8N²D)", "extra memory MiB",
                 "time vs open_clip", "memory vs open_clip"], "|---:|---:|---|---|---:|---:|---:|---:|---:|")
        for r in res["rows"]:
            if "error" in r:
                out.append(f"| {r['n']} | {r['d']} | {r['dtype']} | {r['method']} | error: {r['error'][:60]} | | | | |")
                continue
            extra = r.get("extra_bytes")
            out.append(f"| {r['n']} | {r['d']} | {r['dtype']} | {r['method']} | {r['median_s'] * 1e3:.1f} | {r['tflops']:.3f} | "
                       f"{_f(None if extra is None else extra / 2**20, '.1f')} | {r.get('time_vs_open_clip', nan):.2f} | "
                       f"{r.get('extra_mem_vs_open_clip', nan):.4f} |")
        out.append("")
    for path, res in _results(folder, "segment_gather_*.json"):
        _header(out, "Segment mean and column gather", f"copy bandwidth {res['copy_bandwidth_gb_per_s']:.1f} GB/s",
                path, res, ["op", "shape", "groups / keep", "method", "median ms", "GB/s", "of copy bw"],
                "|---|---|---:|---|---:|---:|---:|")
        for r in res["rows"]:
            gk = r.get("groups", r.get("keep"))
            if "error" in r:
                out.append(f"| {r['op']} | {r['n']}×{r['d']} | {gk} | {r['method']} | error: {r['error'][:60]} | | |")
                continue
            out.append(f"| {r['op']} | {r['n']}×{r['d']} | {gk} | {r['method']} | {r['median_s'] * 1e3:.1f} | "
                       f"{r['gb_per_s']:.2f} | {r['fraction_of_copy_bw']:.0%} |")
        out.append("")
    return "\n".join(out)
