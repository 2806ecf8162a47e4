"""Regression tests for defects of `semcomp compress` (issue 10, part 1)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from semcomp_ext.cli import main
from semcomp_ext.compress import CompressOptions, compress, verify

from _compress_data import ROWS, load_centroids, make_clip_layout


def _run(capsys, *args):
    rc = main(["compress", *map(str, args), "-q"])
    return rc, capsys.readouterr().err


def _concept_out(out, m):
    ids = np.concatenate([np.load(out / s["concepts"]["file"]) for s in m["shards"]])
    return ids, load_centroids(out)


@pytest.mark.parametrize("kind", ["npy", "parquet"])
def test_uint64_concept_ids_are_kept_exactly(tmp_path, kind):
    data = make_clip_layout(tmp_path / "in", metadata=False)
    rng = np.random.default_rng(5)
    # ids at and above 2**63 (they used to come out as different negative numbers), and small ones
    pool = np.array([2**64 - 1, 2**63, 2**63 + 12345, 7, 0], dtype=np.uint64)
    os.makedirs(tmp_path / "ids")
    parts = []
    for i, n in enumerate(ROWS):
        c = pool[rng.integers(0, len(pool), n)]
        parts.append(c)
        if kind == "npy":
            np.save(tmp_path / "ids" / f"ids_{i:04d}.npy", c)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"concept": pa.array(c, type=pa.uint64())}), tmp_path / "ids" / f"ids_{i:04d}.parquet")
    ids = np.concatenate(parts)
    out = tmp_path / "out"
    m = compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), concepts=str(tmp_path / "ids"),
                                 partitions=2, batch_size=16, quiet=True))
    got_ids, got = _concept_out(out, m)
    assert sorted(got_ids.tolist()) == sorted(set(ids.tolist()))
    assert got_ids.dtype == np.uint64 and m["parameters"]["concept_dtype"] == "uint64"
    x = np.concatenate([data["img"], data["text"]])
    allid = np.concatenate([ids, ids])
    for u, c in zip(got_ids, got):
        np.testing.assert_allclose(c, x[allid == u].mean(0), rtol=1e-5, atol=1e-5)
    assert verify(str(out)) == []


def test_int32_concept_ids_keep_their_dtype(tmp_path):
    make_clip_layout(tmp_path / "in", metadata=False)
    os.makedirs(tmp_path / "ids")
    for i, n in enumerate(ROWS):
        np.save(tmp_path / "ids" / f"ids_{i:04d}.npy", (np.arange(n) % 4 - 2).astype(np.int32))
    out = tmp_path / "out"
    m = compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), concepts=str(tmp_path / "ids"),
                                 partitions=1, quiet=True))
    got_ids, _ = _concept_out(out, m)
    assert got_ids.dtype == np.int32 and got_ids.tolist() == [-2, -1, 0, 1]


def test_mixed_uint64_and_signed_ids_refused(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    os.makedirs(tmp_path / "ids")
    for i, n in enumerate(ROWS):
        np.save(tmp_path / "ids" / f"ids_{i:04d}.npy", np.zeros(n, np.uint64 if i else np.int64))
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out", "--concepts", tmp_path / "ids")
    assert rc == 2 and "concept id shards mix integer dtypes" in err and "uint64" in err


def test_string_concept_ids_one_clear_error(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    os.makedirs(tmp_path / "ids")
    for i, n in enumerate(ROWS):
        np.save(tmp_path / "ids" / f"ids_{i:04d}.npy", np.array([f"c{j % 3}" for j in range(n)]))
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out", "--concepts", tmp_path / "ids")
    assert rc == 2 and "concept ids must be integers" in err and "ids_0000.npy" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_mistyped_root_says_it_does_not_exist(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    rc, err = _run(capsys, tmp_path / "inn", "-o", tmp_path / "out")
    assert rc == 2 and "does not exist" in err and str(tmp_path / "inn") in err
    assert "at least 2 modality" not in err


def _modes(out):
    return {os.path.relpath(os.path.join(d, f), out): stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode)
            for d, _, fs in os.walk(out) for f in fs}


def test_output_files_follow_the_umask(tmp_path):
    make_clip_layout(tmp_path / "in")
    out = tmp_path / "out"
    compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), drop_rate=0.5, quiet=True))
    umask = os.umask(0)
    os.umask(umask)
    modes = _modes(out)
    assert len(modes) == 7 and set(modes.values()) == {0o666 & ~umask}, modes
    # a process with another umask: what open() would give there
    out2 = tmp_path / "out2"
    code = "import os, sys; os.umask(0o027); from semcomp_ext.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, "compress", str(tmp_path / "in"), "-o", str(out2), "-q"], check=True)
    assert set(_modes(out2).values()) == {0o640}



def test_abandoned_reader_closes_inside_threading_bookkeeping(tmp_path):
    # A consumer that stops early leaves a block reader to the garbage collector, which can run
    # while threading holds its internal shutdown-locks lock (seen as a hang in the suite). The
    # reader's clean-up must not join its read-ahead thread there. Old code: hangs (timeout).
    import subprocess
    import sys
    import textwrap
    import threading

    if not hasattr(threading, "_shutdown_locks_lock"):
        pytest.fail("this Python has no threading._shutdown_locks_lock: adapt the test")
    path = tmp_path / "x.npy"
    np.save(path, np.arange(4000 * 8, dtype=np.float32).reshape(4000, 8))
    src = textwrap.dedent(f"""
        import threading
        from semcomp_ext.compress import readers
        gen = readers.iter_chunks(readers.open_npy({str(path)!r}), 1000)
        first = next(gen)          # the read-ahead thread is now running
        with threading._shutdown_locks_lock:
            gen.close()            # as the collector would, inside threading's bookkeeping
        print("closed", first.shape)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("closing an abandoned reader deadlocked")
    assert r.returncode == 0 and "closed (1000, 8)" in r.stdout, r.stderr[-2000:]
