"""The compressor's fast I/O paths: O_DIRECT output writer (and its buffered fallback), memory-
mapped input blocks, the AVX-512 path of pair_mean against its generic loop, and the garbage
collector left as it was found."""

from __future__ import annotations

import errno
import gc
import os

import numpy as np
import pytest
import torch

from semcomp_ext._ops import ops
from semcomp_ext.compress import CompressOptions, atomic, compress, pipeline
from semcomp_ext.compress.readers import iter_chunks, open_npy

from _compress_data import load_centroids, make_clip_layout, tree_sha


def _chunks(rng, total: int):
    """Random-sized byte chunks (some empty, some larger than the stage) adding up to total."""
    out, n = [], 0
    while n < total:
        k = int(min(total - n, rng.choice([0, 1, 7, 100, 4095, 4096, 4097, 9000, 20000])))
        out.append(rng.integers(0, 256, k, dtype=np.uint8))
        n += k
    return out


def _write(path, chunks, cls, **kw):
    with open(path, "w+b") as f:
        w = cls(f, **kw)
        for c in chunks:
            w.write(c)
        if isinstance(w, atomic.DirectWriter):
            w.finish()
        rec = w.record()
    return rec


@pytest.mark.parametrize("total", [1, 4096, 8192, 8193, 50_001])
def test_direct_writer_bytes_and_checksum_equal_buffered(tmp_path, total):
    chunks = _chunks(np.random.default_rng(total), total)
    ref = _write(tmp_path / "a", chunks, atomic.HashingWriter)
    got = _write(tmp_path / "b", chunks, atomic.DirectWriter, stage_bytes=8192)
    assert (tmp_path / "b").read_bytes() == (tmp_path / "a").read_bytes()
    assert got == ref and ref["bytes"] == total


def _direct_supported(folder) -> bool:
    with open(os.path.join(folder, "probe"), "w+b") as f:
        return atomic.DirectWriter(f).direct


def test_direct_writer_falls_back_when_the_filesystem_refuses(tmp_path, monkeypatch):
    chunks = _chunks(np.random.default_rng(3), 30_000)
    ref = _write(tmp_path / "a", chunks, atomic.HashingWriter)
    real, refused = os.write, []
    with open(tmp_path / "b", "w+b") as f:
        w = atomic.DirectWriter(f, stage_bytes=8192)
        was_direct = w.direct

        def write(fd, data):
            if w.direct:  # the filesystem refuses direct writes (EINVAL), as some do
                refused.append(len(data))
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)
        for c in chunks:
            w.write(c)
        w.finish()
        rec = w.record()
    assert not w.direct and bool(refused) == was_direct  # it tried (if it could), was refused, fell back
    assert (tmp_path / "b").read_bytes() == (tmp_path / "a").read_bytes() and rec == ref


def test_direct_writer_other_errors_propagate(tmp_path, monkeypatch):
    with open(tmp_path / "b", "w+b") as f:
        w = atomic.DirectWriter(f, stage_bytes=4096)
        if not w.direct:
            pytest.skip("this filesystem takes no O_DIRECT")
        monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
        with pytest.raises(OSError, match="No space"):
            w.write(np.zeros(5000, np.uint8))


@pytest.mark.parametrize("skip_invalid", [False, True])
def test_compress_direct_and_buffered_outputs_identical(tmp_path, monkeypatch, skip_invalid):
    """Shards written with O_DIRECT (threshold 0, tiny blocks so every shard is streamed) equal
    the buffered ones byte for byte, including the header rewrite when invalid rows are dropped."""
    make_clip_layout(tmp_path / "in", rows=(300, 129, 64), dim=24)
    if skip_invalid:
        a = np.load(tmp_path / "in" / "img_emb" / "img_emb_0001.npy")
        a[[0, 77, 128]] = np.nan
        np.save(tmp_path / "in" / "img_emb" / "img_emb_0001.npy", a)

    monkeypatch.setattr(pipeline, "_DIRECT_MIN_BYTES", 0)  # every shard is "large": aligned header

    def run(out, direct):
        monkeypatch.setattr(pipeline, "_DIRECT_WRITES", direct)
        compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), drop_rate=0.5, batch_size=32,
                                 quiet=True, workers=1, skip_invalid=skip_invalid))

    used = []
    real_finish = atomic.DirectWriter.finish
    monkeypatch.setattr(atomic.DirectWriter, "finish", lambda self: (used.append(self.direct), real_finish(self))[1])
    run(tmp_path / "buffered", False)
    assert used == []
    run(tmp_path / "direct", True)
    assert len(used) == 3 and all(used) == _direct_supported(tmp_path)  # every shard through the direct writer
    assert tree_sha(tmp_path / "direct") == tree_sha(tmp_path / "buffered")
    if skip_invalid:
        assert load_centroids(str(tmp_path / "direct")).shape[0] == 300 + 129 + 64 - 3


def test_mapped_blocks_stay_valid_and_are_private(tmp_path):
    x = np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    blocks = list(iter_chunks(open_npy(str(tmp_path / "x.npy")), 30))  # every block kept
    assert [b.shape[0] for b in blocks] == [30, 30, 30, 10]
    assert np.array_equal(np.concatenate(blocks), x)
    blocks[0][0, 0] = 123.0  # a private map: writing to a block never reaches the file
    assert np.load(tmp_path / "x.npy")[0, 0] == x[0, 0]


def test_mapped_reader_refuses_a_file_that_shrank(tmp_path):
    x = np.zeros((100, 8), np.float32)
    np.save(tmp_path / "x.npy", x)
    shard = open_npy(str(tmp_path / "x.npy"))
    os.truncate(tmp_path / "x.npy", os.path.getsize(tmp_path / "x.npy") - 40 * 32)
    with pytest.raises(ValueError, match="truncated .npy .*x.npy: short read at row 60"):
        list(iter_chunks(shard, 30))


@pytest.mark.parametrize("d,k", [(512, 256), (515, 100), (16, 16), (17, 3), (5, 5)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_pair_mean_simd_path_bit_identical_to_generic(monkeypatch, d, k, m):
    g = torch.Generator().manual_seed(d * 10 + m)
    zs = [torch.randn(67, d, generator=g) * 100 for _ in range(m)]
    zs[0][5, d - 1] = float("nan")
    zs[-1][9, 0] = float("-inf")
    zs[m // 2][11, d // 2] = float("inf")
    feats = [torch.randperm(d, generator=g)[:k].sort().values]
    if k == d:
        feats.append(None)
    for f in feats:
        monkeypatch.delenv("SEMCOMP_PAIR_MEAN_GENERIC", raising=False)
        a, fa = ops.pair_mean(zs, f)
        monkeypatch.setenv("SEMCOMP_PAIR_MEAN_GENERIC", "1")
        b, fb = ops.pair_mean(zs, f)
        assert torch.equal(fa, fb) and fa.sum() == 67 - 3
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # bit for bit, NaNs included


def test_compress_leaves_the_garbage_collector_as_found(tmp_path):
    make_clip_layout(tmp_path / "in", rows=(20,), dim=8, metadata=False)
    before = gc.get_freeze_count()  # 0 unless something in this process froze objects
    compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(tmp_path / "o1"), drop_rate=0.5, quiet=True))
    assert gc.get_freeze_count() == before and gc.isenabled()
    gc.freeze()  # a caller that froze objects itself keeps them frozen
    try:
        frozen = gc.get_freeze_count()
        compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(tmp_path / "o2"), drop_rate=0.5, quiet=True))
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()



def test_large_shard_has_page_aligned_data_and_is_written_without_copies(tmp_path, monkeypatch):
    """An output shard of >= 4 MiB gets a 4096-byte .npy header (data on a page boundary, for any
    destination); its blocks (page-aligned pair_mean outputs) reach the disk without the staging
    copy where O_DIRECT is taken. Values equal the numpy computation; verify passes."""
    from semcomp_ext.compress.manifest import verify

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8192 + 100, 128)).astype(np.float32)
    b = rng.standard_normal((8192 + 100, 128)).astype(np.float32)
    np.save(tmp_path / "img_emb.npy", a)
    np.save(tmp_path / "text_emb.npy", b)
    staged = []
    real = atomic.DirectWriter._flush
    monkeypatch.setattr(atomic.DirectWriter, "_flush", lambda self, n: (staged.append(n), real(self, n))[1])
    out = tmp_path / "out"
    compress(CompressOptions(inputs=[str(tmp_path / "img_emb.npy"), str(tmp_path / "text_emb.npy")], out=str(out),
                             drop_rate=0.0, quiet=True, workers=1))
    path = out / "centroids" / "centroids_00000.npy"
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        assert f.tell() == 4096
    got = np.load(path)
    assert np.array_equal(got, (a + b) / np.float32(2))
    assert verify(str(out)) == []
    if _direct_supported(tmp_path):
        # the header page is flushed alone, the two whole 4096-row blocks go without staging, and
        # only the tail (100 rows, padded to whole pages) is staged
        assert staged == [4096, -(-100 * 128 * 4 // 4096) * 4096]
