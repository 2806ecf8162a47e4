"""What a compressed folder promises against a hostile world: one writer at a time (the lock),
no file read or written outside the folder (confinement), ids exact through every reader,
malformed manifests and journals as one line, inputs checked before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from semcomp_ext.cli import main
from semcomp_ext.compress import manifest, verify
from semcomp_ext.compress.lock import LOCK, FolderLockedError, OutputLock
from semcomp_ext.compress.open import CompressedFolderError, open_compressed

from _compress_data import ROWS, make_clip_layout, make_parquet_layout


def _run(capsys, *args):
    rc = main([*map(str, args)])
    cap = capsys.readouterr()
    return rc, cap.err


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished pairs-mode folder (3 shards, with metadata) and its inputs."""
    root = tmp_path_factory.mktemp("safety")
    make_clip_layout(root / "in")
    assert main(["compress", str(root / "in"), "-o", str(root / "out"), "--drop-rate", "0.5", "-q"]) == 0
    return root


def _copy(done, tmp_path):
    import shutil

    shutil.copytree(done / "out", tmp_path / "out")
    return tmp_path / "out"


# ---- the lock ---------------------------------------------------------------------------


def test_second_job_on_a_locked_folder_is_refused_naming_the_holder(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", rows=(40, 40, 40))
    out = tmp_path / "out"
    env = dict(os.environ, SEMCOMP_TEST_SLEEP_PER_SHARD="0.7")
    job = subprocess.Popen([sys.executable, "-m", "semcomp_ext.cli", "compress", str(tmp_path / "in"), "-o", str(out),
                            "--workers", "1", "-q"], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out / LOCK).exists() or not (out / LOCK).stat().st_size:
            assert job.poll() is None and time.monotonic() < deadline, "the first job never took its lock"
            time.sleep(0.05)
        for extra in ([], ["--overwrite"], ["--resume"]):
            rc, err = _run(capsys, "compress", tmp_path / "in", "-o", out, "-q", *extra)
            line = _one_line(err)
            assert rc == 2 and f"pid {job.pid}" in line and "in use" in line, (extra, line)
        # a direct library call is refused the same way
        with pytest.raises(FolderLockedError, match=f"pid {job.pid}"):
            OutputLock(str(out)).acquire()
    finally:
        assert job.wait(120) == 0, job.stderr.read().decode()
    assert not (out / LOCK).exists()  # released at the end
    assert verify(str(out)) == []


def test_stale_lock_of_a_killed_job_is_named_and_taken_over(tmp_path, capsys):
    make_clip_layout(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    # what a job killed with -9 leaves: the lock file with its holder, nobody holding the flock
    (out / LOCK).write_text(json.dumps({"host": "node7", "pid": 999999, "started": 0, "command": "semcomp compress"}))
    rc, err = _run(capsys, "compress", tmp_path / "in", "-o", out, "--drop-rate", "0.5")
    assert rc == 0
    assert "stale lock" in err and "pid 999999 on host node7" in err
    assert not (out / LOCK).exists() and verify(str(out)) == []


def test_lock_is_not_taken_through_a_symlink(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(tmp_path / "elsewhere", out / LOCK)
    with pytest.raises(FolderLockedError, match="cannot create the lock"):
        OutputLock(str(out)).acquire()
    assert not (tmp_path / "elsewhere").exists()


def test_url_lock_is_exclusive_on_memory_store():
    a = OutputLock("memory://semcomp-lock-test/out").acquire()
    try:
        with pytest.raises(FolderLockedError, match=f"pid {os.getpid()}"):
            OutputLock("memory://semcomp-lock-test/out").acquire()
    finally:
        a.release()
    OutputLock("memory://semcomp-lock-test/out").acquire().release()  # free again
    # a store without a known atomic conditional create is refused, not left unlocked
    with pytest.raises(FolderLockedError, match="cannot be locked"):
        OutputLock("http://127.0.0.1:9/out").acquire()


def test_url_lock_on_a_client_without_conditional_create_is_refused(monkeypatch):
    """A store of a known kind whose client cannot create conditionally (an fsspec filesystem
    raising NotImplementedError for mode="create") is refused in one line, never left unlocked."""
    from fsspec.implementations.memory import MemoryFileSystem

    def no_create(self, path, value, mode="overwrite", **kw):
        if mode == "create":
            raise NotImplementedError("mode='create'")
        return original(self, path, value, mode=mode, **kw)

    original = MemoryFileSystem.pipe_file
    monkeypatch.setattr(MemoryFileSystem, "pipe_file", no_create)
    with pytest.raises(FolderLockedError, match="cannot create the lock object conditionally"):
        OutputLock("memory://semcomp-lock-test/nocreate").acquire()
    assert not MemoryFileSystem().exists("memory://semcomp-lock-test/nocreate/" + LOCK)


def test_index_takes_the_folder_lock(done, tmp_path, capsys, monkeypatch):
    pytest.importorskip("faiss")
    from semcomp_ext.compress import index as index_mod

    out = _copy(done, tmp_path)
    # a compress holding the folder: index is refused, naming it, and writes nothing
    with OutputLock(str(out)):
        rc, err = _run(capsys, "index", out, "-q")
    line = _one_line(err)
    assert rc == 2 and "in use by semcomp compress" in line and f"pid {os.getpid()}" in line, line
    assert not (out / "index").exists() and not (out / LOCK).exists()

    # while index writes OUT/index/, a second index and a compress --overwrite/--resume are refused
    seen = []
    write_index = index_mod._write_index

    def write_while_others_try(path, index):
        for cmd in (["index", out, "-q"], ["compress", done / "in", "-o", out, "-q", "--overwrite"],
                    ["compress", done / "in", "-o", out, "-q", "--resume"]):
            seen.append(_run(capsys, *cmd))
        return write_index(path, index)

    monkeypatch.setattr(index_mod, "_write_index", write_while_others_try)
    assert main(["index", str(out), "-q"]) == 0
    assert len(seen) == 3
    for rc, err in seen:
        line = _one_line(err)
        assert rc == 2 and "in use by semcomp index" in line and f"pid {os.getpid()}" in line, line
    assert not (out / LOCK).exists()  # released
    assert verify(str(out)) == []


# ---- confinement ------------------------------------------------------------------------


def _edit_manifest(out, fn):
    path = out / manifest.MANIFEST
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize("name", ["../sibling/x.npy", "/etc/passwd", "centroids/../../x.npy", "centroids//x.npy"])
def test_manifest_paths_outside_the_folder_are_refused(done, tmp_path, capsys, name):
    out = _copy(done, tmp_path)
    _edit_manifest(out, lambda m: m["shards"][1]["centroids"].__setitem__("file", name))
    for cmd in (["verify", out], ["search", out, "--query", tmp_path / "q.npy", "--exact"]):
        np.save(tmp_path / "q.npy", np.ones((1, 16), np.float32))
        rc, err = _run(capsys, *cmd)
        assert rc == 2 and repr(name) in _one_line(err), (cmd, err)
    with pytest.raises(CompressedFolderError, match="not a path inside"):
        open_compressed(out)


def test_symlinked_shard_leading_outside_fails_verify_and_open(done, tmp_path):
    out = _copy(done, tmp_path)
    victim = out / "centroids" / "centroids_00001.npy"
    outside = tmp_path / "outside.npy"
    os.replace(victim, outside)
    os.symlink(outside, victim)
    problems = verify(str(out))
    assert any("leads outside the folder" in p for p in problems), problems
    with pytest.raises(CompressedFolderError, match="outside the folder"):
        open_compressed(out)


def _interrupted(tmp_path, capsys):
    """A job killed after its first shard: manifest in_progress, one journal line."""
    make_clip_layout(tmp_path / "in")
    out = tmp_path / "out"
    env = dict(os.environ, SEMCOMP_TEST_SLEEP_PER_SHARD="30")
    job = subprocess.Popen([sys.executable, "-m", "semcomp_ext.cli", "compress", str(tmp_path / "in"), "-o", str(out),
                            "--workers", "1", "-q"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not (out / manifest.JOURNAL).exists() or not (out / manifest.JOURNAL).stat().st_size:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        job.kill()
        job.wait()
    return out


def test_journal_and_symlink_attacks_on_resume(tmp_path, capsys):
    out = _interrupted(tmp_path, capsys)
    journal = out / manifest.JOURNAL
    good = journal.read_bytes()
    rec = json.loads(good.splitlines()[0])
    # a journal line naming a file outside the folder is not resumed from
    bad = json.loads(json.dumps(rec))
    bad["record"]["centroids"]["file"] = "../../outside.npy"
    for line in (json.dumps(bad), "[1, 2]", '{"key": "shards", "record": {}}', '{"key": "nope", "record": {}}',
                 '{"key": "shards", "record": {"index": 0, "rows": 3}}'):
        journal.write_bytes(line.encode() + b"\n" + good)
        rc, err = _run(capsys, "compress", tmp_path / "in", "-o", out, "-q", "--resume")
        assert rc == 2 and "corrupt journal" in _one_line(err), (line, err)
    journal.write_bytes(good)
    # a symlink planted for a folder the job writes into: refused, nothing written outside
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.rename(out / "metadata", tmp_path / "meta-moved")
    os.symlink(elsewhere, out / "metadata")
    rc, err = _run(capsys, "compress", tmp_path / "in", "-o", out, "-q", "--resume")
    assert rc == 2 and "is a symlink" in _one_line(err)
    assert list(elsewhere.iterdir()) == []
    os.unlink(out / "metadata")
    os.rename(tmp_path / "meta-moved", out / "metadata")
    # search / open on the interrupted folder count the journaled shard
    np.save(tmp_path / "q.npy", np.ones((1, 16), np.float32))
    rc, err = _run(capsys, "search", out, "--query", tmp_path / "q.npy")
    assert rc == 2 and "1 of 3 shards" in _one_line(err)
    # eval on the interrupted folder: one line
    rc, err = _run(capsys, "eval", tmp_path / "in", "--compressed", out)
    assert rc == 2 and "did not finish" in _one_line(err)
    # a symlink at the journal's name is replaced, never written through
    os.rename(journal, tmp_path / "journal-moved")
    os.symlink(tmp_path / "journal-target", journal)
    rc, err = _run(capsys, "compress", tmp_path / "in", "-o", out, "-q", "--resume")
    assert rc == 0, err
    assert not (tmp_path / "journal-target").exists() and not journal.exists()
    assert verify(str(out)) == []


def test_index_is_not_written_through_a_symlink(done, tmp_path, capsys):
    pytest.importorskip("faiss")
    out = _copy(done, tmp_path)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "index")
    rc, err = _run(capsys, "index", out, "-q")
    assert rc == 2 and "is a symlink" in _one_line(err)
    assert list((tmp_path / "elsewhere").iterdir()) == []


# ---- malformed manifests ----------------------------------------------------------------


def test_shard_record_without_centroids_is_one_line(done, tmp_path, capsys):
    out = _copy(done, tmp_path)
    _edit_manifest(out, lambda m: m["shards"][0].pop("centroids"))
    np.save(tmp_path / "q.npy", np.ones((1, 16), np.float32))
    for cmd in (["verify", out], ["search", out, "--query", tmp_path / "q.npy"]):
        rc, err = _run(capsys, *cmd)
        assert rc == 2 and "no 'centroids' file record" in _one_line(err)
    with pytest.raises(CompressedFolderError, match="centroids"):
        open_compressed(out)


def test_verify_cross_checks_rfs_against_parameters(done, tmp_path):
    from semcomp_ext import RandomFeatureSelector

    out = _copy(done, tmp_path)

    def other_seed(m):  # a self-consistent rfs record for another seed than the parameters'
        m["rfs"] = RandomFeatureSelector(m["rfs"]["dim"], keep=m["rfs"]["keep"], seed=7).to_dict()

    _edit_manifest(out, other_seed)
    assert any("rfs.seed is 7, parameters.seed is 0" in p for p in verify(str(out)))


def test_garbage_local_index_is_one_line(done, tmp_path, capsys):
    pytest.importorskip("faiss")
    out = _copy(done, tmp_path)
    assert main(["index", str(out), "-q"]) == 0
    path = out / "index" / "index.faiss"
    path.write_bytes(b"\x00garbage" * (path.stat().st_size // 8) + b"\x00" * (path.stat().st_size % 8))
    np.save(tmp_path / "q.npy", np.ones((1, 16), np.float32))
    rc, err = _run(capsys, "search", out, "--query", tmp_path / "q.npy")
    assert rc == 2 and "damaged index" in _one_line(err)


# ---- ids --------------------------------------------------------------------------------


def test_uint64_ids_exact_through_every_reader(tmp_path):
    make_clip_layout(tmp_path / "in", metadata=False)
    pool = np.array([2**64 - 1, 2**63, 2**63 + 12345, 7], dtype=np.uint64)
    os.makedirs(tmp_path / "ids")
    for i, n in enumerate(ROWS):
        np.save(tmp_path / "ids" / f"ids_{i:04d}.npy", pool[np.arange(n) % len(pool)])
    out = tmp_path / "out"
    assert main(["compress", str(tmp_path / "in"), "--concepts", str(tmp_path / "ids"), "-o", str(out), "-q"]) == 0
    cs = open_compressed(out)
    want = np.sort(pool)
    assert cs.ids().dtype == np.uint64 and np.array_equal(np.sort(cs.ids()), want)
    assert np.array_equal(np.concatenate([b.ids for b in cs.iter_batches(3)]), cs.ids())
    assert np.array_equal(np.concatenate([b.ids for b in cs.iter_shards()]), cs.ids())
    assert np.array_equal(cs.ids_at(np.arange(len(cs))), cs.ids())
    from semcomp_ext.compress.index import search

    res = search(str(out), np.ones((2, 16), np.float32), k=len(cs), exact=True)
    assert sorted(h["id"] for h in res.to_records()[0]) == [int(v) for v in want]


# ---- inputs checked before any write ----------------------------------------------------


def test_overflowing_npy_header_is_refused_before_any_write(tmp_path, capsys):
    for m in ("img", "text"):
        (tmp_path / m).mkdir()
        np.save(tmp_path / m / "a_0.npy", np.ones((4, 16), np.float32))
        # a header only, announcing 2**61 x 16 float32: the product of the shape overflows int64 to 0
        header = np.lib.format.header_data_from_array_1_0(np.ones((1, 16), np.float32))
        header["shape"] = (2**61, 16)
        with open(tmp_path / m / "a_1.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
    out = tmp_path / "out"
    rc, err = _run(capsys, "compress", tmp_path / "img", tmp_path / "text", "-o", out, "-q")
    assert rc == 2 and "a_1.npy" in _one_line(err)
    assert not out.exists()


def test_empty_parquet_parts_are_accepted(tmp_path):
    rng = np.random.default_rng(0)
    rows = (7, 0, 5)
    data = {m: rng.standard_normal((sum(rows), 8)).astype(np.float32) for m in ("img", "text")}
    folders = make_parquet_layout(tmp_path, data, rows=rows)
    out = tmp_path / "out"
    assert main(["compress", *folders, "-o", str(out), "-q"]) == 0
    cs = open_compressed(out)
    assert len(cs) == sum(rows) and [s["rows"] for s in cs.shards] == list(rows)
    np.testing.assert_allclose(cs.vectors(), (data["img"] + data["text"]) / 2, rtol=1e-6)
