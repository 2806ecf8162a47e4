"""The compress / verify / gap / eval / index / search command lines as a user meets them: one
line per error (no traceback, no secret), the same flags meaning the same thing, progress as
log lines when stderr is not a terminal, ratios that count every stored byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from semcomp_ext.cli import main

from _compress_data import make_clip_layout

SECRET = "semcompSecretDoNotLog/0123456789abcdef"


def _run(capsys, *args):
    rc = main([*map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    make_clip_layout(root / "in", rows=(60, 60))
    assert main(["compress", str(root / "in"), "-o", str(root / "out"), "--drop-rate", "0.5", "-q"]) == 0
    np.save(root / "q.npy", np.ones((2, 16), np.float32))
    return root


def test_json_into_a_closed_pipe_is_quiet(folder):
    """`semcomp search ... --json | head -c 1`: no BrokenPipeError traceback."""
    cmd = (f"{sys.executable} -m semcomp_ext.cli search {folder / 'out'} --query {folder / 'q.npy'} --exact --json "
           f"| head -c 1")
    p = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
    assert p.stdout == "[" and "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr


@pytest.mark.parametrize("cmd", ["gap", "eval", "compress", "verify", "index", "search"])
def test_storage_options_everywhere_and_never_echoed(folder, tmp_path, capsys, cmd):
    so = json.dumps({"secret": SECRET, "not_an_option": SECRET})
    args = {"gap": ["gap", "s3://nobucket/in"], "eval": ["eval", "s3://nobucket/in", "--drop-rates", "0.5"],
            "compress": ["compress", "s3://nobucket/in", "-o", tmp_path / "o"], "verify": ["verify", "s3://nobucket/o"],
            "index": ["index", "s3://nobucket/o"], "search": ["search", "s3://nobucket/o", "--query", folder / "q.npy"]}
    rc, out, err = _run(capsys, *args[cmd], "--storage-options", so)
    assert rc == 2 and SECRET not in out + err
    assert "storage-options" in _one_line(err), err
    # bad JSON: named, not echoed
    rc, out, err = _run(capsys, *args[cmd], "--storage-options", '{"secret": "' + SECRET + '"')
    assert rc == 2 and SECRET not in out + err and "--storage-options" in _one_line(err)


def test_eval_refuses_inputs_the_folder_was_not_made_from(folder, tmp_path, capsys):
    make_clip_layout(tmp_path / "other", rows=(60, 60), seed=9)  # same shape and row count, other data
    rc, out, err = _run(capsys, "eval", tmp_path / "other", "--compressed", folder / "out")
    line = _one_line(err)
    assert rc == 2 and "not the input" in line and "--force" in line
    rc, out, err = _run(capsys, "eval", tmp_path / "other", "--compressed", folder / "out", "--force", "-q")
    assert rc == 0 and "NN recall" in out
    rc, out, err = _run(capsys, "eval", folder / "in", "--compressed", folder / "out", "-q")
    assert rc == 0 and "compressed out" in out  # its own inputs: accepted


def test_eval_on_a_url(tmp_path, capsys):
    """eval reads inputs and the compressed folder from a URL (fsspec memory://)."""
    import fsspec

    make_clip_layout(tmp_path / "in", rows=(30, 30), metadata=False)
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "in"), "/semcomp-eval/in", recursive=True)
    assert main(["compress", "memory://semcomp-eval/in", "-o", "memory://semcomp-eval/out", "--drop-rate", "0.5",
                 "-q"]) == 0
    rc, out, err = _run(capsys, "eval", "memory://semcomp-eval/in", "--compressed", "memory://semcomp-eval/out", "--json")
    assert rc == 0, err
    rep = json.loads(out)
    assert rep["rows"] == 60 and rep["neighbour_recall"]["compressed"] > 0


def test_nan_messages_name_the_file(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", rows=(20, 20), metadata=False)
    bad = tmp_path / "in" / "text_emb" / "text_emb_0001.npy"
    x = np.load(bad)
    x[3, 2] = np.nan
    np.save(bad, x)
    for cmd in (["gap", tmp_path / "in"], ["eval", tmp_path / "in", "--drop-rates", "0.5"]):
        rc, _, err = _run(capsys, *cmd)
        line = _one_line(err)
        assert rc == 2 and "text_emb_0001.npy at row 3" in line and "--resume" not in line, line
        assert "semcomp eval: error: eval:" not in line


def test_option_messages_name_the_flag(folder, tmp_path, capsys):
    rc, _, err = _run(capsys, "compress", folder / "in", "-o", tmp_path / "o", "--keep", "99")
    assert rc == 2 and "--keep must be at most the input dimension 16, got 99" in _one_line(err)
    assert "RandomFeatureSelector" not in err
    rc, _, err = _run(capsys, "eval", folder / "in", "--drop-rates", "0.5", "--test-fraction", "2")
    assert rc == 2 and _one_line(err) == "semcomp eval: error: --test-fraction must be in (0, 1), got 2.0"
    from semcomp_ext.compress import CompressOptions, compress

    with pytest.raises(ValueError, match="^keep must be at most the input dimension 16, got 99$"):
        compress(CompressOptions(inputs=[str(folder / "in")], out=str(tmp_path / "o2"), keep=99))


def test_ratios_count_the_codebook_and_concepts_say_so(tmp_path, capsys):
    from semcomp_ext.compress.api import codebook_bytes
    from semcomp_ext.compress.codecs import codec_from_manifest

    make_clip_layout(tmp_path / "in", rows=(300,), dim=32, metadata=False)
    rc, out, _ = _run(capsys, "compress", tmp_path / "in", "-o", tmp_path / "pq", "--codec", "pq:4", "--json")
    st = json.loads(out)
    m = json.loads((tmp_path / "pq" / "manifest.json").read_text())
    book = codebook_bytes(codec_from_manifest(m))
    assert book > 1000 and st["compression_ratio"] == pytest.approx(2 * 32 * 4 / (4 + book / 300))
    rc, out, _ = _run(capsys, "compress", tmp_path / "in", "-o", tmp_path / "pq2", "--codec", "pq:4")
    assert "codebook" in out and f"{st['compression_ratio']:.2f}x smaller" in out
    os.makedirs(tmp_path / "ids")
    np.save(tmp_path / "ids" / "ids_0000.npy", np.arange(300) % 3)
    rc, out, _ = _run(capsys, "compress", tmp_path / "in", "--concepts", tmp_path / "ids", "-o", tmp_path / "c")
    assert rc == 0 and "300 rows of 2 x 32 float32 -> 3 concepts" in out and "per item" not in out


def test_json_and_quiet_on_every_command(folder, capsys):
    pytest.importorskip("faiss")
    rc, out, err = _run(capsys, "verify", folder / "out", "--json")
    assert rc == 0 and json.loads(out) == {"dir": str(folder / "out"), "ok": True, "problems": []}
    rc, out, err = _run(capsys, "index", folder / "out", "--json", "-q")
    assert rc == 0 and json.loads(out)["ntotal"] == 120 and err == ""
    rc, out, err = _run(capsys, "search", folder / "out", "--query", folder / "q.npy", "-q", "--k", "3", "--json")
    assert rc == 0 and len(json.loads(out)[0]) == 3 and err == ""
    rc, out, err = _run(capsys, "gap", folder / "in", "-q", "--json")
    assert rc == 0 and json.loads(out)["rows"] == 120 and err == ""


def test_seed_names_and_hidden_aliases(folder, capsys):
    """--seed is the RFS seed everywhere; the sample seeds are --sample-seed; the earlier
    spellings still work and are not shown in --help."""
    base = ["eval", folder / "in", "--drop-rates", "0.5", "--max-rows", "100", "--json", "-q"]
    reps = {}
    for extra in (["--seed", "3"], ["--rfs-seed", "3"], ["--sample-seed", "5"]):
        rc, out, _ = _run(capsys, *base, *extra)
        reps[extra[0]] = json.loads(out)
    assert reps["--seed"]["seed"] == reps["--rfs-seed"]["seed"] == 3 and reps["--sample-seed"]["sample_seed"] == 5
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--rfs-seed" not in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    h = capsys.readouterr().out
    assert "--sample-seed" in h and "--seed" not in h.replace("--sample-seed", "")


def test_gap_and_eval_progress_is_log_lines_off_a_terminal(folder):
    """stderr a pipe: `semcomp gap: ...` lines, no tqdm bar (carriage returns)."""
    for cmd in (["gap", str(folder / "in")], ["eval", str(folder / "in"), "--drop-rates", "0.5"]):
        p = subprocess.run([sys.executable, "-m", "semcomp_ext.cli", *cmd], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "\r" not in p.stderr and f"semcomp {cmd[0]}: " in p.stderr, p.stderr


def test_resumed_progress_counts_the_whole_job(tmp_path):
    from semcomp_ext.compress.progress import Progress

    class Sink:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return False

    s = Sink()
    p = Progress(4000, 4, stream=s, interval=0.0)
    p.skip(3000, 3, 300)  # done by the interrupted run
    p.update(1000, 1, 100)
    p.close()
    assert "4/4 tasks, 400 rows" in s.text.splitlines()[-1]


def test_ray_engine_takes_workers(tmp_path):
    """--engine ray --workers N: at most N tasks at once (Ray Data's concurrency), not ignored."""
    from semcomp_ext.compress import engines

    seen = {}

    class FakeDataset:
        def map(self, fn, **kw):
            seen.update(kw)
            return self

        def iter_rows(self):
            return iter(())

    class FakeRay:
        class data:  # noqa: N801
            @staticmethod
            def from_items(items, **kw):
                return FakeDataset()

    orig = engines.init_ray
    engines.init_ray = lambda address=None, num_cpus=None: seen.update(ray_cpus=num_cpus) or FakeRay
    try:
        engines.run_ray(lambda p, i: {}, None, [0, 1, 2], lambda r: None, None, 2)
    finally:
        engines.init_ray = orig
    assert seen["concurrency"] == 2 and seen["ray_cpus"] == 2 and seen["num_cpus"] == 1
