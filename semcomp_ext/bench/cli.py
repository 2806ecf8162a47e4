"""`semcomp bench`: kernel throughput against the installed peers and the machine's ceilings.

Registering the subcommand imports nothing heavy: torch and the benchmark modules are
imported when the command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OPS = ("infonce", "segment", "gather")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
PLOT_SUFFIXES = (".png", ".pdf", ".svg")
_SUFFIX = {"k": 1 << 10, "m": 1 << 20}

EPILOG = """\
examples:
  semcomp bench all --device cpu -o bench.json --plot bench.png
  semcomp bench infonce --sizes 4096 --json > bench.json   # the same JSON on stdout, no table
  semcomp bench infonce --device cuda --dtype bfloat16 --sizes 4096 16k 32k
  semcomp bench segment --sizes 1M 4M --groups 10 1000 --d 512
  semcomp bench --markdown bench.json        # the JSON as a markdown table

--json prints the JSON on stdout instead of the table; -o/--out PATH writes it to a file
(before 0.2 that was `--json PATH`, which is refused now with a pointer to -o).

Methods. infonce: semcomp (fused), open_clip's ClipLoss, Inf-CL (CUDA, when installed), the
pure-PyTorch reference, torch.compile of it (--compile; on by default on CUDA). segment:
semcomp centroids with unsorted and sorted ids, torch index_add_ and scatter_reduce_. gather:
semcomp select_features, torch index_select. Throughput: InfoNCE TFLOP/s at 8 N^2 D for
forward+backward; segment/gather GB/s of the bytes read and written once. Ceilings measured
on the machine at hand: matmul TFLOP/s in the dtype, copy GB/s (read + write). Extra memory:
peak of one call above what was allocated before it, minus the outputs it returns."""


def _count(text: str, flag: str, *, allow_frac: bool = False):
    t = text.strip().lower()
    try:
        if allow_frac:
            v = float(t)
            if not 0 < v <= 1:
                raise ValueError
            return v
        mult = _SUFFIX.get(t[-1:], 1)
        core = t[:-1] if t[-1:] in _SUFFIX else t
        if "^" in core:
            base, exp = core.split("^")
            v = int(base) ** int(exp)
        else:
            v = int(core)
        v *= mult
        if v <= 0:
            raise ValueError
        return v
    except (ValueError, IndexError):
        what = "numbers in (0, 1]" if allow_frac else "positive integers (e.g. 1024, 64k, 1M, 2^20)"
        raise ValueError(f"{flag} expects {what}, got {text!r}") from None


def parse_list(values, flag: str, *, allow_frac: bool = False) -> tuple:
    """Values given as separate words and/or comma-separated, checked."""
    out = []
    for v in values or ():
        out += [_count(p, flag, allow_frac=allow_frac) for p in str(v).split(",") if p.strip()]
    if values is not None and not out:
        raise ValueError(f"{flag} needs at least one value")
    return tuple(out)


def parse_options(args) -> dict:
    """The BenchConfig fields for parsed arguments, checked without torch; ValueError with one
    line naming the argument. (Whether CUDA is available is checked when the command runs.)"""
    from .results import INFONCE_METHODS

    what = args.what
    if what not in (*OPS, "all"):
        hint = (f"; --json takes no value (it prints JSON on stdout): write the file with -o {what}"
                if args.json and what.endswith(".json") else "")
        raise ValueError(f"unknown benchmark {what!r}; expected one of {', '.join(OPS)}, all{hint}")
    from ..train.cli import check_device  # cpu, cuda or cuda:N; cuda refused at once on a CPU build of torch

    device = args.device
    check_device(device)
    if args.dtype not in DTYPE_NAMES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_NAMES)}, got {args.dtype!r}")
    sizes = parse_list(args.sizes, "--sizes") or None
    (d,) = parse_list([args.d], "--d") if args.d is not None else (None,)
    groups = parse_list(args.groups, "--groups") or (1000,)
    keep = parse_list(args.keep, "--keep", allow_frac=True) or (0.25,)
    (repeats,) = parse_list([args.repeats], "--repeats") if args.repeats is not None else (None,)
    methods = None
    if args.methods:
        methods = tuple(m for v in args.methods for m in v.split(",") if m)
        bad = [m for m in methods if m not in INFONCE_METHODS]
        if bad:
            raise ValueError(f"--methods: unknown InfoNCE method {bad[0]!r}; expected some of {', '.join(INFONCE_METHODS)}")
    ops = OPS if what == "all" else (what,)
    if sizes and "segment" in ops:
        too_few = [n for n in sizes if n < max(groups)]
        if too_few:
            raise ValueError(f"--sizes: N={too_few[0]} is smaller than --groups {max(groups)} (every group needs rows)")
    return dict(ops=ops, device=device, dtype=args.dtype, sizes=sizes, d=d, groups=groups, keep=keep, repeats=repeats,
                methods=methods, compile_reference=args.compile, memory=not args.no_memory, quiet=args.quiet)


def config_from_args(args, cuda_available: bool):
    """The BenchConfig for parsed arguments (imports torch through .run)."""
    from .run import BenchConfig

    opts = parse_options(args)
    if opts["device"] != "cpu" and not cuda_available:
        raise ValueError(f"--device {opts['device']}: CUDA is not available on this machine "
                         "(no GPU or a CPU build of torch)")
    return BenchConfig(**opts)


def _validate(args) -> None:
    """Every check that needs no torch, answered before the command imports it."""
    if args.markdown is not None:
        if not Path(args.markdown).is_file():
            raise FileNotFoundError(f"--markdown: no such file: {args.markdown}")
        return
    parse_options(args)
    _check_outputs(args)


def _check_outputs(args) -> None:
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is None:
            continue
        parent = Path(path).resolve().parent
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"{flag}: {parent} is not a folder")
    if args.plot is not None:
        if Path(args.plot).suffix.lower() not in PLOT_SUFFIXES:
            raise ValueError(f"--plot: the file must end in {', '.join(PLOT_SUFFIXES)}, got {args.plot!r}")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None


def _bench(args) -> int:
    from . import results

    if args.markdown is not None:  # (args checked by _validate before the command runs)
        sys.stdout.write(results.markdown(results.read_payload(args.markdown), source=Path(args.markdown).name))
        return 0
    import torch

    cfg = config_from_args(args, torch.cuda.is_available())
    if not sys.stderr.isatty():  # a progress bar in a log file or pipe is noise
        import dataclasses

        cfg = dataclasses.replace(cfg, quiet=True)
    from .run import run

    payload = run(cfg)
    written = []
    if args.out:
        written.append(results.write_json(payload, args.out))
    if args.plot:
        written.append(results.plot(payload, args.plot))
    if args.json:
        print(json.dumps(results.nan_to_none(payload), indent=2))
        return 0
    print(results.format_table(payload["rows"]))
    print(results.ceilings_text(payload["ceilings"]) + f"; {payload['env']['machine']}; {payload['wall_s']:.1f} s")
    for path in written:
        print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="kernel throughput vs the installed peers and the machine's ceilings",
                              description=__doc__.split("\n\n")[0], epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", nargs="?", default="all", metavar="{infonce,segment,gather,all}",
                   help="which op family to measure (default all)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--sizes", nargs="+", default=None, metavar="N",
                   help="N values (rows) for every selected op, e.g. 1024 4096 or 64k,1M "
                        "(default: infonce 1k 2k 4k, segment/gather 64k 256k 1M on CPU; larger on CUDA)")
    p.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPE_NAMES)} (default float32)")
    p.add_argument("--d", default=None, help="feature dimension D (default 512 for infonce; 128 CPU / 512 CUDA for segment, gather)")
    p.add_argument("--groups", nargs="+", default=None, metavar="G", help="segment: number of groups (default 1000)")
    p.add_argument("--keep", nargs="+", default=None, metavar="F", help="gather: fraction of columns kept (default 0.25)")
    p.add_argument("--methods", nargs="+", default=None, metavar="M",
                   help="infonce methods (default semcomp and every installed peer): semcomp, semcomp_tile, semcomp_mma, "
                        "semcomp_wgmma, open_clip, "
                        "inf_cl, reference, compiled_reference")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="include torch.compile of the reference (default: on CUDA only; compiling takes ~30 s on 2 cores)")
    p.add_argument("--repeats", default=None, help="timed calls per method after a warm-up (default 3 CPU, 10 CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory call of each method")
    p.add_argument("--json", action="store_true",
                   help="print every row, the ceilings and the machine as JSON on stdout instead of the table")
    p.add_argument("-o", "--out", default=None, metavar="PATH", help="also write that JSON to this file")
    p.add_argument("--plot", default=None, metavar="PATH", help="draw throughput vs N per method (.png, .pdf, .svg)")
    p.add_argument("--markdown", default=None, metavar="JSON",
                   help="print a saved result (-o or --json output) as a markdown table, measure nothing")
    p.add_argument("-q", "--quiet", action="store_true", help="nothing on stderr but errors (no progress bar)")
    p.set_defaults(func=_bench, validate=_validate)
