"""Every `semcomp` subcommand speaks the same dialect. The subcommands are discovered from the
parser, so a new one is held to these rules as soon as it is registered:

- `semcomp --version` / `-V` (also after a command), answered without importing torch;
- `-o/--out PATH` on every command that writes files it is told to write;
- `--json`: one JSON document on stdout instead of the table, for every command;
- `-q`: nothing on stderr but errors, for every command;
- `--seed` only ever means the random-feature-selection seed, `--k` the neighbour count;
- an unknown flag shows the subcommand's usage with "did you mean"; `-o` where a command
  writes nothing says so;
- old spellings kept as hidden aliases parse to the same setting as the new ones;
- Ctrl-C: one line, with `--resume` where the command can resume.

Each command runs once for real on tiny inputs (`--json -q`, in this process), so the output
rules are checked on the actual output paths.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from semcomp_ext import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARSER = cli.build_parser()
COMMANDS = PARSER.commands()
# commands that write files the user names (-o/--out); the others only read, or write into
# the folder they are given (`index` adds DIR/index/)
WRITERS = {"compress", "train", "reproduce", "bench", "demo"}
# renames the issue asked for, old -> new, per command (more may exist: see test_every_alias_*)
REQUIRED_ALIASES = {"reproduce": {"--knn-k": "--k", "--seeds": "--train-seeds"}, "eval": {"--rfs-seed": "--seed"},
                    "index": {"--seed": "--sample-seed"}, "train": {"--seed": "--train-seed"},
                    "demo": {"--seed": "--data-seed"}}


def _options(cmd: str) -> dict:
    return COMMANDS[cmd]._option_string_actions


def _required_argv(cmd: str) -> list:
    """The least a command line needs to get past argparse: a dummy per required positional
    and required option."""
    argv = []
    for a in COMMANDS[cmd]._actions:
        if not a.option_strings and a.nargs in (None, 1, "+"):
            argv.append("x")
        elif a.option_strings and a.required:
            argv += [a.option_strings[-1], "x"]
    return argv


def _usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    return err


# ---- names -----------------------------------------------------------------------------------

def test_every_command_is_covered():
    assert set(COMMANDS) == set(RECIPES), "a new command needs a tiny invocation in RECIPES"
    assert WRITERS <= set(COMMANDS)


@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_quiet_json_and_out_flags(cmd):
    opts = _options(cmd)
    assert opts["-q"] is opts["--quiet"] and opts["-q"].nargs == 0, f"{cmd}: -q/--quiet"
    assert "--json" in opts and opts["--json"].nargs == 0, f"{cmd}: --json is a flag (JSON on stdout)"
    if cmd in WRITERS or "--out" in opts:
        assert opts.get("-o") is opts.get("--out") is not None, f"{cmd}: -o and --out"
        assert opts["--out"].nargs is None and opts["--out"].help is not argparse.SUPPRESS
    visible = cli.visible_options(COMMANDS[cmd])
    assert not [o for o in visible if "knn" in o], f"{cmd}: the neighbour count is --k"
    seed = opts.get("--seed")
    if seed is not None and seed.help is not argparse.SUPPRESS:
        assert "RFS" in seed.help or "feature selection" in seed.help, f"{cmd}: --seed is the RFS seed: {seed.help}"


def test_version_without_torch():
    """The console script's launcher: --version, -V and `CMD --version` without importing torch."""
    code = ("import sys, semcomp_cli\n"
            "for argv in (['--version'], ['-V'], ['gap', '--version']):\n"
            "    try:\n        semcomp_cli.main(argv)\n    except SystemExit as e:\n        assert e.code == 0, e.code\n"
            "print('torch' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    from importlib.metadata import version

    *versions, torch_imported = r.stdout.splitlines()
    assert versions == [f"semcomp {version('semcomp-ext')}"] * 3 and torch_imported == "False"


# ---- mistakes --------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", sorted(COMMANDS))
def test_unknown_flag_shows_the_command_usage_and_a_suggestion(cmd, capsys):
    err = _usage_error(capsys, [cmd, *_required_argv(cmd), "--quite"])
    assert err.startswith(f"usage: semcomp {cmd} "), err
    assert err.splitlines()[-1] == f"semcomp {cmd}: error: unrecognized arguments: --quite (did you mean --quiet?)"
    if "--out" not in _options(cmd):
        err = _usage_error(capsys, [cmd, *_required_argv(cmd), "-o", "out"])
        assert err.startswith(f"usage: semcomp {cmd} ")
        last = err.splitlines()[-1]  # ("out" itself may be taken as an input path)
        assert last.startswith(f"semcomp {cmd}: error: unrecognized arguments: -o")
        assert last.endswith(f"(semcomp {cmd} writes no output file)")


def test_mistakes_through_the_launcher_name_the_command():
    r = subprocess.run([sys.executable, "-c", "import sys, semcomp_cli; rc = semcomp_cli.main(sys.argv[1:]); "
                        "assert 'torch' not in sys.modules; sys.exit(rc)", "eval", "a", "b", "--drop-rats", "0.5"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("usage: semcomp eval "), r.stderr
    assert "unrecognized arguments: --drop-rats 0.5 (did you mean --drop-rates?)" in r.stderr.splitlines()[-1]


def test_a_mistyped_required_option_is_named(capsys):
    err = _usage_error(capsys, ["compress", "a.npy", "b.npy", "--ot", "x"])
    assert err.startswith("usage: semcomp compress ")
    assert err.splitlines()[-1] == ("semcomp compress: error: the following arguments are required: -o/--out "
                                    "(unrecognized: --ot; did you mean --out?)")


def test_unknown_command_suggests_one(capsys):
    err = _usage_error(capsys, ["compres"])
    assert "unknown command 'compres' (did you mean compress?)" in err


# ---- aliases ---------------------------------------------------------------------------------

def _value(action) -> list:
    if action.nargs == 0:
        return []
    if action.choices:
        return [str(next(iter(action.choices)))]
    return ["3"]


def _renamed():
    """Every hidden option that sets what a visible one sets: an old spelling."""
    for cmd, p in COMMANDS.items():
        visible = {a.dest for a in p._actions if a.option_strings and a.help is not argparse.SUPPRESS}
        for a in p._actions:
            if a.option_strings and a.help is argparse.SUPPRESS and a.dest in visible and "--version" not in a.option_strings:
                yield cmd, a


@pytest.mark.parametrize("cmd, alias", [(c, a) for c, a in _renamed()], ids=lambda v: getattr(v, "option_strings", [v])[0])
def test_every_alias_sets_what_the_new_spelling_sets(cmd, alias, capsys):
    assert isinstance(alias, cli._RenamedOption), f"{cmd} {alias.option_strings}: use semcomp_ext.cli.add_alias"
    old, new = alias.option_strings[0], alias.new
    base = [cmd, *_required_argv(cmd)]
    via_old = cli.build_parser().parse_args([*base, old, *_value(alias)])
    via_new = cli.build_parser().parse_args([*base, new, *_value(alias)])
    assert getattr(via_old, alias.dest) == getattr(via_new, alias.dest) != COMMANDS[cmd].get_default(alias.dest)
    assert old not in COMMANDS[cmd].format_help()  # hidden
    assert cli.renamed_notices(via_old) == [f"semcomp {cmd}: {old} is now {new} (the old spelling will be removed "
                                            "in the next release)"]


def test_required_aliases_exist():
    found = {(c, a.option_strings[0]): getattr(a, "new", None) for c, a in _renamed()}
    for cmd, pairs in REQUIRED_ALIASES.items():
        for old, new in pairs.items():
            assert found.get((cmd, old)) == new, f"semcomp {cmd} {old}"


def test_alias_notice_is_silenced_by_quiet(capsys, monkeypatch):
    from semcomp_ext.train import cli as tcli

    seen = []
    monkeypatch.setattr(tcli, "_reproduce", lambda args: seen.append(args.k) or 0)  # main registers it anew
    assert cli.main(["reproduce", "--knn-k", "7"]) == 0
    assert capsys.readouterr().err == "semcomp reproduce: --knn-k is now --k (the old spelling will be removed in the next release)\n"
    assert cli.main(["reproduce", "--knn-k", "5", "-q"]) == 0
    assert capsys.readouterr().err == "" and seen == [7, 5]


# ---- -q and Ray ------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _quiet_env_restored(monkeypatch):
    """-q sets process environment (below): put it back after each test of this file."""
    for key in cli.QUIET_ENV:
        monkeypatch.setenv(key, "recorded")  # records the original value (or its absence) for teardown
        monkeypatch.delenv(key)


def test_quiet_turns_rays_logs_off(monkeypatch, capsys):
    """-q sets the environment Ray reads for its log level and Ray Data's progress report (so
    `compress --engine ray -q` prints nothing; a real Ray start takes ~5 s, so here: the values
    set, and that this Ray reads them)."""
    monkeypatch.setattr(cli, "_info", lambda args: 0)
    assert cli.main(["info"]) == 0 and not set(cli.QUIET_ENV) & set(os.environ)
    assert cli.main(["info", "-q"]) == 0
    assert {k: os.environ[k] for k in cli.QUIET_ENV} == cli.QUIET_ENV
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        return
    code = ("import logging, ray._private.ray_constants as c, ray.data.context as d\n"
            "assert logging.getLevelName(c.LOGGER_LEVEL.upper()) == logging.ERROR, c.LOGGER_LEVEL\n"
            "assert d.DEFAULT_ENABLE_PROGRESS_BARS is False\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **cli.QUIET_ENV}, timeout=120)


# ---- Ctrl-C ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cmd", ["train", "gap"])
def test_interrupt_is_one_line_with_the_way_to_continue(cmd, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    from semcomp_ext.compress import cli as ccli
    from semcomp_ext.train import cli as tcli

    monkeypatch.setattr(tcli, "_validate_train", lambda args: None)
    monkeypatch.setattr(tcli, "_train", interrupted)
    monkeypatch.setattr(ccli, "_gap", interrupted)
    monkeypatch.setattr(ccli, "_check_inputs", lambda args: None, raising=False)
    assert cli.main([cmd, *_required_argv(cmd)]) == 130
    err = capsys.readouterr().err
    want = f"semcomp {cmd}: interrupted" + ("; continue with the same command and --resume" if cmd == "train" else "")
    assert err == want + "\n"


# ---- real runs: --json on stdout, -q on stderr, -o writes ---------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("consistency")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 96)
    centres = rng.standard_normal((4, 16)) * 2
    for name in ("img_emb.npy", "text_emb.npy"):
        np.save(d / name, (centres[y] + rng.standard_normal((96, 16))).astype(np.float32))
    np.save(d / "labels.npy", y)
    np.save(d / "q.npy", rng.standard_normal((2, 16)).astype(np.float32))
    assert cli.main(["compress", str(d / "img_emb.npy"), str(d / "text_emb.npy"), "-o", str(d / "c"), "-q"]) == 0
    return d


def _emb(d):
    return [str(d / "img_emb.npy"), str(d / "text_emb.npy")]


# one tiny invocation per command: (argv for a data folder d and an output path o, what -o must create)
RECIPES = {
    "info": lambda d, o: ["info"],
    "demo": lambda d, o: ["demo", "--gap", "1.0", "-o", o],
    "compress": lambda d, o: ["compress", *_emb(d), "-o", o, "--drop-rate", "0.5"],
    "verify": lambda d, o: ["verify", str(d / "c")],
    "gap": lambda d, o: ["gap", *_emb(d)],
    "eval": lambda d, o: ["eval", *_emb(d), "--labels", str(d / "labels.npy"), "--drop-rates", "0.5"],
    "index": lambda d, o: ["index", str(d / "c")],
    "search": lambda d, o: ["search", str(d / "c"), "--query", str(d / "q.npy"), "--k", "3"],
    "train": lambda d, o: ["train", "-o", o, "--dataset", "digits", "--limit", "64", "--batch-size", "32",
                           "--steps", "1", "--warmup", "1"],
    "reproduce": lambda d, o: ["reproduce", "-o", o, "--datasets", "digits", "--temperatures", "0.1", "--steps", "1",
                               "--warmup", "1", "--limit", "64", "--batch-size", "32", "--drop-rates", "0,0.9",
                               "--train-seeds", "0", "--rfs-seeds", "0", "--reps", "20"],
    "bench": lambda d, o: ["bench", "gather", "--sizes", "256", "--d", "16", "--repeats", "1", "--no-memory", "-o", o],
}


@pytest.fixture
def one_thread(monkeypatch):
    """Tiny inputs: one intra-op thread (two spinning OpenMP threads on a loaded 2-core machine
    cost 10x the CPU), and the bench's ceilings stubbed (measuring them takes seconds and is not
    what this file tests)."""
    import torch

    from semcomp_ext.bench import run as brun

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setattr(brun, "ceilings", lambda device, dtype, **kw: {
        "dtype": "float32", "matmul_tflops": 1.0, "matmul_n": 1024, "copy_gb_per_s": 10.0, "copy_bytes": 1 << 26})
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("cmd", sorted(RECIPES))
def test_json_on_stdout_nothing_on_stderr_with_q(cmd, data, tmp_path, capfd, one_thread):
    out = tmp_path / ("out.json" if cmd in ("bench", "demo") else "out")
    argv = RECIPES[cmd](data, str(out)) + ["--json", "-q"]
    rc = cli.main(argv)
    stdout, stderr = capfd.readouterr()
    assert rc == 0, stderr
    assert stderr == "", f"-q: {stderr[:500]}"
    json.loads(stdout)  # exactly one JSON document
    if cmd in WRITERS:
        assert out.exists(), f"{cmd} -o"


@pytest.mark.parametrize("cmd", ["compress", "eval", "gap", "index", "info", "search", "verify"])
def test_quiet_alone_keeps_stderr_empty(cmd, data, tmp_path, capfd, one_thread):
    """-q without --json (the human output path) on the commands that take well under a second."""
    rc = cli.main(RECIPES[cmd](data, str(tmp_path / "out")) + ["-q"])
    stdout, stderr = capfd.readouterr()
    assert rc == 0 and stderr == "", stderr[:500]
