"""open_compressed (round trip against the inputs), `semcomp index` / `search` (recall@k of the
compressed search against exact numpy search on the uncompressed centroids), bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import semcomp_ext as sc
from semcomp_ext.cli import main
from semcomp_ext.compress.open import CompressedFolderError, open_compressed
from semcomp_ext.synthetic import make_multimodal

from _compress_data import make_clip_layout, make_concepts

SHARD_ROWS = (1100, 700, 1200)


def _write_clip(root, zs, rows=SHARD_ROWS):
    """clip-retrieval layout of the row-aligned modalities zs, with a metadata column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = ("img", "text", "audio")[: len(zs)]
    for name in names:
        os.makedirs(os.path.join(root, f"{name}_emb"), exist_ok=True)
    os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
    start = 0
    for i, n in enumerate(rows):
        for name, z in zip(names, zs):
            np.save(os.path.join(root, f"{name}_emb", f"{name}_emb_{i:04d}.npy"), z[start:start + n])
        pq.write_table(pa.table({"caption": [f"item {start + j}" for j in range(n)]}),
                       os.path.join(root, "metadata", f"metadata_{i:04d}.parquet"))
        start += n


@pytest.fixture(scope="module")
def lowrank(tmp_path_factory):
    """Low-rank synthetic pairs (latent 32 of 256 dims, 30 classes) in 3 shards, plus 100
    held-out concepts whose image embeddings are the queries."""
    n = sum(SHARD_ROWS)
    s = make_multimodal(num_classes=30, per_class=(n + 100) // 30 + 1, dim=256, latent=32, gap=0.4, noise=0.3, seed=3)
    perm = np.random.default_rng(0).permutation(len(s.labels))
    zs = [z.numpy()[perm] for z in s.zs]
    root = tmp_path_factory.mktemp("lowrank")
    _write_clip(str(root / "in"), [z[:n] for z in zs])
    return {"root": root, "zs": [z[:n] for z in zs], "queries": zs[0][n:n + 100]}


def _compress(src, out, *args):
    assert main(["compress", str(src), "-o", str(out), "-q", *args]) == 0
    return str(out)


def _topk(scores, k):
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ---- open_compressed ------------------------------------------------------------------------


def test_open_round_trip_pairs(lowrank, tmp_path):
    out = _compress(lowrank["root"] / "in", tmp_path / "c", "--drop-rate", "0.5", "--seed", "4", "--out-dtype", "float16",
                    "--normalize", "output", "--batch-size", "256")
    cs = sc.open_compressed(out)
    n = sum(SHARD_ROWS)
    assert len(cs) == n and (cs.D, cs.K, cs.seed) == (256, 128, 4) and cs.normalize == "output"
    assert cs.codec.name == "float16" and cs.mode == "pairs" and cs.has_metadata
    np.testing.assert_array_equal(cs.rfs_index, sc.rfs_index(256, 128, 4).numpy())
    ref = _unit(((lowrank["zs"][0] + lowrank["zs"][1]) / 2)[:, cs.rfs_index])  # numpy, not the library
    v = cs.vectors()
    assert v.dtype == np.float32 and v.shape == (n, 128)
    np.testing.assert_allclose(v, ref, atol=2e-3)
    raw = cs.vectors(decode=False)
    assert raw.dtype == np.float16 and isinstance(cs.codes(0), np.memmap)
    np.testing.assert_array_equal(cs.ids(), np.arange(n))
    assert cs.metadata().column("caption").to_pylist() == [f"item {j}" for j in range(n)]
    shards = list(cs.iter_shards())
    assert [len(b) for b in shards] == list(SHARD_ROWS) and [b.start for b in shards] == [0, 1100, 1800]
    assert shards[2].metadata.num_rows == 1200 and shards[1].shard == 1
    batches = list(cs.iter_batches(333))
    assert [len(b) for b in batches] == [333] * (n // 333) + [n % 333]
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in batches]), v)
    np.testing.assert_array_equal(np.concatenate([b.ids for b in batches]), np.arange(n))
    b = batches[3]  # rows 999..1331 cross the first shard boundary
    assert b.metadata.column("caption").to_pylist() == [f"item {j}" for j in range(999, 1332)]
    assert list(cs.iter_batches(5000, decode=False, metadata=False))[0].metadata is None
    np.testing.assert_array_equal(cs.ids_at([[5, 2000]]), [[5, 2000]])
    # metadata_at: the same form as metadata() (a pyarrow Table), rows in the order given
    picked = [1999, 3, 1999, 1100, 0]
    at = cs.metadata_at(picked)
    assert isinstance(at, type(cs.metadata())) and at.schema == cs.metadata().schema
    assert at.column("caption").to_pylist() == [f"item {j}" for j in picked]
    assert at.equals(cs.metadata().take(picked))
    assert cs.metadata_at([]).num_rows == 0 and cs.metadata_at([]).schema == at.schema


def test_open_round_trip_concepts(tmp_path):
    data = make_clip_layout(tmp_path / "in", metadata=False)
    ids_in = make_concepts(tmp_path / "ids")
    out = _compress(tmp_path / "in", tmp_path / "c", "--concepts", str(tmp_path / "ids"), "--keep", "6", "--partitions", "2")
    cs = open_compressed(out)
    assert cs.mode == "concepts" and cs.metadata() is None and len(cs.shards) == 2
    ids, v = cs.ids(), cs.vectors()
    assert sorted(ids.tolist()) == sorted(set(ids_in.tolist())) and len(cs) == len(ids)
    for cid, row in zip(ids, v):
        sel = ids_in == cid
        ref = np.concatenate([data["img"][sel], data["text"][sel]])[:, cs.rfs_index].mean(0)
        np.testing.assert_allclose(row, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(cs.ids_at([len(cs) - 1, 0]), [ids[-1], ids[0]])
    np.testing.assert_array_equal(np.concatenate([b.ids for b in cs.iter_batches(4)]), ids)


@pytest.mark.parametrize("codec, dtype, width", [("int8", np.int8, 128), ("pq:16", np.uint8, 16)])
def test_open_decodes_codecs(lowrank, tmp_path, codec, dtype, width):
    out = _compress(lowrank["root"] / "in", tmp_path / "c", "--drop-rate", "0.5", "--codec", codec)
    cs = open_compressed(out)
    assert cs.codec.name == codec
    raw = cs.vectors(decode=False)
    assert raw.dtype == dtype and raw.shape == (len(cs), width)
    v = cs.vectors()
    np.testing.assert_array_equal(v, cs.codec.decode(np.asarray(raw)))
    exact = ((lowrank["zs"][0] + lowrank["zs"][1]) / 2)[:, cs.rfs_index]
    err = np.linalg.norm(v - exact, axis=1) / np.linalg.norm(exact, axis=1)
    assert err.mean() < (0.02 if codec == "int8" else 0.5)
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in cs.iter_batches(1000)]), v)
    from semcomp_ext.compress.index import search

    res = search(out, lowrank["queries"][:5], 3)
    brute = cs.prepare_queries(lowrank["queries"][:5]) @ v.T
    np.testing.assert_allclose(res.scores, np.sort(brute, 1)[:, ::-1][:, :3], rtol=1e-5, atol=1e-5)


# ---- index / search: recall against exact search on the uncompressed centroids ---------------


def _recall(got, truth):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, truth)]))


@pytest.mark.parametrize("drop, min_recall, min_top1", [(0.0, 0.99, 0.99), (0.5, 0.5, 0.9), (0.9, 0.12, 0.25)])
def test_search_recall_vs_exact_uncompressed(lowrank, tmp_path, capsys, drop, min_recall, min_top1):
    """10-recall@10 (overlap of the top 10) and 1-recall@10 (the exact nearest neighbour is
    in the top 10) of the compressed search; chance level is 10 / 3000. Measured (deterministic
    data): drop 0.5: 0.593 / 0.950, drop 0.9: 0.168 / 0.330; drop 0 checks the pipeline (1.0)."""
    k = 10
    out = _compress(lowrank["root"] / "in", tmp_path / "c", "--drop-rate", str(drop), "--normalize", "output")
    # ground truth: numpy, full D, centroids normalised as --normalize output does
    cent = _unit((lowrank["zs"][0] + lowrank["zs"][1]) / 2)
    truth = _topk(lowrank["queries"] @ cent.T, k)
    np.save(tmp_path / "q.npy", lowrank["queries"])
    capsys.readouterr()
    assert main(["index", out, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["factory"] == "Flat" and info["ntotal"] == len(cent)  # < 10 000 rows: exact flat IP
    assert main(["search", out, "--query", str(tmp_path / "q.npy"), "-k", str(k), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    got = np.array([[h["id"] for h in q] for q in hits])
    assert hits[0][0]["metadata"] == {"caption": f"item {hits[0][0]['id']}"}
    recall, top1 = _recall(got, truth), _recall(got, truth[:, :1])
    print(f"drop {drop}: recall@{k} {recall:.3f}, 1-recall@{k} {top1:.3f}")
    assert recall >= min_recall and top1 >= min_top1
    # the Python function, the exact streamed path and a brute-force check agree with the CLI
    from semcomp_ext.compress.index import search

    res = search(out, lowrank["queries"], k)
    np.testing.assert_array_equal(res.ids, got)
    ex = search(out, lowrank["queries"], k, exact=True)
    assert ex.method == "exact" and res.method == "Flat"
    np.testing.assert_allclose(ex.scores, res.scores, rtol=1e-5, atol=1e-5)
    cs = open_compressed(out)
    brute = cs.prepare_queries(lowrank["queries"]) @ cs.vectors().T
    np.testing.assert_allclose(np.sort(brute, 1)[:, ::-1][:, :k], ex.scores, rtol=1e-5, atol=1e-5)


def test_prepare_queries_matches_compression(lowrank, tmp_path):
    """A query equal to the centroid input of a row (both modalities the same vector) maps to
    that row's stored vector, for every normalisation mode."""
    x = lowrank["zs"][0][:50] * 3.0
    root = tmp_path / "in"
    _write_clip(str(root), [x, x], rows=(50,))
    for mode in ("none", "input", "output", "both"):
        out = _compress(root, tmp_path / mode, "--keep", "20", "--normalize", mode)
        cs = open_compressed(out)
        np.testing.assert_allclose(cs.prepare_queries(x), cs.vectors(), rtol=1e-5, atol=1e-6)
        assert cs.prepare_queries(x[0]).shape == (1, 20)


def test_ivf_index_and_factory_rule(lowrank, tmp_path, capsys):
    from semcomp_ext.compress.index import default_index_factory, search

    # the rule itself is tested in test_index_choice.py
    assert default_index_factory(9_999, 51, threads=2) == "Flat"
    assert default_index_factory(50_000, 4, threads=2) == "Flat"
    out = _compress(lowrank["root"] / "in", tmp_path / "c", "--drop-rate", "0.5")
    assert main(["index", out, "--index-factory", "IVF8,Flat", "--nprobe", "8", "-q"]) == 0
    info = json.loads((tmp_path / "c" / "index" / "index.json").read_text())
    assert info["nprobe"] == 8 and info["train_rows"] == 512 and info["dim"] == 128  # 64 per list
    np.testing.assert_array_equal(np.load(tmp_path / "c" / "index" / "ids.npy"), np.arange(3000))
    res = search(out, lowrank["queries"][:20], 5)
    ex = search(out, lowrank["queries"][:20], 5, exact=True)
    assert res.method == "IVF8,Flat"
    np.testing.assert_array_equal(res.ids, ex.ids)  # all 8 lists probed: exact
    capsys.readouterr()
    np.save(tmp_path / "q.npy", lowrank["queries"][:2])
    assert main(["search", out, "--query", str(tmp_path / "q.npy"), "-k", "3", "--nprobe", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["query", "rank", "id", "score", "caption"] and len(table) == 1 + 2 * 3
    # the index is tied to the manifest it was built from
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["note"] = "changed"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="stale"):
        search(out, lowrank["queries"][:2], 3)


# ---- bad input --------------------------------------------------------------------------------


@pytest.fixture()
def small(tmp_path):
    make_clip_layout(tmp_path / "in")
    return _compress(tmp_path / "in", tmp_path / "c", "--keep", "8")


def test_missing_folder_and_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        open_compressed(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        open_compressed(tmp_path / "empty")


def test_incomplete_job(small):
    path = os.path.join(small, "manifest.json")
    m = json.load(open(path))
    m["status"] = "in_progress"
    json.dump(m, open(path, "w"))
    with pytest.raises(CompressedFolderError, match="did not finish.*--resume"):
        open_compressed(small)


def test_corrupt_shards(small):
    f = os.path.join(small, "centroids", "centroids_00001.npy")
    data = open(f, "rb").read()
    open(f, "wb").write(data[:-4])
    with pytest.raises(CompressedFolderError, match="corrupt shard centroids/centroids_00001.npy"):
        open_compressed(small)
    open(f, "wb").write(b"garbage!" + data[8:])  # same size, broken header
    with pytest.raises(CompressedFolderError, match="corrupt shard centroids/centroids_00001.npy"):
        open_compressed(small)
    flipped = bytearray(data)
    flipped[-1] ^= 1  # same size, valid header: only re-hashing notices
    open(f, "wb").write(bytes(flipped))
    assert len(open_compressed(small)) == 108
    with pytest.raises(CompressedFolderError, match="xxh3_128 mismatch"):
        open_compressed(small, verify=True)
    os.unlink(f)
    with pytest.raises(CompressedFolderError, match="missing shard centroids/centroids_00001.npy"):
        open_compressed(small)


def test_bad_queries_and_arguments(small, tmp_path, capsys):
    from semcomp_ext.compress.index import search

    cs = open_compressed(small)
    with pytest.raises(ValueError, match=r"queries: expected .* \(Q, 16\).*got shape \(2, 8\)"):
        cs.prepare_queries(np.zeros((2, 8), np.float32))
    with pytest.raises(ValueError, match="queries: non-finite .* row 1"):
        cs.prepare_queries(np.array([[0.0] * 16, [np.nan] * 16]))
    with pytest.raises(ValueError, match="queries: expected a floating-point array, got dtype int64"):
        cs.prepare_queries(np.zeros((1, 16), np.int64))
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        search(small, np.zeros((1, 16), np.float32), 0)
    with pytest.raises(ValueError, match="iter_batches: rows must be an int >= 1, got 0"):
        next(cs.iter_batches(0))
    with pytest.raises(IndexError, match="row 108 out of range"):
        cs.ids_at([108])
    # a k above the row count returns every row
    assert search(small, np.ones((1, 16), np.float32), 500).ids.shape == (1, 108)
    capsys.readouterr()
    assert main(["search", small, "--query", str(tmp_path / "missing.npy")]) == 2
    assert "--query: cannot read" in capsys.readouterr().err
    np.save(tmp_path / "q.npy", np.zeros((1, 5), np.float32))
    assert main(["search", small, "--query", str(tmp_path / "q.npy")]) == 2
    assert "queries: expected full-dimensional embeddings of shape (Q, 16)" in capsys.readouterr().err
    assert main(["index", small, "--index-factory", "NoSuchIndex", "-q"]) == 2
    assert "--index-factory: faiss cannot build 'NoSuchIndex' for dim 8" in capsys.readouterr().err
    assert main(["index", small, "--index-factory", "Flat", "--nprobe", "4", "-q"]) == 2
    assert "--nprobe: index 'Flat' is not an IVF index" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_import_stays_light():
    import subprocess
    import sys

    code = ("import sys, semcomp_ext as sc; f = sc.open_compressed; import semcomp_ext.compress.index; "
            "assert 'faiss' not in sys.modules and 'pyarrow' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_overwrite_after_index_replaces_the_index(small, tmp_path):
    """An index written by `semcomp index` is ours: compress --overwrite replaces the folder."""
    assert main(["index", small]) == 0
    assert os.path.isdir(os.path.join(small, "index"))
    _compress(tmp_path / "in", small, "--keep", "8", "--overwrite")
    assert not os.path.exists(os.path.join(small, "index"))
    assert len(open_compressed(small)) > 0
