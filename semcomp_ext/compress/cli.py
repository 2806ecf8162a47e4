"""`semcomp compress | verify | gap | eval` subcommands."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .readers import DEFAULT_BATCH_ROWS
from .summaries import compress_summary, format_eval, stored_ratio


def interrupted(command: str, hint: str | None = None) -> int:
    """Ctrl-C: one line (with how to continue) and exit 130 at once. Worker threads stuck in a
    stalled store's requests are not waited for (the interpreter's exit would join them)."""
    import threading

    print(f"semcomp {command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        try:
            sys.stdout.flush()
        except (BrokenPipeError, ValueError):
            pass
        os._exit(130)
    return 130


def emit(text: str) -> None:
    """Print to stdout; a reader that went away (`semcomp ... --json | head`) ends the output
    quietly instead of a BrokenPipeError traceback."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again


def _storage_error(exc: Exception) -> str:
    """The one-line message of an I/O error; a TypeError only when an fsspec backend rejected a
    --storage-options name (the message names the option, never a value), else re-raised. An
    OSError without a file name gets none added here: the library names its files."""
    if isinstance(exc, TypeError):
        if "unexpected keyword argument" not in str(exc):
            raise exc
        return f"--storage-options rejected by the storage backend: {exc}"
    return str(exc)


_RESUME_HINT = "continue with the same command and --resume (the shards written so far are kept)"


def _run(command: str, args, fn, resume_hint: bool = False) -> int:
    """Run one command's work: options errors in the flags' words, an unreachable store, a
    missing optional dependency or Ctrl-C as one line; the return code of `fn` otherwise."""
    from .analysis import SourceMismatchError
    from .fsio import configure, parse_storage_options, storage_errors
    from .options import OptionError, OptionPathError, OptionStateError, flag_message

    try:
        if hasattr(args, "storage_options"):
            args.so = parse_storage_options(args.storage_options)
            configure(args.so)
        return fn(args)
    except KeyboardInterrupt:
        return interrupted(command, _RESUME_HINT if resume_hint else None)
    except OptionError as exc:  # the library names fields; the command line names flags
        raise ValueError(flag_message(exc)) from None
    except OptionPathError as exc:
        raise FileNotFoundError(flag_message(exc)) from None
    except OptionStateError as exc:
        raise FileExistsError(flag_message(exc)) from None
    except SourceMismatchError as exc:
        raise ValueError(f"{exc} (--force)") from None
    except (ImportError, TypeError, *storage_errors()) as exc:  # storage_errors: evaluated after the backend loaded
        if isinstance(exc, (FileNotFoundError, FileExistsError)):
            raise
        print(f"semcomp {command}: error: {_storage_error(exc)}", file=sys.stderr)
        return 2
    return 0


def _compress(args) -> int:
    return _run("compress", args, _compress_job, resume_hint=True)


def _compress_job(args) -> int:
    import time

    from .api import CompressOptions, compress

    opts = CompressOptions(
        inputs=args.inputs, out=args.out, metadata=args.metadata, concepts=args.concepts,
        concept_column=args.concept_column, embedding_column=args.embedding_column,
        drop_rate=args.drop_rate, keep=args.keep, seed=args.seed, normalize=args.normalize,
        out_dtype=args.out_dtype, codec=args.codec, codec_sample_rows=args.codec_sample_rows,
        batch_size=args.batch_size, partitions=args.partitions,
        skip_invalid=args.skip_invalid, engine=args.engine, ray_address=args.ray_address,
        resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, workers=args.workers,
        modalities=args.modality, storage_options=args.so, device=args.device,
    )
    t0 = time.perf_counter()
    m = compress(opts)
    if args.json:
        p = m["parameters"]
        status = {k: m[k] for k in ("status", "num_shards", "rows_in", "rows_out", "invalid_rows_skipped")}
        status.update(out=args.out, mode=p["mode"], modalities=p["modalities"], dim=p["dim"], in_dtype=p["in_dtype"],
                      keep=p["keep"], codec=p["codec"], compression_ratio=stored_ratio(m),
                      seconds=round(time.perf_counter() - t0, 3))
        emit(json.dumps(status))
    elif not args.quiet:
        emit(compress_summary(m, args.out, time.perf_counter() - t0))
    return 0


def _verify(args) -> int:
    return _run("verify", args, _verify_folder)


def _verify_folder(args) -> int:
    from .fsio import local
    from .manifest import verify

    args.dir = local(args.dir)
    problems = verify(args.dir)
    if args.json:
        emit(json.dumps({"dir": args.dir, "ok": not problems, "problems": problems}))
        return 1 if problems else 0
    for p in problems:
        print(f"semcomp verify: {p}", file=sys.stderr)
    if not problems and not args.quiet:
        emit(f"{args.dir}: ok")
    return 1 if problems else 0


def _gap(args) -> int:
    return _run("gap", args, _gap_report)


def _gap_report(args) -> int:
    from .analysis import gap_report

    rep = gap_report(args.inputs, batch_size=args.batch_size, column=args.embedding_column,
                     quiet=args.quiet, modalities=args.modality)
    if args.json:
        emit(json.dumps(rep, indent=1))
        return 0
    lines = [f"semcomp gap: {rep['rows']:,} rows of {', '.join(rep['modalities'])} (D {rep['dim']}, {rep['in_dtype']})"]
    for pair, g in rep["modality_gap"].items():
        lines.append(f"  {pair}: modality gap {g:.3f}, true-pair cosine {rep['true_pair_cosine'][pair]:.3f}")
    if len(rep["modality_gap"]) > 1:
        lines.append(f"  mean modality gap {rep['mean_modality_gap']:.3f}")
    ev = rep["explained_variance_components"]
    lines.append(f"  principal components for 90/95/99% of the variance: {ev['0.9']} / {ev['0.95']} / {ev['0.99']} "
                 f"of {rep['dim']}")
    emit("\n".join(lines))
    return 0


def _eval(args) -> int:
    return _run("eval", args, _eval_report)


def _seed_notice(args) -> str | None:
    """`--seed` given to eval without `--sample-seed`: once the sample seed, now the RFS seed
    (one meaning of --seed on every command); the line that says so."""
    via_alias = any(old == "--rfs-seed" for old, _ in getattr(args, "_renamed", None) or [])
    if args.seed is None or args.sample_seed is not None or via_alias:
        return None
    return ("semcomp eval: note: --seed is the RFS seed (of --drop-rates); the seed of the row sample and split "
            "is --sample-seed (default 0), which --seed was before")


def _eval_report(args) -> int:
    from .analysis import eval_report

    note = _seed_notice(args)
    if note and not args.quiet:
        print(note, file=sys.stderr)
    if args.sample_seed is None:
        args.sample_seed = 0
    rep = eval_report(args.inputs, args.compressed, args.labels, label_column=args.label_column,
                      test_fraction=args.test_fraction, max_rows=args.max_rows, k=args.k, sample_seed=args.sample_seed,
                      column=args.embedding_column, drop_rates=args.drop_rates, normalize=args.normalize,
                      codec=args.codec, seed=args.seed, modalities=args.modality, quiet=args.quiet,
                      force=args.force)
    emit(json.dumps(rep, indent=1) if args.json else format_eval(rep))
    return 0


def _index(args) -> int:
    return _run("index", args, _index_build)


def _index_build(args) -> int:
    from .index import build_index

    info = build_index(args.dir, index_factory=args.index_factory, nprobe=args.nprobe, seed=args.sample_seed,
                       quiet=args.quiet, storage_options=args.so, time_budget_s=args.time_budget, threads=args.threads)
    summary = {k: info.get(k) for k in ("factory", "ntotal", "dim", "nprobe", "train_rows", "build_seconds")}
    if args.json:
        emit(json.dumps(summary))
    elif not args.quiet:
        emit(f"semcomp index: {args.dir}/index: {summary['factory']} over {summary['ntotal']:,} vectors of dim "
             f"{summary['dim']}" + (f", nprobe {summary['nprobe']}" if summary["nprobe"] else "")
             + f"; trained on {summary['train_rows']:,} rows, built in {summary['build_seconds']:.1f} s")
    return 0


def _search(args) -> int:
    return _run("search", args, _search_index)


def _search_index(args) -> int:
    import numpy as np

    from .index import format_table, search

    try:
        queries = np.load(args.query, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--query: cannot read {args.query!r} as a .npy array: {exc}") from None
    res = search(args.dir, queries, args.k, nprobe=args.nprobe, exact=args.exact, storage_options=args.so)
    emit(json.dumps(res.to_records(), default=str) if args.json else format_table(res))
    return 0


def _positive_int(s: str) -> int:
    try:
        n = int(s)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {s!r}")
    return n


def _positive_seconds(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = 0.0
    if not 0 < v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {s!r}")
    return v


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


def _add_common(p, json_help: str, quiet_help: str) -> None:
    """The flags every command of this module takes: --storage-options, --json, -q."""
    p.add_argument("--storage-options", metavar="JSON", help=_STORAGE_HELP)
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("-q", "--quiet", action="store_true", help=quiet_help)


def _hidden_alias(p, flag: str, dest: str, **kw) -> None:
    """An earlier spelling of a flag, still accepted, not shown in --help; using it prints a
    notice naming the new spelling (semcomp_ext.cli.add_alias: one mechanism for every command)."""
    from ..cli import add_alias

    add_alias(p, flag, next(a.option_strings[-1] for a in p._actions
                            if a.dest == dest and a.option_strings and a.help is not argparse.SUPPRESS))


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
    """The options object's own checks (torch-free), before the job's imports."""
    from .options import CompressOptions, OptionError, flag_message

    _check_inputs(args)
    try:
        CompressOptions(inputs=args.inputs, out=args.out, modalities=args.modality, drop_rate=args.drop_rate,
                        keep=args.keep, seed=args.seed, normalize=args.normalize, out_dtype=args.out_dtype,
                        codec=args.codec, codec_sample_rows=args.codec_sample_rows, batch_size=args.batch_size,
                        partitions=args.partitions, engine=args.engine, resume=args.resume, overwrite=args.overwrite,
                        workers=args.workers, device=args.device).validated()
    except OptionError as exc:
        raise ValueError(flag_message(exc)) from None


def _check_eval(args) -> None:
    _check_inputs(args)
    if args.compressed is None and not args.drop_rates:
        raise ValueError("give --compressed FOLDER and/or --drop-rates R1,R2,... (what to evaluate)")


def register(sub) -> None:
    _register_compress(sub)
    _register_verify_gap(sub)
    _register_eval(sub)
    _register_index_search(sub)


def _register_compress(sub) -> None:
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
    c.add_argument("--seed", type=int, default=0, help="RFS seed (which features are kept)")
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
                   help="shards processed in parallel: threads (local engine; default: the usable cores) or Ray "
                        "tasks at once (--engine ray; default: every CPU of the cluster)")
    c.add_argument("--device", default="cpu", metavar="cpu|cuda[:N]",
                   help="where the centroid + RFS runs (default cpu). cuda: blocks staged in pinned host "
                        "buffers, copies overlapped with compute; byte-identical output for every mode "
                        "(--normalize input/both: row norms on the CPU; concepts: sums in the CPU's order); "
                        "--engine local only; see docs/compress.md")
    c.add_argument("--resume", action="store_true", help="continue an interrupted (or failed) job from its manifest")
    c.add_argument("--overwrite", action="store_true", help="replace a previous semcomp output in --out")
    _add_common(c, "print one JSON status line instead of the summary", "no progress and no summary")
    c.set_defaults(func=_compress, validate=_check_compress)


def _register_verify_gap(sub) -> None:
    v = sub.add_parser("verify", help="check a compressed folder against its manifest.json")
    v.add_argument("dir", help="output folder of `semcomp compress`")
    _add_common(v, "print {dir, ok, problems} as JSON instead of the lines", "print problems only")
    v.set_defaults(func=_verify)

    gp = sub.add_parser("gap", help="modality gap, true-pair cosine and explained variance of a folder (streamed)")
    _add_inputs(gp)
    gp.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_ROWS, help="rows per block")
    gp.add_argument("--embedding-column", default="embedding", help="list column of parquet embedding shards")
    _add_common(gp, "print the report as JSON instead of the table", "no progress (the report is still printed)")
    gp.set_defaults(func=_gap, validate=_check_inputs)


def _register_eval(sub) -> None:
    e = sub.add_parser("eval", help="what compression costs: accuracy / retrieval of compressed vs original embeddings",
                       description="Scores the original embeddings, a compressed folder and/or a sweep of drop "
                                   "rates on a seeded sample of the rows. Example: semcomp eval img_emb.npy "
                                   "text_emb.npy --labels labels.npy --drop-rates 0.5,0.75,0.9,0.95")
    _add_inputs(e)
    e.add_argument("--compressed", help="output folder of `semcomp compress` (pairs mode) made from these inputs "
                                        "(checked against its manifest: paths, sizes, mtimes)")
    e.add_argument("--force", action="store_true", help="score --compressed even if the inputs are not the files "
                                                        "its manifest records")
    e.add_argument("--labels", help="integer class labels, one per input row: .npy, parquet (--label-column) or a "
                                    "folder of shards; without labels only retrieval is reported")
    e.add_argument("--drop-rates", type=_drop_rates, help="comma list: also evaluate centroid + RFS at these drop "
                                                          "rates, computed in memory (e.g. 0.5,0.75,0.9,0.95)")
    e.add_argument("--normalize", choices=["none", "input", "output", "both"],
                   help="--drop-rates: normalisation (default: the compressed folder's, else none)")
    e.add_argument("--codec", help="--drop-rates: stored form (default: the compressed folder's, else the input dtype)")
    e.add_argument("--seed", type=int, default=None, help="--drop-rates: RFS seed (default: the compressed folder's, else 0)")
    _hidden_alias(e, "--rfs-seed", "seed", type=int)
    e.add_argument("--label-column", default="label", help="label column of parquet labels")
    e.add_argument("--embedding-column", default="embedding", help="list column of parquet embedding shards")
    e.add_argument("--test-fraction", type=float, default=0.2, help="held-out fraction of the evaluated rows")
    e.add_argument("--max-rows", type=int, default=20000,
                   help="rows evaluated: a seeded random sample of this many (0 = every row; held in memory)")
    e.add_argument("--k", type=int, default=10, help="kNN neighbours")
    e.add_argument("--sample-seed", type=int, default=None,
                   help="seed of the row sample and the train/test split (default 0)")
    _add_common(e, "print the report as JSON instead of the table", "no progress (the report is still printed)")
    e.set_defaults(func=_eval, validate=_check_eval)


def _register_index_search(sub) -> None:
    ix = sub.add_parser("index", help="build a faiss index of a compressed folder (saved in DIR/index/)")
    ix.add_argument("dir", help="output folder of `semcomp compress`")
    ix.add_argument("--index-factory", help="faiss index_factory string (default: chosen from the size of the "
                                            "folder, as autofaiss does; see docs/compress.md)")
    ix.add_argument("--nprobe", type=_positive_int, help="IVF lists searched per query (default: tuned on the index)")
    ix.add_argument("--sample-seed", type=int, default=0, help="seed of the training sample")
    ix.add_argument("--time-budget", type=_positive_seconds, metavar="SECONDS",
                    help="build time the default index is sized for (default: 10 + rows x dims / 1e7)")
    ix.add_argument("--threads", type=_positive_int, help="faiss threads (default: the usable cores, fewer when busy)")
    _hidden_alias(ix, "--seed", "sample_seed", type=int)
    _add_common(ix, "print the index summary as JSON instead of the line", "no progress and no summary")
    ix.set_defaults(func=_index)

    se = sub.add_parser("search", help="k nearest compressed rows of full-dimensional query embeddings")
    se.add_argument("dir", help="output folder of `semcomp compress` (uses DIR/index/ when built)")
    se.add_argument("--query", required=True, help=".npy of query embeddings (Q, D) or (D,), D = input dimension")
    se.add_argument("-k", "--k", type=_positive_int, default=10, help="neighbours per query (default 10)")
    se.add_argument("--nprobe", type=_positive_int, help="IVF lists searched (default: the index's)")
    se.add_argument("--exact", action="store_true", help="exact streamed search, ignoring DIR/index/ (on a URL: "
                                                         "downloads every shard; without it a URL needs an index)")
    _add_common(se, "print per query a list of {rank, id, row, score, metadata} as JSON instead of the table",
                "nothing on stderr but errors (the results are still printed)")
    se.set_defaults(func=_search)
