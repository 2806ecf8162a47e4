"""Concept ids of `semcomp compress --concepts`: every integer dtype kept exactly (uint64 >= 2**63
included), mixed or non-integer ids refused with one line."""

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
