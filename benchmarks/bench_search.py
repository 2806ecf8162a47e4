"""Recall of `semcomp search` over compressed vectors against exact search on the uncompressed
centroids (numpy, full D), for RFS drop rates 0.5 and 0.9.

    python -m benchmarks.bench_search [--rows 20000] [--queries 1000] [--index flat auto]
                                      [--reproduce-dir DIR] [--skip-reproduce]

Data: (1) synthetic embeddings shaped like CLIP ViT-B/32's (D = 512, unit rows, two modalities
with a modality gap, low-rank signal); the database is the pair centroids of `--rows`
concepts, the queries the image embeddings of `--queries` held-out concepts. (2) unless
--skip-reproduce: image/text embeddings of the encoders that `semcomp reproduce --quick`
trains (tau = 0.07; trained in DIR/tau_0.07, reused when there, ~1 minute on 2 cores):
database = centroids of the training pairs, queries = test images.

Each set is compressed with `--normalize output` (cosine search), indexed (`--index flat`:
exact inner product over the compressed vectors, i.e. the loss of compression alone;
`--index auto`: `semcomp index`'s own choice) and searched. Ground truth: top-k cosine of the
queries against the normalised full-D centroids. Reports 10-recall@10 and 1-recall@10, index
build and search time. The implementation is semcomp_ext.bench.index (run_search_benchmark);
writes benchmarks/results/search_cpu.json (`-o PATH` elsewhere).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from semcomp_ext.bench.index import run_search_benchmark
from semcomp_ext.bench.results import write_json
from semcomp_ext.bench.timing import environment

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--index", nargs="+", default=["flat"], choices=["flat", "auto"])
    ap.add_argument("--reproduce-dir", help="where the --quick encoder pair is trained (default: a temp folder)")
    ap.add_argument("--skip-reproduce", action="store_true")
    ap.add_argument("-o", "--out", default=str(RESULTS / "search_cpu.json"))
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_search_")
    try:
        payload = run_search_benchmark(work=work, rows=args.rows, queries=args.queries, indexes=args.index,
                                       reproduce_dir=args.reproduce_dir, skip_reproduce=args.skip_reproduce)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write_json({"environment": environment("cpu"), **payload}, Path(args.out)))


if __name__ == "__main__":
    main()
