"""`semcomp` command line. Each family of subcommands lives in its own module exposing
``register(subparsers)``; modules not present in this build are skipped.

Conventions every subcommand follows (checked by tests/test_cli_consistency.py):
``-o/--out PATH`` where the command writes, ``--json`` = JSON on stdout instead of the human
table, ``-q`` = nothing on stderr but errors, ``--seed`` = the random-feature-selection seed,
``--k`` = the neighbour count. Renamed options keep their old spelling as a hidden alias
(``add_alias``) for one release; using one prints a notice (not under ``-q``).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys

# Modules that add subcommands: each defines register(subparsers), whose parsers set
# `func(args) -> int` and optionally `validate(args)` (raises ValueError/FileNotFoundError;
# run before the command, without torch). These modules must not import torch at module
# level: `semcomp --help` builds every parser without importing it (see semcomp_cli).
_COMMAND_MODULES = (
    "semcomp_ext.demo",            # demo
    "semcomp_ext.compress.cli",    # compress, verify, gap, eval, index, search
    "semcomp_ext.train.cli",       # train, reproduce
    "semcomp_ext.bench.cli",       # bench
)
_DIST = "semcomp-ext"


def version() -> str:
    """The installed distribution's version, read from its metadata (no torch)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(_DIST)
    except PackageNotFoundError:
        return "unknown (not installed)"


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states a default,
    or the default is None/False (an optional value, a flag)."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (action.option_strings and "default" not in text and d is not None and d is not False
                and d is not argparse.SUPPRESS and not isinstance(action, argparse._HelpAction)):
            shown = ",".join(str(v) for v in d) if isinstance(d, (tuple, list)) else d
            text += f" (default: {shown})".replace("%", "%%")
        return text


class _Parser(argparse.ArgumentParser):
    """A subcommand's parser. Its own errors (a required option missing, a bad value) also
    name the unknown flags of the command line: `--ot x` where `-o/--out` is required."""

    argv: list = []  # the command line being parsed (set by _TopParser.parse_args)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        known = list(self._option_string_actions)
        unknown = [w.split("=", 1)[0] for w in _Parser.argv if w.startswith("-") and len(w) > 1
                   and not _is_number(w) and not any(o.startswith(w.split("=", 1)[0]) for o in known)]
        if unknown and not message.startswith("unrecognized arguments"):
            near = _suggest(unknown[0], visible_options(self))
            message += f" (unrecognized: {' '.join(unknown)}" + (f"; did you mean {near}?)" if near else ")")
        super().error(message)


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


# ---- renamed options ------------------------------------------------------------------------

class _RenamedOption(argparse.Action):
    """The hidden old spelling of a renamed option: stores into the new option's dest and
    records the rename, so that `main` prints one notice (unless -q)."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        renamed = list(getattr(namespace, "_renamed", None) or [])
        renamed.append((option_string, self.new))
        namespace._renamed = renamed


def add_alias(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept `old` (hidden from --help) as a spelling of the existing option `new`: same
    destination, type, number of values and choices."""
    target = parser._option_string_actions[new]
    kwargs = dict(dest=target.dest, action=_RenamedOption, new=new, help=argparse.SUPPRESS,
                  default=argparse.SUPPRESS, nargs=target.nargs, const=target.const)
    if target.nargs != 0:
        kwargs.update(type=target.type, choices=target.choices, metavar=target.metavar)
    parser.add_argument(old, **kwargs)


def renamed_notices(args) -> list:
    """One line per old option spelling used on this command line."""
    return [f"semcomp {args.command}: {old} is now {new} (the old spelling will be removed in the next release)"
            for old, new in getattr(args, "_renamed", None) or []]


# ---- mistakes: the subcommand's usage, with "did you mean" -----------------------------------

def visible_options(parser: argparse.ArgumentParser) -> list:
    """The option strings --help shows (hidden aliases left out)."""
    return [s for a in parser._actions if a.help is not argparse.SUPPRESS for s in a.option_strings]


def _suggest(word: str, candidates) -> str | None:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return close[0] if close else None


def unrecognized_message(extras: list, parser: argparse.ArgumentParser, argv: list) -> str:
    """"unrecognized arguments: ..." with a "did you mean" for each mistyped flag; the old
    `--json PATH` (now `-o PATH`) is named as such."""
    msg = f"unrecognized arguments: {' '.join(extras)}"
    hints = []
    own = visible_options(parser)
    for word in extras:
        flag = word.split("=", 1)[0]
        if flag.startswith("-") and flag not in own:
            near = _suggest(flag, own)
            if near:
                hints.append(f"did you mean {near}?")
        elif flag in own:  # a subcommand's option given before the subcommand
            hints.append(f"{flag} goes after the command name")
        elif "--json" in own and word in argv and argv.index(word) > 0 and argv[argv.index(word) - 1] == "--json":
            hints.append(f"--json takes no value: it prints JSON on stdout; write the file with -o {word}")
    if any(w in ("-o", "--out") or w.startswith("--out=") for w in extras) and "--out" not in own:
        hints.append(f"{parser.prog} writes no output file")
    if hints:
        msg += " (" + "; ".join(dict.fromkeys(hints)) + ")"
    return msg


class _TopParser(argparse.ArgumentParser):
    """Unrecognised arguments are reported by the subcommand's parser (its usage, not the
    top-level one), with close matches suggested."""

    def subparser(self, command: str | None):
        for a in self._actions:
            if isinstance(a, argparse._SubParsersAction) and command in a.choices:
                return a.choices[command]
        return None

    def commands(self) -> dict:
        for a in self._actions:
            if isinstance(a, argparse._SubParsersAction):
                return dict(a.choices)
        return {}

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        _Parser.argv = argv
        try:
            ns, extras = self.parse_known_args(argv, namespace)
        finally:
            _Parser.argv = []
        if extras:
            target = self.subparser(getattr(ns, "command", None)) or self
            target.error(unrecognized_message(extras, target, argv))
        return ns

    def error(self, message: str):
        if message.startswith("argument COMMAND: invalid choice"):
            word = message.split("'")[1] if "'" in message else ""
            near = _suggest(word, self.commands())
            message = f"unknown command {word!r}" + (f" (did you mean {near}?)" if near else "") + \
                f"; commands: {', '.join(self.commands())}"
        super().error(message)


# ---- info --------------------------------------------------------------------------------------

# (distribution(s), module, what needs it)
BACKENDS = (
    (("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss"), "faiss", "compress --codec faiss:/pq:, index, search"),
    (("s3fs",), "s3fs", "s3:// inputs and outputs"),
    (("ray",), "ray", "compress --engine ray"),
    (("pyarrow",), "pyarrow", "parquet inputs, metadata, CompressedFolder.metadata()"),
    (("sentence-transformers",), "sentence_transformers", "semcomp_ext.integrations (SentenceTransformer losses)"),
    (("transformers",), "transformers", "semcomp_ext.integrations (Hugging Face CLIP models)"),
    (("open_clip_torch",), "open_clip", "train, reproduce, ClipLoss drop-in"),
    (("matplotlib",), "matplotlib", "bench --plot, reproduce plots"),
)


def backends() -> list:
    """Whether each optional back-end is importable (found on the path; not imported: ray
    alone takes seconds) and its installed version."""
    import importlib.util
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    rows = []
    for dists, module, used_by in BACKENDS:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        ver = None
        for d in dists:
            try:
                ver = dist_version(d)
                break
            except PackageNotFoundError:
                continue
        rows.append({"name": dists[0].replace("-cpu", "").replace("_torch", ""), "module": module,
                     "available": found, "version": ver if found else None, "used_by": used_by})
    return rows


def info_report() -> dict:
    """Build information and the optional back-ends. (`build_info()`'s
    `infonce_dk_accumulate` is left out: it is decided by the first CUDA bf16/fp16 backward
    of a process, so a fresh `semcomp info` could only ever say "not yet used".)"""
    import semcomp_ext

    build = {k: v for k, v in semcomp_ext.build_info().items() if k != "infonce_dk_accumulate"}
    return build | {"backends": backends()}


def format_info(rep: dict) -> str:
    archs = ", ".join(rep["cuda_archs"]) or "-"
    lines = [f"semcomp {rep['version']}",
             f"  torch      {rep['torch_runtime']} (extension built against {rep['torch_version']})",
             f"  CUDA       {'compiled, archs ' + archs if rep['cuda'] else 'not compiled (CPU kernels only)'}",
             f"  OpenMP     {'yes' if rep['openmp'] else 'no'}; CPU kernels use {rep['num_threads']} thread(s)",
             "optional back-ends:"]
    w = max(len(b["name"]) for b in rep["backends"])
    for b in rep["backends"]:
        state = (b["version"] or "installed") if b["available"] else "not installed"
        lines.append(f"  {b['name']:<{w}}  {state:<14} {b['used_by']}")
    return "\n".join(lines)


def _info(args) -> int:
    import json

    rep = info_report()
    print(json.dumps(rep, indent=2) if args.json else format_info(rep))
    return 0


def _register_info(sub) -> None:
    info = sub.add_parser("info", help="version, build (torch, CUDA, OpenMP) and the optional back-ends found")
    info.add_argument("--json", action="store_true", help="JSON on stdout instead of the table")
    info.add_argument("-q", "--quiet", action="store_true", help="nothing on stderr but errors")
    info.set_defaults(func=_info)


def build_parser() -> _TopParser:
    parser = _TopParser(prog="semcomp", description="Semantic compression of multimodal embeddings",
                        epilog="Every command takes --json (JSON on stdout instead of the table) and -q (nothing "
                               "on stderr but errors); a command that writes files takes -o/--out PATH. "
                               "`semcomp COMMAND --help` lists a command's options.")
    parser.add_argument("-V", "--version", action="version", version=f"semcomp {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _register_info(sub)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that family is not part of this build
            raise
        module.register(sub)
    for p in parser.commands().values():  # `semcomp CMD --version` too (hidden from CMD's help)
        if "--version" not in p._option_string_actions:
            p.add_argument("-V", "--version", action="version", version=f"semcomp {version()}", help=argparse.SUPPRESS)
    return parser


def interrupted_message(parser: _TopParser, command: str | None) -> str:
    """Ctrl-C: one line, naming how to continue where the command can resume."""
    sub = parser.subparser(command)
    if sub is not None and "--resume" in sub._option_string_actions:
        return f"semcomp {command}: interrupted; continue with the same command and --resume"
    return f"semcomp {command}: interrupted" if command else "semcomp: interrupted"


# -q: Ray's own INFO/WARNING lines and Ray Data's progress report off. Ray reads these when it
# is imported or started (here and in its worker processes); a value the user set is kept.
QUIET_ENV = {"RAY_LOGGER_LEVEL": "error", "RAY_DATA_LOG_LEVEL": "ERROR", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "quiet", False):
        import os

        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)
    else:
        for line in renamed_notices(args):
            print(line, file=sys.stderr)
    try:
        if getattr(args, "validate", None):
            args.validate(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(interrupted_message(parser, args.command), file=sys.stderr)
        return 130
    except BrokenPipeError:  # `semcomp ... | head`: the reader left; no traceback, no second error at exit
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"semcomp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
