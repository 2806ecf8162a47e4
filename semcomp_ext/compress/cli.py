"""`semcomp compress | verify | gap | eval` subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from .readers import DEFAULT_BATCH_ROWS


def _compress(args) -> int:
    from .api import CompressOptions, compress

    opts = CompressOptions(
        inputs=args.inputs, out=args.out, metadata=args.metadata, concepts=args.concepts,
        concept_column=args.concept_column, embedding_column=args.embedding_column,
        drop_rate=args.drop_rate, keep=args.keep, seed=args.seed, normalize=args.normalize,
        out_dtype=args.out_dtype, codec=args.codec, codec_sample_rows=args.codec_sample_rows,
        batch_size=args.batch_size, partitions=args.partitions,
        skip_invalid=args.skip_invalid, engine=args.engine, ray_address=args.ray_address,
        resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, workers=args.workers,
    )
    try:
        m = compress(opts)
    except (ImportError, OSError) as exc:
        if isinstance(exc, (FileNotFoundError, FileExistsError)):
            raise
        print(f"semcomp compress: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(json.dumps({k: m[k] for k in ("status", "num_shards", "rows_in", "rows_out", "invalid_rows_skipped")}))
    return 0


def _verify(args) -> int:
    from .manifest import verify

    problems = verify(args.dir)
    for p in problems:
        print(f"semcomp verify: {p}", file=sys.stderr)
    if not problems and not args.quiet:
        print(f"{args.dir}: ok")
    return 1 if problems else 0


def _gap(args) -> int:
    from .analysis import gap_report

    print(json.dumps(gap_report(args.inputs, batch_size=args.batch_size, column=args.embedding_column,
                                quiet=args.quiet), indent=1))
    return 0


def _eval(args) -> int:
    from .analysis import eval_report

    print(json.dumps(eval_report(args.inputs, args.compressed, args.labels, label_column=args.label_column,
                                 test_fraction=args.test_fraction, max_rows=args.max_rows, k=args.k,
                                 seed=args.seed, column=args.embedding_column), indent=1))
    return 0


def _index(args) -> int:
    from .index import build_index

    try:
        info = build_index(args.dir, index_factory=args.index_factory, nprobe=args.nprobe, seed=args.seed, quiet=args.quiet)
    except ImportError as exc:
        print(f"semcomp index: error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(json.dumps({k: info[k] for k in ("factory", "ntotal", "dim", "nprobe", "train_rows", "build_seconds")}))
    return 0


def _search(args) -> int:
    import numpy as np

    from .index import format_table, search

    try:
        queries = np.load(args.query, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--query: cannot read {args.query!r} as a .npy array: {exc}") from exc
    try:
        res = search(args.dir, queries, args.k, nprobe=args.nprobe, exact=args.exact)
    except ImportError as exc:
        print(f"semcomp search: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res.to_records(), default=str) if args.json else format_table(res))
    return 0


def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s!r}")
    return n


def register(sub) -> None:
    c = sub.add_parser("compress", help="pair/concept centroids + random feature selection over embedding shards")
    c.add_argument("inputs", nargs="+", help="a clip-retrieval root (with *_emb folders) or >= 2 modality folders")
    c.add_argument("-o", "--out", required=True, help="output folder (must be empty unless --resume/--overwrite)")
    c.add_argument("--metadata", help="folder of metadata_*.parquet aligned with the shards (default: ROOT/metadata)")
    c.add_argument("--concepts", help="concept ids: folder of .npy/.parquet shards aligned with the embedding shards")
    c.add_argument("--concept-column", default="concept", help="integer column when --concepts is parquet")
    c.add_argument("--embedding-column", default="embedding", help="list column of parquet embedding shards")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--drop-rate", type=float, help="fraction of features dropped by RFS (default 0)")
    g.add_argument("--keep", type=int, help="number of features kept by RFS")
    c.add_argument("--seed", type=int, default=0, help="RFS seed")
    c.add_argument("--normalize", nargs="?", const="input", default="none",
                   choices=["none", "input", "output", "both"], help="L2-normalise inputs (bare flag), outputs or both")
    c.add_argument("--out-dtype", default="float32", choices=["float32", "float16"])
    c.add_argument("--codec", help="stored form of the centroids: float32, float16, int8, binary, pq:M "
                                   "(M 8-bit sub-quantisers) or faiss:<index_factory> (default: --out-dtype)")
    c.add_argument("--codec-sample-rows", type=int, default=65536,
                   help="rows (the first output rows, held in memory as float32) that int8 / pq / faiss "
                        "codecs are fitted on, before any shard is written (default 65536)")
    c.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_ROWS, help=f"rows per block (bounds memory; default {DEFAULT_BATCH_ROWS})")
    c.add_argument("--partitions", type=int, default=0, help="concept mode: hash partitions (0 = auto)")
    c.add_argument("--skip-invalid", action="store_true", help="drop NaN/Inf rows (counted in the manifest)")
    c.add_argument("--engine", default="local", choices=["local", "ray"])
    c.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    c.add_argument("--workers", type=_positive_int, default=None,
                   help="local engine: shards processed in parallel (default: the usable cores)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted job from its manifest")
    c.add_argument("--overwrite", action="store_true", help="replace a previous semcomp output in --out")
    c.add_argument("-q", "--quiet", action="store_true")
    c.set_defaults(func=_compress)

    v = sub.add_parser("verify", help="check a compressed folder against its manifest.json")
    v.add_argument("dir")
    v.add_argument("-q", "--quiet", action="store_true")
    v.set_defaults(func=_verify)

    gp = sub.add_parser("gap", help="modality gap, true-pair cosine and explained variance of a folder (streamed)")
    gp.add_argument("inputs", nargs="+", help="a clip-retrieval root or >= 2 modality folders")
    gp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_ROWS)
    gp.add_argument("--embedding-column", default="embedding")
    gp.add_argument("-q", "--quiet", action="store_true")
    gp.set_defaults(func=_gap)

    e = sub.add_parser("eval", help="linear probe / kNN / retrieval recall: compressed vs original embeddings")
    e.add_argument("inputs", nargs="+", help="original embeddings: a clip-retrieval root or >= 2 modality folders")
    e.add_argument("--compressed", required=True, help="output folder of `semcomp compress` (pairs mode)")
    e.add_argument("--labels", required=True, help="labels: folder/file of .npy shards or parquet (see --label-column)")
    e.add_argument("--label-column", default="label")
    e.add_argument("--embedding-column", default="embedding")
    e.add_argument("--test-fraction", type=float, default=0.2)
    e.add_argument("--max-rows", type=int, default=200000, help="rows loaded for evaluation (in memory)")
    e.add_argument("--k", type=int, default=10, help="kNN neighbours")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_eval)

    ix = sub.add_parser("index", help="build a faiss index of a compressed folder (saved in DIR/index/)")
    ix.add_argument("dir", help="output folder of `semcomp compress`")
    ix.add_argument("--index-factory", help="faiss index_factory string (default: Flat below 10000 rows, else "
                                            "RR,IVF,PQ sized as autofaiss does; see docs/compress.md)")
    ix.add_argument("--nprobe", type=_positive_int, help="IVF lists searched per query (default: nlist // 16)")
    ix.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    ix.add_argument("-q", "--quiet", action="store_true")
    ix.set_defaults(func=_index)

    se = sub.add_parser("search", help="k nearest compressed rows of full-dimensional query embeddings")
    se.add_argument("dir", help="output folder of `semcomp compress` (uses DIR/index/ when built)")
    se.add_argument("--query", required=True, help=".npy of query embeddings (Q, D) or (D,), D = input dimension")
    se.add_argument("-k", "--k", type=_positive_int, default=10, help="neighbours per query (default 10)")
    se.add_argument("--nprobe", type=_positive_int, help="IVF lists searched (default: the index's)")
    se.add_argument("--exact", action="store_true", help="exact streamed search, ignoring DIR/index/")
    se.add_argument("--json", action="store_true", help="JSON output: per query a list of {rank, id, row, score, metadata}")
    se.set_defaults(func=_search)
