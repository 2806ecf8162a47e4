"""Parallel local engine, the append-only manifest journal, and progress lines (issue 10, part 2)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from semcomp_ext.cli import main
from semcomp_ext.compress import CompressOptions, api, atomic, compress, manifest, pipeline, verify

from _compress_data import make_clip_layout, make_concepts, tree_sha

ROWS = (40, 41, 42, 43, 44, 45, 7)


def _opts(tmp_path, out, **kw):
    return CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), drop_rate=0.5, batch_size=16, quiet=True, **kw)


@pytest.mark.parametrize("mode", ["pairs", "concepts"])
def test_workers_are_byte_identical(tmp_path, mode):
    make_clip_layout(tmp_path / "in", rows=ROWS)
    extra = {}
    if mode == "concepts":
        make_concepts(tmp_path / "ids", rows=ROWS)
        extra = {"concepts": str(tmp_path / "ids"), "partitions": 3}
    shas = []
    for w in (1, 2, 4):
        out = tmp_path / f"out{w}"
        compress(_opts(tmp_path, out, workers=w, **extra))
        assert verify(str(out)) == []
        assert not (out / manifest.JOURNAL).exists()  # folded into manifest.json
        shas.append(tree_sha(out))
    assert shas[0] == shas[1] == shas[2] and len(shas[0]) == (15 if mode == "pairs" else 7)


def test_workers_equal_ray(tmp_path):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    make_clip_layout(tmp_path / "in", rows=ROWS[:3])
    compress(_opts(tmp_path, tmp_path / "w2", workers=2))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        compress(_opts(tmp_path, tmp_path / "ray", engine="ray"))
    finally:
        ray.shutdown()
    assert tree_sha(tmp_path / "w2") == tree_sha(tmp_path / "ray")


def test_bad_workers_named(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        compress(_opts(tmp_path, tmp_path / "out", workers=0))
    with pytest.raises(SystemExit):
        main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "o2"), "--workers", "0"])
    assert "--workers: must be an integer >= 1, got '0'" in capsys.readouterr().err


def test_commit_is_append_only(tmp_path, monkeypatch):
    """manifest.json is written twice per job (start, end), not once per shard."""
    make_clip_layout(tmp_path / "in", rows=ROWS, metadata=False)
    saves = []
    real = manifest.write_json_atomic
    monkeypatch.setattr(manifest, "write_json_atomic", lambda p, m: (saves.append(m["status"]), real(p, m)))
    compress(_opts(tmp_path, tmp_path / "out", workers=2))
    assert saves == ["in_progress", "complete"]


def _interrupted(tmp_path, monkeypatch, fail_at: int, workers: int = 1):
    """Run until task `fail_at` raises; returns the output folder (manifest in_progress)."""
    real = pipeline.pair_task

    def flaky(plan, i):
        if i == fail_at:
            raise RuntimeError("simulated crash")
        return real(plan, i)

    monkeypatch.setattr(pipeline, "pair_task", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        compress(_opts(tmp_path, out, workers=workers))
    monkeypatch.setattr(pipeline, "pair_task", real)
    return out


def test_resume_trusts_journal_and_tolerates_torn_line(tmp_path, monkeypatch):
    make_clip_layout(tmp_path / "in", rows=ROWS, metadata=False)
    compress(_opts(tmp_path, tmp_path / "ref", workers=1))
    out = _interrupted(tmp_path, monkeypatch, fail_at=3)
    assert json.loads((out / "manifest.json").read_text())["status"] == "in_progress"
    assert [r["index"] for r in manifest.load_state(str(out))["shards"]] == [0, 1, 2]
    # a kill mid-append leaves a torn last line
    with open(out / manifest.JOURNAL, "ab") as f:
        f.write(b'{"key":"shards","record":{"index":3,"ro')
    ran = []
    real = pipeline.pair_task
    monkeypatch.setattr(pipeline, "pair_task", lambda plan, i: (ran.append(i), real(plan, i))[1])
    monkeypatch.setattr(atomic, "file_checksum", lambda p, a: pytest.fail(f"resume re-hashed {p}"))
    monkeypatch.setattr(manifest, "file_checksum", lambda p, a: pytest.fail(f"resume re-hashed {p}"))
    compress(_opts(tmp_path, out, workers=1, resume=True))
    assert sorted(ran) == [3, 4, 5, 6]
    monkeypatch.undo()
    assert tree_sha(out) == tree_sha(tmp_path / "ref")


def test_resume_after_parallel_failure(tmp_path, monkeypatch):
    make_clip_layout(tmp_path / "in", rows=ROWS, metadata=False)
    compress(_opts(tmp_path, tmp_path / "ref", workers=1))
    out = _interrupted(tmp_path, monkeypatch, fail_at=2, workers=2)
    done = [r["index"] for r in manifest.load_state(str(out))["shards"]]
    assert 2 not in done and len(done) < len(ROWS)
    compress(_opts(tmp_path, out, workers=2, resume=True))
    assert tree_sha(out) == tree_sha(tmp_path / "ref")


def test_resume_reruns_a_shard_whose_file_is_gone(tmp_path, monkeypatch):
    make_clip_layout(tmp_path / "in", rows=ROWS, metadata=False)
    compress(_opts(tmp_path, tmp_path / "ref", workers=1))
    out = _interrupted(tmp_path, monkeypatch, fail_at=4)
    (out / "centroids" / "centroids_00001.npy").unlink()
    compress(_opts(tmp_path, out, workers=2, resume=True))
    assert tree_sha(out) == tree_sha(tmp_path / "ref")


def test_corrupt_journal_line_is_an_error(tmp_path, monkeypatch):
    make_clip_layout(tmp_path / "in", rows=ROWS, metadata=False)
    out = _interrupted(tmp_path, monkeypatch, fail_at=3)
    lines = (out / manifest.JOURNAL).read_bytes().split(b"\n")
    lines[0] = b"garbage"
    (out / manifest.JOURNAL).write_bytes(b"\n".join(lines))
    with pytest.raises(ValueError, match="corrupt journal .* line 1"):
        compress(_opts(tmp_path, out, resume=True))


def test_changed_input_mtime_refuses_resume(tmp_path, monkeypatch):
    import os

    make_clip_layout(tmp_path / "in", rows=ROWS, metadata=False)
    out = _interrupted(tmp_path, monkeypatch, fail_at=3)
    p = tmp_path / "in" / "img_emb" / "img_emb_0005.npy"
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ValueError, match="input files changed"):
        compress(_opts(tmp_path, out, resume=True))


def test_progress_log_lines_when_not_a_tty():
    s = io.StringIO()
    p = api.Progress(4 * 10**9, 4, stream=s, interval=0.0)
    p.skip(10**9, 1)
    p.update(10**9, rows=1000)
    p.close()
    lines = s.getvalue().splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("semcomp compress: 2/4 tasks, 1,000 rows, 2.00/4.00 GB, ")
    assert "GB/s" in lines[1] and "ETA" in lines[1]
    s = io.StringIO()
    p = api.Progress(10, 1, quiet=True, stream=s, interval=0.0)
    p.update(10)
    p.close()
    assert s.getvalue() == ""


def test_cli_prints_progress_unless_quiet(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", rows=ROWS[:3], metadata=False)
    assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "semcomp compress: 3/3 tasks, 123 rows" in err
    assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "b"), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_ids_encoding_roundtrip():
    for dt in (np.uint64, np.int64, np.int32, np.uint32, np.int8):
        info = np.iinfo(dt)
        a = np.array([info.min, info.max, 0, 1, info.max // 2], dtype=dt)
        k = pipeline.encode_ids(a)
        assert k.dtype == np.int64 and (np.argsort(k, kind="stable") == np.argsort(a, kind="stable")).all()
        back = pipeline.decode_ids(k, dt)
        assert back.dtype == dt and (back == a).all()


@pytest.mark.parametrize("a", [np.zeros((3, 5), np.float32), np.zeros(7, np.uint64), np.zeros((), np.int8),
                               np.array(["ab", "c"]), np.asfortranarray(np.zeros((2, 3), ">f2")),
                               np.zeros((0, 4), np.float16), np.zeros((2, 3, 4), np.int32)])
def test_fast_npy_header_matches_numpy(tmp_path, a):
    from semcomp_ext.compress.readers import read_header as _npy_header

    p = tmp_path / "a.npy"
    np.save(p, a)
    with open(p, "rb") as f:
        shape, fortran, dtype, offset = _npy_header(f)
    with open(p, "rb") as f:
        np.lib.format.read_magic(f)
        ref = np.lib.format.read_array_header_1_0(f)
        assert (shape, fortran, dtype, offset) == (*ref, f.tell())
