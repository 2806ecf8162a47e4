"""The `semcomp` command line: info and the demo (main job of the README)."""

import json
import subprocess
import sys

from semcomp_ext.cli import main
from semcomp_ext.demo import run_demo


def test_info_prints_build_json(capsys):
    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["openmp"] is True and "version" in info


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: semcomp" in capsys.readouterr().out


def test_demo_results_are_sane():
    lines = []
    res = run_demo(gaps=(0.2, 1.0), drop_rates=(0.5, 0.95), seeds_rfs=2, out=lines.append)
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
    out = subprocess.run([sys.executable, "-m", "semcomp_ext.cli", "info"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"]
