"""Throughput and peak RSS of `semcomp compress` on synthetic fp32 shards (page cache).

    python benchmarks/bench_compress.py [--sizes-gb 1 10] [--dim 512] [--engines local ray]

For each input size: writes M=2 modality folders of fp32 .npy shards into /tmp, reads them
once (page cache), runs pair centroids + RFS (drop 0.5) in a fresh child process and records
wall time of the compress() call and the child's peak RSS (wait4). Also times the concept
path (many ids). Writes benchmarks/results/compress_cpu.json and deletes the data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

try:
    from .common import environment, write_result
except ImportError:  # run as a script
    from common import environment, write_result

ROWS_PER_SHARD = 65536


def make_input(root: str, gb: float, dim: int, concepts: bool) -> int:
    """Two modalities; the shard contents repeat one random block (content does not matter
    for throughput, only that it is finite)."""
    shard_bytes = ROWS_PER_SHARD * dim * 4
    n_shards = max(1, round(gb * 1e9 / (2 * shard_bytes)))
    block = np.random.default_rng(0).standard_normal((ROWS_PER_SHARD, dim), dtype=np.float32)
    for mod in ("img_emb", "text_emb"):
        os.makedirs(os.path.join(root, mod), exist_ok=True)
        for i in range(n_shards):
            np.save(os.path.join(root, mod, f"{mod}_{i:04d}.npy"), block)
    if concepts:
        os.makedirs(os.path.join(root, "concepts"), exist_ok=True)
        rng = np.random.default_rng(1)
        n_ids = n_shards * ROWS_PER_SHARD // 4  # many concepts: ~4 rows each
        for i in range(n_shards):
            np.save(os.path.join(root, "concepts", f"c_{i:04d}.npy"), rng.integers(0, n_ids, ROWS_PER_SHARD))
    return n_shards


def warm(root: str) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                while b := fh.read(1 << 24):
                    total += len(b)
    return total


def worker(args) -> None:
    import torch

    from semcomp_ext.compress import CompressOptions, compress

    if args.engine == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ins = [os.path.join(args.root, "img_emb"), os.path.join(args.root, "text_emb")]
    opts = CompressOptions(inputs=ins, out=args.out, drop_rate=0.5, engine=args.engine, quiet=True,
                           concepts=os.path.join(args.root, "concepts") if args.concept else None)
    t = time.perf_counter()
    compress(opts)
    dt = time.perf_counter() - t
    print(json.dumps({"seconds": dt, "threads": torch.get_num_threads()}))


def run_child(root: str, out: str, engine: str, concept: bool) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, __file__, "--worker", "--root", root, "--out", out, "--engine", engine]
    if concept:
        cmd.append("--concept")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    if status != 0:
        raise RuntimeError(f"worker failed: {cmd}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["peak_rss_mb"] = ru.ru_maxrss / 1024  # KiB on Linux; Ray workers are not children-of-wait4
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--root"), ap.add_argument("--out"), ap.add_argument("--engine", default="local")
    ap.add_argument("--concept", action="store_true")
    ap.add_argument("--sizes-gb", type=float, nargs="+", default=[1.0, 10.0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--engines", nargs="+", default=["local", "ray"])
    ap.add_argument("--concept-gb", type=float, default=1.0)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "compress_cpu.json"))
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    results = []
    tmp = tempfile.mkdtemp(prefix="semcomp-bench-", dir="/tmp")
    try:
        for gb in args.sizes_gb:
            root = os.path.join(tmp, f"in{gb:g}")
            make_input(root, gb, args.dim, concepts=False)
            nbytes = warm(root)
            for engine in args.engines if gb == min(args.sizes_gb) else ["local"]:
                r = run_child(root, os.path.join(tmp, "out"), engine, False)
                r.update(mode="pairs", engine=engine, input_gb=nbytes / 1e9, gb_per_s=nbytes / 1e9 / r["seconds"])
                print(json.dumps(r), flush=True)
                results.append(r)
            shutil.rmtree(root)
        root = os.path.join(tmp, "concept")
        make_input(root, args.concept_gb, args.dim, concepts=True)
        nbytes = warm(os.path.join(root, "img_emb")) + warm(os.path.join(root, "text_emb"))
        warm(os.path.join(root, "concepts"))
        r = run_child(root, os.path.join(tmp, "out"), "local", True)
        r.update(mode="concepts", engine="local", input_gb=nbytes / 1e9, gb_per_s=nbytes / 1e9 / r["seconds"])
        print(json.dumps(r), flush=True)
        results.append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    pairs_local = {round(r["input_gb"]): r["peak_rss_mb"] for r in results if r["mode"] == "pairs" and r["engine"] == "local"}
    doc = {
        "env": environment(),
        "dim": args.dim, "modalities": 2, "drop_rate": 0.5, "in_dtype": "float32", "rows_per_shard": ROWS_PER_SHARD,
        "load_average_at_end": os.getloadavg(), "results": results, "peak_rss_mb_by_input_gb_local": pairs_local,
    }
    write_result(args.json, doc)
    print(json.dumps(doc["peak_rss_mb_by_input_gb_local"]))


if __name__ == "__main__":
    main()
