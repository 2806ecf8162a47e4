"""The `semcomp` command line: info and the demo (main job of the README)."""

import json
import subprocess
import sys

from semcomp_ext.cli import main
from semcomp_ext.demo import run_demo


def test_info_prints_build_json(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["openmp"] is True and "version" in info
    assert "infonce_dk_accumulate" not in info  # decided by a process's first CUDA backward: never set here
    by = {b["name"]: b for b in info["backends"]}
    assert {"faiss", "s3fs", "ray", "pyarrow", "sentence-transformers", "transformers"} <= by.keys()
    from importlib.metadata import version

    assert by["pyarrow"] == {"name": "pyarrow", "module": "pyarrow", "available": True, "version": version("pyarrow"),
                             "used_by": by["pyarrow"]["used_by"]}


def test_info_table_and_a_missing_backend(capsys, monkeypatch):
    import importlib.util

    from semcomp_ext import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    import semcomp_ext

    assert out.startswith(f"semcomp {semcomp_ext.__version__}\n") and "optional back-ends:" in out
    ray = next(line for line in out.splitlines() if line.strip().startswith("ray "))
    assert "not installed" in ray and "--engine ray" in ray
    assert not next(b for b in cli.backends() if b["name"] == "ray")["available"]


def test_info_does_not_import_ray():
    code = ("import sys; from semcomp_ext.cli import backends; backends(); "
            "assert 'ray' not in sys.modules and 'faiss' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: semcomp" in capsys.readouterr().out


def test_demo_results_are_sane():
    import torch

    lines = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: two spinning OpenMP threads on a loaded machine cost 10x the time
    try:
        res = run_demo(gaps=(0.2, 1.0), drop_rates=(0.5, 0.95), seeds_rfs=2, out=lines.append)
    finally:
        torch.set_num_threads(threads)
    small, large = res["runs"]
    assert small["modality_gap"] < large["modality_gap"]  # the gap setting controls the measured gap
    rows = {r["representation"]: r for r in small["rows"]}
    concat, cent = rows["concat(image, text)"], rows["centroid"]
    assert cent["bytes_per_item"] * 2 == concat["bytes_per_item"]
    assert cent["accuracy"] >= concat["accuracy"] - 0.05  # centroid ~ concat at half the bytes
    assert rows["centroid + RFS drop 95%"]["accuracy"] < cent["accuracy"]  # dropping 95% costs something
    assert rows["centroid + RFS drop 95%"]["compression_ratio"] > 30
    assert any("modality gap" in line for line in lines)


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "semcomp_ext.cli", "info", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"]


# ---- the `semcomp` launcher (semcomp_cli): help and argument errors without torch --------

import os  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# run `semcomp_cli` as the console script does, then report whether torch got imported
_PROBE = ("import sys, semcomp_cli\n"
          "try:\n    rc = semcomp_cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
          "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\n"
          "sys.exit(rc)\n")


def _launch(*argv):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, cwd=ROOT, timeout=120)
    return r, time.perf_counter() - t0


@pytest.mark.parametrize("argv", [["--help"], ["compress", "--help"], ["train", "--help"], ["eval", "--help"]])
def test_help_does_not_import_torch(argv):
    r, wall = _launch(*argv)
    assert r.returncode == 0, r.stderr
    assert "usage: semcomp" in r.stdout
    assert "NO_TORCH" in r.stderr  # the parsers were built without torch
    assert wall < 5  # ~0.3 s on an idle machine (torch alone takes ~2 s); generous for a loaded one


@pytest.mark.parametrize("argv, expect", [
    (["train", "--out", "o", "--device", "gpu"], "--device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["train", "--out", "o", "--pretrained", "/missing.pt"], "--pretrained: no such file: /missing.pt"),
    (["train", "--out", "o", "--steps", "0"], "--steps must be >= 1"),
    (["reproduce", "--drop-rates", "0.5,1.5"], "--drop-rates must be in [0, 1)"),
])
def test_train_arguments_fail_at_once_in_one_line(argv, expect):
    r, _ = _launch(*argv)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln not in ("NO_TORCH",)]
    assert lines == [f"semcomp {argv[0]}: error: {expect}"] or (len(lines) == 1 and expect in lines[0]), r.stderr
    assert "Traceback" not in r.stderr and "NO_TORCH" in r.stderr  # checked before torch or a model


def test_device_cuda_on_a_cpu_build_is_refused_at_once():
    from semcomp_ext.train import cli as tcli

    import torch

    if torch.version.cuda is not None or getattr(torch.version, "hip", None):
        pytest.skip("this torch is a CUDA build")
    assert tcli._torch_has_cuda() is False
    r, _ = _launch("train", "--out", "o", "--device", "cuda")
    assert r.returncode == 2 and "CPU-only build" in r.stderr and "Traceback" not in r.stderr


def test_tiny_constant_matches_models():
    from semcomp_ext.train import cli as tcli
    from semcomp_ext.train.models import TINY

    assert tcli.TINY == TINY


def _all_actions(parser):
    import argparse

    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sp in a.choices.items():
                yield from ((name, x) for x in sp._actions)


def test_every_option_has_help_and_defaults_are_shown():
    from semcomp_ext.cli import build_parser

    parser = build_parser()
    mine = {"info", "demo", "compress", "verify", "gap", "eval", "index", "search", "train", "reproduce", "bench"}
    missing = [(cmd, a.option_strings or a.dest) for cmd, a in _all_actions(parser)
               if cmd in mine and not a.help]
    assert not missing
    sub = next(a for a in parser._actions if a.choices and "compress" in a.choices).choices
    text = sub["compress"].format_help()
    from semcomp_ext.compress.readers import DEFAULT_BATCH_ROWS

    flat = " ".join(text.split())
    assert f"(default: {DEFAULT_BATCH_ROWS})" in flat or f"default {DEFAULT_BATCH_ROWS})" in flat
    assert "(default: 0.001)" in " ".join(sub["train"].format_help().split())


def test_console_script_is_the_torch_free_launcher():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)
    assert cfg["project"]["scripts"]["semcomp"] == "semcomp_cli:main"
    assert "semcomp_cli" in cfg["tool"]["scikit-build"]["wheel"]["packages"]  # shipped in the wheel
