"""`semcomp` command line. Each family of subcommands lives in its own module exposing
``register(subparsers)``; modules not present in this build are skipped."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that add subcommands: each defines register(subparsers), whose parsers set
# `func(args) -> int` and optionally `validate(args)` (raises ValueError/FileNotFoundError;
# run before the command, without torch). These modules must not import torch at module
# level: `semcomp --help` builds every parser without importing it (see semcomp_cli).
_COMMAND_MODULES = (
    "semcomp_ext.demo",            # demo
    "semcomp_ext.compress.cli",    # compress, verify, gap, eval
    "semcomp_ext.train.cli",       # train, reproduce
    "semcomp_ext.bench.cli",       # bench
)


def _info(args) -> int:
    import json

    import semcomp_ext

    print(json.dumps(semcomp_ext.build_info(), indent=2))
    return 0


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
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="semcomp", description="Semantic compression of multimodal embeddings")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    info = sub.add_parser("info", help="print build information (version, torch, CUDA, OpenMP)")
    info.set_defaults(func=_info)
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # that family is not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "validate", None):
            args.validate(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("semcomp: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"semcomp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
