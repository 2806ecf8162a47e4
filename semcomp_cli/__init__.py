"""Entry point of the `semcomp` console script, kept outside `semcomp_ext` so that `--help`,
`--version` and argument errors are answered without importing torch.

`import semcomp_ext` loads the native extension (and so torch) by design. The subcommand
parsers, however, are defined by modules that import no torch at module level
(`semcomp_ext.cli._COMMAND_MODULES`, each with a `register(subparsers)`). Here they are
imported under a stand-in for the `semcomp_ext` package whose `__init__` is not executed;
the arguments are parsed, and only when a command is actually run is the stand-in dropped,
the real package imported and `semcomp_ext.cli.main` called with the same arguments.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from contextlib import contextmanager

_PKG = "semcomp_ext"


@contextmanager
def _parsers_only():
    """`semcomp_ext` submodules importable without running `semcomp_ext/__init__.py`;
    everything imported under the stand-in is forgotten on exit."""
    if _PKG in sys.modules:  # already imported for real (tests, embedding): nothing to do
        yield
        return
    spec = importlib.util.find_spec(_PKG)
    if spec is None:
        raise ModuleNotFoundError(f"No module named {_PKG!r}", name=_PKG)
    stub = importlib.util.module_from_spec(spec)  # not executed: no torch, no native ops
    sys.modules[_PKG] = stub
    try:
        yield
    finally:
        for name in [n for n in sys.modules if n == _PKG or n.startswith(_PKG + ".")]:
            del sys.modules[name]


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # while torch is imported (the command itself answers its own)
        print("semcomp: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    with _parsers_only():
        try:
            cli = importlib.import_module(_PKG + ".cli")
            parser = cli.build_parser()
        except ImportError:
            # a subcommand module needs the real package at import time: slower, still correct
            parser = None
        if parser is not None:
            args = parser.parse_args(argv)  # --help and usage errors exit here
            if not getattr(args, "func", None):
                parser.print_help()
                return 2
            if getattr(args, "validate", None):  # argument checks that need no torch: answered at once
                try:
                    args.validate(args)
                except (ValueError, FileNotFoundError, FileExistsError) as exc:
                    print(f"semcomp {args.command}: error: {exc}", file=sys.stderr)
                    return 2
    import gc

    # Importing the real package (torch, native ops) creates ~170k objects; the collector's
    # passes over them during the import cost ~0.5 s of a 2 s start-up. Collect nothing while
    # importing, then set those objects aside for good (they live as long as the process).
    gc.disable()
    try:
        from semcomp_ext.cli import main as run  # the real package: torch, native ops
    finally:
        gc.freeze()
        gc.enable()
    return run(argv)
