"""`semcomp index` on 2 cores: wall time, peak RSS and recall@10 against exact search at the
default nprobe, for 200k x 384 fp32 and 1M x 768 fp16 clustered synthetic collections.

    python -m benchmarks.bench_index [--cases 200000x384xfloat32 1000000x768xfloat16] [--queries 1000]

The implementation (data, compressed folder, the CLI job in a child, recall) is
semcomp_ext.bench.index; this script parses options and writes
benchmarks/results/index_cpu.json (`-o PATH` elsewhere).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from semcomp_ext.bench.index import run_index_benchmark
from semcomp_ext.bench.results import write_json
from semcomp_ext.bench.timing import environment

RESULTS = Path(__file__).resolve().parent / "results"


def _case(text: str) -> tuple:
    try:
        n, dim, dtype = text.split("x")
        if dtype not in ("float32", "float16"):
            raise ValueError(dtype)
        return int(n), int(dim), dtype
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cases: expected ROWSxDIMxfloat32|float16, got {text!r}") from None


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", type=_case, default=[(200_000, 384, "float32"), (1_000_000, 768, "float16")])
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--rows-per-cluster", type=int, default=10)
    ap.add_argument("--spread", type=float, default=1.0, help="noise norm around each cluster centre")
    ap.add_argument("--latent", type=int, default=32, help="centres from a latent space of this dim (0: uniform)")
    ap.add_argument("--tmp", default=tempfile.gettempdir(), help="where the data and folders are written")
    ap.add_argument("-o", "--out", default=str(RESULTS / "index_cpu.json"))
    args = ap.parse_args(argv)
    env = environment("cpu")
    work = tempfile.mkdtemp(prefix="semcomp-bench-index-", dir=args.tmp)
    try:
        payload = run_index_benchmark(args.cases, work=work, queries=args.queries,
                                      rows_per_cluster=args.rows_per_cluster, spread=args.spread,
                                      latent=args.latent or None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    env["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(write_json({"environment": env, **payload}, Path(args.out)))


if __name__ == "__main__":
    main()
