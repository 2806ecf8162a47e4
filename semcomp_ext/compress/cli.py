"""`semcomp compress | verify | gap | eval` subcommands."""

from __future__ import annotations

import argparse
import json
import sys

from .readers import DEFAULT_BATCH_ROWS


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def compress_summary(m: dict, out: str, seconds: float | None = None) -> str:
    """A few lines for people: where, rows, bytes and the compression ratio (real dtypes)."""
    from .api import compression_ratio_bytes
    from .codecs import codec_from_manifest

    p = m["parameters"]
    codec = codec_from_manifest(m)
    mods = p["modalities"]
    src = sum(s["bytes"] for s in m["sources"] if s["modality"] in mods)
    dst = sum(sh[k]["bytes"] for sh in m["shards"] for k in ("centroids", "concepts") if sh.get(k))
    ratio = compression_ratio_bytes(len(mods), p["dim"], p["in_dtype"], codec, p["keep"])
    item_in = f"{len(mods)} x {p['dim']} {p['in_dtype']}"
    item_out = f"{p['keep']} {codec.name}" + (f" ({codec.bytes_per_vector(p['keep']):g} B)" if codec.name not in
                                              ("float32", "float16") else "")
    what = "concepts" if p["mode"] == "concepts" else "rows"
    lines = [
        f"semcomp compress: {out}: {m['rows_in']:,} rows of {', '.join(mods)} -> {m['rows_out']:,} {what}, "
        f"{m['num_shards']} shard(s); manifest {m['status']}",
        f"  per item: {item_in} -> {item_out}: {ratio:.2f}x smaller"
        + (f" (drop rate {p['drop_rate']:g})" if p.get("drop_rate") else ""),
        f"  files: {_size(src)} in -> {_size(dst)} out"
        + (f"; {m['invalid_rows_skipped']:,} rows with NaN/Inf skipped" if m.get("invalid_rows_skipped") else "")
        + (f"; {seconds:.1f} s" if seconds is not None else ""),
    ]
    return "\n".join(lines)


def interrupted(command: str, hint: str | None = None) -> None:
    """Ctrl-C: one line (with how to continue) and exit 130 at once. Worker threads stuck in a
    stalled store's requests are not waited for (the interpreter's exit would join them)."""
    import os
    import threading

    print(f"semcomp {command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        os._exit(130)
    raise SystemExit(130)


def _storage_error(exc: Exception) -> str:
    """The one-line message of an I/O error; a TypeError only when an fsspec backend rejected a
    --storage-options name (the message names the option, never a value), else re-raised."""
    if isinstance(exc, TypeError):
        if "unexpected keyword argument" not in str(exc):
            raise exc
        return f"--storage-options rejected by the storage backend: {exc}"
    return str(exc)


def _compress(args) -> int:
    import time

    from .api import CompressOptions, compress, compression_ratio_bytes
    from .codecs import codec_from_manifest
    from .fsio import parse_storage_options

    opts = CompressOptions(
        inputs=args.inputs, out=args.out, metadata=args.metadata, concepts=args.concepts,
        concept_column=args.concept_column, embedding_column=args.embedding_column,
        drop_rate=args.drop_rate, keep=args.keep, seed=args.seed, normalize=args.normalize,
        out_dtype=args.out_dtype, codec=args.codec, codec_sample_rows=args.codec_sample_rows,
        batch_size=args.batch_size, partitions=args.partitions,
        skip_invalid=args.skip_invalid, engine=args.engine, ray_address=args.ray_address,
        resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, workers=args.workers,
        modalities=args.modality, storage_options=parse_storage_options(args.storage_options),
        device=args.device,
    )
    t0 = time.perf_counter()
    from .fsio import storage_errors

    try:
        m = compress(opts)
    except KeyboardInterrupt:
        interrupted("compress", f"continue with the same command and --resume (the shards written so far are kept)")
    except (ImportError, TypeError, *storage_errors()) as exc:  # storage_errors: evaluated after the backend loaded
        if isinstance(exc, (FileNotFoundError, FileExistsError)):
            raise
        print(f"semcomp compress: error: {_storage_error(exc)}", file=sys.stderr)
        return 2
    if args.json:
        p = m["parameters"]
        status = {k: m[k] for k in ("status", "num_shards", "rows_in", "rows_out", "invalid_rows_skipped")}
        status.update(out=args.out, modalities=p["modalities"], dim=p["dim"], in_dtype=p["in_dtype"], keep=p["keep"],
                      codec=p["codec"], compression_ratio=compression_ratio_bytes(
                          len(p["modalities"]), p["dim"], p["in_dtype"], codec_from_manifest(m), p["keep"]))
        print(json.dumps(status))
    elif not args.quiet:
        print(compress_summary(m, args.out, time.perf_counter() - t0))
    return 0


def _verify(args) -> int:
    from .fsio import configure, local, parse_storage_options, storage_errors
    from .manifest import verify

    configure(parse_storage_options(args.storage_options))
    args.dir = local(args.dir)
    try:
        problems = verify(args.dir)
    except (ImportError, TypeError, *storage_errors()) as exc:  # no fsspec backend, an unreachable or forbidden store
        if isinstance(exc, FileNotFoundError):
            raise
        print(f"semcomp verify: error: {_storage_error(exc)}", file=sys.stderr)
        return 2
    for p in problems:
        print(f"semcomp verify: {p}", file=sys.stderr)
    if not problems and not args.quiet:
        print(f"{args.dir}: ok")
    return 1 if problems else 0


def _gap(args) -> int:
    from .analysis import gap_report

    try:
        rep = gap_report(args.inputs, batch_size=args.batch_size, column=args.embedding_column, quiet=args.quiet,
                         modalities=args.modality)
    except ImportError as exc:  # an optional dependency (pyarrow for parquet)
        print(f"semcomp gap: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(f"semcomp gap: {rep['rows']:,} rows of {', '.join(rep['modalities'])} (D {rep['dim']}, {rep['in_dtype']})")
    for pair, g in rep["modality_gap"].items():
        print(f"  {pair}: modality gap {g:.3f}, true-pair cosine {rep['true_pair_cosine'][pair]:.3f}")
    if len(rep["modality_gap"]) > 1:
        print(f"  mean modality gap {rep['mean_modality_gap']:.3f}")
    ev = rep["explained_variance_components"]
    print(f"  principal components for 90/95/99% of the variance: {ev['0.9']} / {ev['0.95']} / {ev['0.99']} "
          f"of {rep['dim']}")
    return 0


def _pt(v: float) -> str:
    return f"{round(v, 1) + 0.0:+.1f}"  # + 0.0: no "-0.0"


def format_eval(rep: dict) -> str:
    """The eval report as a table: bytes, accuracy / neighbour recall and the change in points."""
    rows = rep["table"]
    lab = rep["labels"]
    k = next((key for key in rows[0] if key.startswith("knn@")), None)
    rk = rep["recall_k"]
    head = ["representation", "bytes/item", "ratio"]
    if lab:
        head += ["probe acc", "Δ pt", f"{k} acc", "Δ pt"]
    head += [f"NN recall@{rk}", "Δ pt"]
    table = []
    for r in rows:
        c = [r["representation"], f"{r['bytes_per_item']:g}", f"{r['compression_ratio']:.2f}x"]
        if lab:
            c += [f"{100 * r['linear_probe']:.1f}%", _pt(r['delta_pt']['linear_probe']),
                  f"{100 * r[k]:.1f}%", _pt(r['delta_pt'][k])]
        c += [f"{100 * r['neighbour_recall']:.1f}%", _pt(r['delta_pt']['neighbour_recall'])]
        table.append(c)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    fmt = lambda cells: "  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w)  # noqa: E731
                                  for i, (x, w) in enumerate(zip(cells, widths)))
    mods = rep["modalities"]
    lines = [f"semcomp eval: {rep['sample']}, {', '.join(mods)} (D {rep['dim']}, {rep['in_dtype']}); "
             + (f"train {rep['train']:,} / test {rep['test']:,}" if lab else "no labels: neighbour recall only"),
             fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in table]
    lines.append(f"ratio: input bytes per item ({len(mods)} x {rep['dim']} {rep['in_dtype']}) / stored bytes. "
                 "Δ pt: percentage points vs the original concat (every embedding kept); negative = lost.")
    lines.append(f"NN recall@{rk}: share of the {rk} nearest rows (cosine) of the original concat that the "
                 f"representation's {rk} nearest recover ({rep['recall_queries']:,} sampled queries among all "
                 f"{rep['rows']:,} rows)" + (f"; probe: {rep['probe']}." if lab else "."))
    base = next(r for r in rows if r["representation"] == "original concat")
    for r in rows:
        if r["representation"].startswith(("compressed", "centroid")):
            what = (f"probe accuracy {100 * base['linear_probe']:.1f}% -> {100 * r['linear_probe']:.1f}% "
                    f"({_pt(r['delta_pt']['linear_probe'])} pt)") if lab else \
                (f"NN recall@{rk} {100 * r['neighbour_recall']:.1f}% ({_pt(r['delta_pt']['neighbour_recall'])} pt)")
            lines.append(f"  {r['representation']}: {r['compression_ratio']:.2f}x fewer bytes, {what}")
    return "\n".join(lines)


def _eval(args) -> int:
    from .analysis import eval_report

    try:
        rep = eval_report(args.inputs, args.compressed, args.labels, label_column=args.label_column,
                          test_fraction=args.test_fraction, max_rows=args.max_rows, k=args.k, seed=args.seed,
                          column=args.embedding_column, drop_rates=args.drop_rates, normalize=args.normalize,
                          codec=args.codec, rfs_seed=args.rfs_seed, modalities=args.modality, quiet=args.quiet)
    except ImportError as exc:  # an optional dependency (pyarrow for parquet, faiss for a faiss codec)
        print(f"semcomp eval: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1) if args.json else format_eval(rep))
    return 0


def _index(args) -> int:
    from .fsio import parse_storage_options, storage_errors
    from .index import build_index

    so = parse_storage_options(args.storage_options)
    try:
        info = build_index(args.dir, index_factory=args.index_factory, nprobe=args.nprobe, seed=args.seed,
                           quiet=args.quiet, storage_options=so)
    except (ImportError, TypeError, *storage_errors()) as exc:  # no faiss / fsspec backend, an unreachable store
        if isinstance(exc, FileNotFoundError):
            raise
        print(f"semcomp index: error: {_storage_error(exc)}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(json.dumps({k: info[k] for k in ("factory", "ntotal", "dim", "nprobe", "train_rows", "build_seconds")}))
    return 0


def _search(args) -> int:
    import numpy as np

    from .fsio import parse_storage_options, storage_errors
    from .index import format_table, search

    so = parse_storage_options(args.storage_options)
    try:
        queries = np.load(args.query, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--query: cannot read {args.query!r} as a .npy array: {exc}") from exc
    try:
        res = search(args.dir, queries, args.k, nprobe=args.nprobe, exact=args.exact, storage_options=so)
    except (ImportError, TypeError, *storage_errors()) as exc:  # no faiss / fsspec backend, an unreachable store
        if isinstance(exc, FileNotFoundError):
            raise
        print(f"semcomp search: error: {_storage_error(exc)}", file=sys.stderr)
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


def _drop_rates(s: str) -> list:
    try:
        rates = [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1), got {s!r}") from None
    if not rates or not all(0 <= r < 1 for r in rates):
        raise argparse.ArgumentTypeError(f"drop rates must be in [0, 1), got {s!r}")
    return rates


_INPUTS_HELP = ("embeddings: one file per modality (img_emb.npy text_emb.npy), a folder holding NAME_emb.npy "
                "files, a clip-retrieval root (*_emb folders) or >= 2 modality folders; or use --modality")
_STORAGE_HELP = ("fsspec options for URL inputs/outputs (s3://, gs://, ...), a JSON object, e.g. "
                 "'{\"endpoint_url\": \"http://127.0.0.1:9000\"}'; credentials otherwise come from the usual "
                 "environment (AWS_*, ...); never written to the manifest or printed")
_MODALITY_HELP = "NAME=PATH: a modality and its file or folder of shards (repeat; instead of positional inputs)"


def _add_inputs(p) -> None:
    p.add_argument("inputs", nargs="*", help=_INPUTS_HELP)
    p.add_argument("--modality", action="append", metavar="NAME=PATH", help=_MODALITY_HELP)


def _check_inputs(args) -> None:
    """Cheap checks before anything is imported or opened: one way of naming the inputs."""
    from .readers import LayoutError

    if not args.inputs and not args.modality:
        raise LayoutError("no inputs given")
    if args.inputs and args.modality:
        raise ValueError("give the inputs as positional paths or as --modality NAME=PATH, not both")
    for spec in args.modality or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--modality must be NAME=PATH, got {spec!r}")


def _check_compress(args) -> None:
    _check_inputs(args)
    if args.resume and args.overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if args.drop_rate is not None and not 0 <= args.drop_rate < 1:
        raise ValueError(f"--drop-rate must be in [0, 1), got {args.drop_rate}")
    if args.keep is not None and args.keep < 1:
        raise ValueError(f"--keep must be >= 1, got {args.keep}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")


def _check_eval(args) -> None:
    _check_inputs(args)
    if args.compressed is None and not args.drop_rates:
        raise ValueError("give --compressed FOLDER and/or --drop-rates R1,R2,... (what to evaluate)")


def register(sub) -> None:
    c = sub.add_parser("compress", help="pair/concept centroids + random feature selection over embedding shards",
                       description="Centroid of each item over its modalities, then random feature selection, "
                                   "streamed to OUT. Example: semcomp compress img_emb.npy text_emb.npy -o out "
                                   "--drop-rate 0.5")
    _add_inputs(c)
    c.add_argument("-o", "--out", required=True, help="output folder (must be empty unless --resume/--overwrite)")
    c.add_argument("--metadata", help="metadata_*.parquet folder (or one .parquet file) aligned with the rows "
                                      "(default: ROOT/metadata of a clip-retrieval root)")
    c.add_argument("--concepts", help="concept ids: folder of .npy/.parquet shards aligned with the embedding shards")
    c.add_argument("--concept-column", default="concept", help="integer column when --concepts is parquet")
    c.add_argument("--embedding-column", default="embedding", help="list column of parquet embedding shards")
    g = c.add_mutually_exclusive_group()
    g.add_argument("--drop-rate", type=float, help="fraction of features dropped by RFS (default 0: keep all)")
    g.add_argument("--keep", type=int, help="number of features kept by RFS (instead of --drop-rate)")
    c.add_argument("--seed", type=int, default=0, help="RFS seed")
    c.add_argument("--normalize", default="none", choices=["none", "input", "output", "both"],
                   help="L2-normalise each input embedding (input), each centroid over its kept columns (output), "
                        "or both; a value is required (--normalize input)")
    c.add_argument("--out-dtype", default=None, choices=["float32", "float16"],
                   help="output precision (default: the input dtype; float64 input is stored as float32)")
    c.add_argument("--codec", help="stored form of the centroids: float32, float16, int8, binary, pq:M "
                                   "(M 8-bit sub-quantisers) or faiss:<index_factory> (default: --out-dtype)")
    c.add_argument("--codec-sample-rows", type=int, default=65536,
                   help="rows (the first output rows, held in memory as float32) that int8 / pq / faiss "
                        "codecs are fitted on, before any shard is written (default 65536)")
    c.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_ROWS, help=f"rows per block (bounds memory; default {DEFAULT_BATCH_ROWS})")
    c.add_argument("--partitions", type=int, default=0, help="concept mode: hash partitions (0 = auto)")
    c.add_argument("--skip-invalid", action="store_true", help="drop NaN/Inf rows (counted in the manifest)")
    c.add_argument("--engine", default="local", choices=["local", "ray"], help="local threads, or Ray Data tasks")
    c.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray)")
    c.add_argument("--workers", type=_positive_int, default=None,
                   help="local engine: shards processed in parallel (default: the usable cores)")
    c.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where the centroid + RFS runs (default cpu). cuda: blocks staged in pinned host "
                        "buffers, copies overlapped with compute; byte-identical output for every mode "
                        "(--normalize input/both: row norms on the CPU; concepts: sums in the CPU's order); "
                        "--engine local only; see docs/compress.md")
    c.add_argument("--resume", action="store_true", help="continue an interrupted (or failed) job from its manifest")
    c.add_argument("--overwrite", action="store_true", help="replace a previous semcomp output in --out")
    c.add_argument("--storage-options", metavar="JSON", help=_STORAGE_HELP)
    c.add_argument("--json", action="store_true", help="print one JSON status line instead of the summary")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary")
    c.set_defaults(func=_compress, validate=_check_compress)

    v = sub.add_parser("verify", help="check a compressed folder against its manifest.json")
    v.add_argument("dir", help="output folder of `semcomp compress`")
    v.add_argument("--storage-options", metavar="JSON", help=_STORAGE_HELP)
    v.add_argument("-q", "--quiet", action="store_true", help="print problems only")
    v.set_defaults(func=_verify)

    gp = sub.add_parser("gap", help="modality gap, true-pair cosine and explained variance of a folder (streamed)")
    _add_inputs(gp)
    gp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_ROWS, help="rows per block")
    gp.add_argument("--embedding-column", default="embedding", help="list column of parquet embedding shards")
    gp.add_argument("--json", action="store_true", help="JSON output")
    gp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    gp.set_defaults(func=_gap, validate=_check_inputs)

    e = sub.add_parser("eval", help="what compression costs: accuracy / retrieval of compressed vs original embeddings",
                       description="Scores the original embeddings, a compressed folder and/or a sweep of drop "
                                   "rates on a seeded sample of the rows. Example: semcomp eval img_emb.npy "
                                   "text_emb.npy --labels labels.npy --drop-rates 0.5,0.75,0.9,0.95")
    _add_inputs(e)
    e.add_argument("--compressed", help="output folder of `semcomp compress` (pairs mode) made from these inputs")
    e.add_argument("--labels", help="integer class labels, one per input row: .npy, parquet (--label-column) or a "
                                    "folder of shards; without labels only retrieval is reported")
    e.add_argument("--drop-rates", type=_drop_rates, help="comma list: also evaluate centroid + RFS at these drop "
                                                          "rates, computed in memory (e.g. 0.5,0.75,0.9,0.95)")
    e.add_argument("--normalize", choices=["none", "input", "output", "both"],
                   help="--drop-rates: normalisation (default: the compressed folder's, else none)")
    e.add_argument("--codec", help="--drop-rates: stored form (default: the compressed folder's, else the input dtype)")
    e.add_argument("--rfs-seed", type=int, help="--drop-rates: RFS seed (default: the compressed folder's, else 0)")
    e.add_argument("--label-column", default="label", help="label column of parquet labels")
    e.add_argument("--embedding-column", default="embedding", help="list column of parquet embedding shards")
    e.add_argument("--test-fraction", type=float, default=0.2, help="held-out fraction of the evaluated rows")
    e.add_argument("--max-rows", type=int, default=20000,
                   help="rows evaluated: a seeded random sample of this many (0 = every row; held in memory)")
    e.add_argument("--k", type=int, default=10, help="kNN neighbours")
    e.add_argument("--seed", type=int, default=0, help="seed of the row sample and the train/test split")
    e.add_argument("--json", action="store_true", help="JSON output")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval, validate=_check_eval)

    ix = sub.add_parser("index", help="build a faiss index of a compressed folder (saved in DIR/index/)")
    ix.add_argument("dir", help="output folder of `semcomp compress`")
    ix.add_argument("--index-factory", help="faiss index_factory string (default: Flat below 10000 rows, else "
                                            "RR,IVF,PQ sized as autofaiss does; see docs/compress.md)")
    ix.add_argument("--nprobe", type=_positive_int, help="IVF lists searched per query (default: nlist // 16)")
    ix.add_argument("--seed", type=int, default=0, help="seed of the training sample")
    ix.add_argument("--storage-options", metavar="JSON", help=_STORAGE_HELP)
    ix.add_argument("-q", "--quiet", action="store_true", help="no progress and no summary")
    ix.set_defaults(func=_index)

    se = sub.add_parser("search", help="k nearest compressed rows of full-dimensional query embeddings")
    se.add_argument("dir", help="output folder of `semcomp compress` (uses DIR/index/ when built)")
    se.add_argument("--query", required=True, help=".npy of query embeddings (Q, D) or (D,), D = input dimension")
    se.add_argument("-k", "--k", type=_positive_int, default=10, help="neighbours per query (default 10)")
    se.add_argument("--nprobe", type=_positive_int, help="IVF lists searched (default: the index's)")
    se.add_argument("--exact", action="store_true", help="exact streamed search, ignoring DIR/index/ (on a URL: "
                                                         "downloads every shard; without it a URL needs an index)")
    se.add_argument("--storage-options", metavar="JSON", help=_STORAGE_HELP)
    se.add_argument("--json", action="store_true", help="JSON output: per query a list of {rank, id, row, score, metadata}")
    se.set_defaults(func=_search)
