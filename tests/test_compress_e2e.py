"""End-to-end `semcomp compress` / `verify` on folders written here, both layouts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

import semcomp_ext as sc
from semcomp_ext.cli import main
from semcomp_ext.compress import CompressOptions, compress, verify

from _compress_data import ROWS, load_centroids, make_clip_layout, make_concepts, make_parquet_layout, tree_sha


def _ref_pairs(data, index, normalize=False):
    zs = [torch.from_numpy(x.astype(np.float32)) for x in data.values()]
    if normalize:
        zs = [torch.nn.functional.normalize(z, dim=1) for z in zs]
    return sc.pair_centroids(zs, features=torch.as_tensor(index)).numpy()


def test_clip_layout_pairs_rfs(tmp_path):
    data = make_clip_layout(tmp_path / "in")
    out = tmp_path / "out"
    rc = main(["compress", str(tmp_path / "in"), "-o", str(out), "--drop-rate", "0.5", "--seed", "3",
               "--batch-size", "16", "-q"])
    assert rc == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["num_shards"] == 3
    assert m["rfs"]["index"] == sc.rfs_index(16, 8, 3).tolist()
    assert [s["rows"] for s in m["shards"]] == list(ROWS)
    assert m["library_version"] == sc.__version__
    assert len(m["sources"]) == 2 * 3 + 3  # two modalities + metadata
    got = load_centroids(out)
    np.testing.assert_array_equal(got, _ref_pairs(data, m["rfs"]["index"]))
    # metadata passed through byte for byte
    assert (out / "metadata" / "metadata_00001.parquet").read_bytes() == (tmp_path / "in" / "metadata" / "metadata_0001.parquet").read_bytes()
    assert verify(str(out)) == []
    assert main(["verify", str(out), "-q"]) == 0
    # tampering is detected
    f = out / "centroids" / "centroids_00002.npy"
    b = bytearray(f.read_bytes())
    b[-1] ^= 1
    f.write_bytes(bytes(b))
    assert any("xxh3_128 mismatch" in p for p in verify(str(out)))
    assert main(["verify", str(out), "-q"]) == 1


def test_parquet_layout_matches_npy(tmp_path):
    data = make_clip_layout(tmp_path / "in", metadata=False)
    folders = make_parquet_layout(tmp_path / "pq", data)
    a, b = tmp_path / "a", tmp_path / "b"
    compress(CompressOptions(inputs=[str(tmp_path / "in" / "img_emb"), str(tmp_path / "in" / "text_emb")],
                             out=str(a), keep=5, batch_size=8, quiet=True))
    compress(CompressOptions(inputs=folders, out=str(b), keep=5, batch_size=8, quiet=True))
    sa, sb = tree_sha(a), tree_sha(b)
    assert {k: v for k, v in sa.items() if k.startswith("centroids")} == {k: v for k, v in sb.items() if k.startswith("centroids")}
    assert len([k for k in sa if k.startswith("centroids")]) == 3


@pytest.mark.parametrize("out_dtype,normalize", [("float16", "input"), ("float32", "both")])
def test_fp16_input_normalize(tmp_path, out_dtype, normalize):
    data = make_clip_layout(tmp_path / "in", dtype=np.float16, metadata=False, mods=("img", "text", "audio"))
    out = tmp_path / "out"
    m = compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), drop_rate=0.75, normalize=normalize,
                                 out_dtype=out_dtype, batch_size=16, quiet=True))
    assert m["parameters"]["modalities"] == ["audio", "img", "text"]
    got = load_centroids(out)
    assert got.dtype == np.dtype(out_dtype) and got.shape == (sum(ROWS), 4)
    zs = [torch.nn.functional.normalize(torch.from_numpy(data[k].astype(np.float32)), dim=1) for k in ("audio", "img", "text")]
    ref = sc.pair_centroids(zs, features=torch.as_tensor(m["rfs"]["index"]))
    if normalize == "both":
        ref = torch.nn.functional.normalize(ref, dim=1)
    np.testing.assert_allclose(got.astype(np.float32), ref.numpy(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("parts", [1, 4])
def test_concepts_partitioned(tmp_path, parts):
    data = make_clip_layout(tmp_path / "in", metadata=False)
    ids = make_concepts(tmp_path / "ids")
    out = tmp_path / "out"
    m = compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), concepts=str(tmp_path / "ids"),
                                 keep=6, partitions=parts, batch_size=16, quiet=True))
    assert m["parameters"]["mode"] == "concepts" and m["num_shards"] == parts
    assert not (out / ".spill").exists()
    got_ids = np.concatenate([np.load(out / s["concepts"]["file"]) for s in m["shards"]])
    got = load_centroids(out)
    assert sorted(got_ids.tolist()) == sorted(set(ids.tolist()))
    x = np.concatenate([data["img"], data["text"]])
    allid = np.concatenate([ids, ids])
    idx = m["rfs"]["index"]
    for u, c in zip(got_ids, got):
        np.testing.assert_allclose(c, x[allid == u].mean(0)[idx], rtol=1e-5, atol=1e-5)
    assert verify(str(out)) == []


def test_concepts_from_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    make_clip_layout(tmp_path / "in", metadata=False)
    ids = make_concepts(tmp_path / "ids")
    os.makedirs(tmp_path / "pids")
    start = 0
    for i, n in enumerate(ROWS):
        pq.write_table(pa.table({"label": ids[start : start + n]}), tmp_path / "pids" / f"m_{i:04d}.parquet")
        start += n
    a, b = tmp_path / "a", tmp_path / "b"
    common = dict(inputs=[str(tmp_path / "in")], keep=6, partitions=2, batch_size=16, quiet=True)
    compress(CompressOptions(out=str(a), concepts=str(tmp_path / "ids"), **common))
    compress(CompressOptions(out=str(b), concepts=str(tmp_path / "pids"), concept_column="label", **common))
    assert [v for k, v in sorted(tree_sha(a).items()) if k != "manifest.json"] == \
           [v for k, v in sorted(tree_sha(b).items()) if k != "manifest.json"]


def test_nonempty_out_overwrite(tmp_path):
    make_clip_layout(tmp_path / "in", metadata=False)
    out = tmp_path / "out"
    args = ["compress", str(tmp_path / "in"), "-o", str(out), "-q"]
    assert main(args) == 0
    assert main(args) == 2  # not empty, no --resume/--overwrite
    assert main(args + ["--overwrite"]) == 0
    (out / "mine.txt").write_text("user file")
    assert main(args + ["--overwrite"]) == 2  # refuses to delete foreign files
    assert (out / "mine.txt").exists()
