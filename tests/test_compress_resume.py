"""kill -9 mid-run, then --resume: byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("pyarrow")

from semcomp_ext.compress.manifest import load_state

from _compress_data import make_clip_layout, make_concepts, tree_sha

ROWS = (40, 41, 42, 43, 44, 45)


def _cmd(*args):
    return [sys.executable, "-m", "semcomp_ext.cli", "compress", *map(str, args), "-q"]


@pytest.mark.parametrize("mode", ["pairs", "concepts"])
def test_kill9_then_resume_is_identical(tmp_path, mode):
    make_clip_layout(tmp_path / "in", rows=ROWS)
    extra = ["--drop-rate", "0.5", "--batch-size", "16"]
    if mode == "concepts":
        make_concepts(tmp_path / "ids", rows=ROWS)
        extra += ["--concepts", tmp_path / "ids", "--partitions", "3"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(_cmd(tmp_path / "in", "-o", ref, *extra), check=True)

    env = dict(os.environ, SEMCOMP_TEST_SLEEP_PER_SHARD="0.3")
    p = subprocess.Popen(_cmd(tmp_path / "in", "-o", out, *extra), env=env)
    key = "shards" if mode == "pairs" else "maps"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until some (not all) tasks are committed (manifest + journal)
        try:
            done = len(load_state(str(out)).get(key, []))
        except (FileNotFoundError, ValueError):
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    m = load_state(str(out))
    assert m["status"] == "in_progress" and 2 <= len(m[key]) < len(ROWS)
    assert json.loads((out / "manifest.json").read_text())["status"] == "in_progress"
    assert subprocess.run(_cmd(tmp_path / "in", "-o", out, *extra)).returncode == 2  # not empty, no --resume
    subprocess.run(_cmd(tmp_path / "in", "-o", out, *extra, "--resume"), check=True)
    assert tree_sha(out) == tree_sha(ref)  # every file, manifest included
    # resuming with different parameters is refused
    r = subprocess.run(_cmd(tmp_path / "in", "-o", out, "--drop-rate", "0.25", "--resume"), capture_output=True, text=True)
    assert r.returncode == 2 and "parameters differ" in r.stderr
