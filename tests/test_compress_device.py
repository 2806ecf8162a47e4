"""`semcomp compress --device`: the pipelined device path (compress/device.py).

On a CPU machine the device code runs with device="cpu" (plain host buffers, no streams): its
output is compared byte for byte with the plain CPU path, and the block pipeline's ordering,
bounded in-flight blocks and early close are checked. The CUDA tests at the end run the real
`--device cuda` against `--device cpu` (benchmarks/gpu_check.sh runs them on a GPU)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from semcomp_ext.cli import main
from semcomp_ext.compress import CompressOptions, blocks, compress, job, pipeline, verify
from semcomp_ext.compress.device import BlockPipeline, _concept_layout, resolve_device

from _compress_data import make_clip_layout, tree_sha

ROWS = (40, 33, 5)  # batch 16: full blocks, a last partial block, a single-block shard


def _has_cuda():
    from semcomp_ext._ops import has_kernel

    return torch.cuda.is_available() and has_kernel("gather_columns", "cuda")


def _route_device(m):
    """Route compress through device.py with device="cpu" (what --device cuda does, on the CPU):
    the job's plan is built for the device backend on the host."""
    orig = job.build_plan

    def build(opts, device=None):
        return orig(opts, device="cpu")

    m.setattr(job, "build_plan", build)


@pytest.fixture
def device_path(monkeypatch):
    _route_device(monkeypatch)


def _opts(src, out, **kw):
    kw.setdefault("batch_size", 16)
    return CompressOptions(inputs=[str(src)], out=str(out), quiet=True, **kw)


def _ids(folder, rows, seed=1):
    """Skewed concept ids: a few concepts take most rows (long sums), many appear once."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i, n in enumerate(rows):
        big = rng.integers(0, 3, n)
        ids = np.where(rng.random(n) < 0.7, big, 100 + rng.integers(0, 40, n)) * 7919
        np.save(os.path.join(folder, f"ids_{i:04d}.npy"), ids.astype(np.int64))


def _compare(tmp_path, monkeypatch, **kw):
    """tree_sha of the plain CPU run and of the device-path run (device="cpu")."""
    ref, dev = tmp_path / "ref", tmp_path / "dev"
    compress(_opts(tmp_path / "in", ref, **kw))
    with monkeypatch.context() as m:
        _route_device(m)
        compress(_opts(tmp_path / "in", dev, **kw))
    assert verify(str(dev)) == []
    return tree_sha(ref), tree_sha(dev)


# ---- byte identity on the CPU ------------------------------------------------------------


@pytest.mark.parametrize("normalize,dtype,mods,drop", [
    ("none", np.float32, 2, 0.5),
    ("none", np.float32, 3, 0.0),   # keep all; division by 3 (not a power of two)
    ("none", np.float16, 3, 0.5),
    ("input", np.float32, 2, 0.5),
    ("output", np.float16, 2, 0.0),
    ("both", np.float32, 3, 0.5),
    ("none", np.float64, 2, 0.25),
])
def test_pairs_device_path_is_byte_identical(tmp_path, monkeypatch, normalize, dtype, mods, drop):
    names = ("img", "text", "audio")[:mods]
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=24, dtype=dtype, metadata=False, mods=names)
    ref, dev = _compare(tmp_path, monkeypatch, normalize=normalize, drop_rate=drop, workers=2)
    assert ref == dev and len(ref) == 4


@pytest.mark.parametrize("normalize,dtype,mods,drop", [
    ("none", np.float32, 2, 0.5),
    ("input", np.float16, 3, 0.0),
    ("both", np.float32, 2, 0.25),
])
def test_concepts_device_path_is_byte_identical(tmp_path, monkeypatch, normalize, dtype, mods, drop):
    names = ("img", "text", "audio")[:mods]
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=24, dtype=dtype, metadata=False, mods=names)
    _ids(tmp_path / "ids", ROWS)
    ref, dev = _compare(tmp_path, monkeypatch, normalize=normalize, drop_rate=drop, concepts=str(tmp_path / "ids"),
                        partitions=2, workers=2)
    assert ref == dev and len(ref) == 5


def test_concept_sums_follow_the_cpu_kernels_order():
    """The position-by-position sums equal the CPU segment kernel's bits, and the data is such
    that another summation order (reversed) gives different bits: the check can fail."""
    g = torch.Generator().manual_seed(0)
    n, d, m_count = 300, 20, 2
    ids = torch.randint(0, 4, (n,), generator=g) * 11
    ids[::7] = 1000 + torch.arange(len(ids[::7]))  # singletons beside long groups
    zs = [torch.randn(n, d, generator=g) * 10 ** torch.randint(-3, 4, (n, 1), generator=g) for _ in range(m_count)]
    u_ref, s_ref, c_ref = blocks.segment_sums(torch.cat(zs), ids.repeat(m_count))
    lay = _concept_layout(ids, m_count)
    rows, rank, inv, sizes = lay["arrays"]
    xs = torch.cat(zs).index_select(0, rows)
    acc = torch.zeros(len(lay["uniq"]), d)
    for j, nj in enumerate(lay["prefix"]):
        acc[:nj].add_(xs[lay["pos"][j]: lay["pos"][j] + nj])
    sums = ((acc * inv[:, None]) * sizes[:, None]).index_select(0, rank)
    assert torch.equal(lay["uniq"], u_ref) and torch.equal(lay["counts"], c_ref)
    assert sums.numpy().tobytes() == s_ref.numpy().tobytes()
    # reversed row order within each group: not the same bits
    rev = torch.zeros_like(acc)
    x = torch.cat(zs)
    _, inv_g = torch.unique(ids.repeat(m_count), return_inverse=True)
    for r in range(x.shape[0] - 1, -1, -1):
        rev[inv_g[r]] += x[r]
    assert not torch.equal(rev, acc.index_select(0, rank))


def _with_nans(root, dtype=np.float32):
    """NaN / Inf rows: block 0 of shard 0 has bad rows in both modalities (modality 0 at a
    later row than modality 1), shard 1 has an Inf in its last (partial) block."""
    for mod, rows in (("img", [(0, 9)]), ("text", [(0, 2), (0, 9)])):
        p = os.path.join(root, f"{mod}_emb", f"{mod}_emb_0000.npy")
        a = np.load(p)
        for _, r in rows:
            a[r, 3] = np.nan
        np.save(p, a)
    p = os.path.join(root, "img_emb", "img_emb_0001.npy")
    a = np.load(p)
    a[-1, 0] = np.inf
    np.save(p, a)


@pytest.mark.parametrize("mode", ["pairs", "concepts"])
@pytest.mark.parametrize("normalize", ["none", "input"])
def test_non_finite_rows_same_mask_and_error(tmp_path, monkeypatch, mode, normalize):
    if mode == "pairs":
        pytest.importorskip("pyarrow")  # the metadata of the kept rows is filtered
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=16, metadata=(mode == "pairs"))
    _with_nans(tmp_path / "in")
    kw = {"normalize": normalize, "drop_rate": 0.5}
    if mode == "concepts":
        _ids(tmp_path / "ids", ROWS)
        kw.update(concepts=str(tmp_path / "ids"), partitions=2)
    ref, dev = _compare(tmp_path, monkeypatch, skip_invalid=True, **kw)
    assert ref == dev
    # without --skip-invalid: the same one-line error, nothing committed
    errors = []
    for name, dev_path in (("a", False), ("b", True)):
        with monkeypatch.context() as m:
            if dev_path:
                _route_device(m)
            with pytest.raises(ValueError, match="non-finite") as e:
                compress(_opts(tmp_path / "in", tmp_path / f"err_{name}", workers=1, **kw))
        errors.append(str(e.value))
    assert errors[0] == errors[1]


def test_resume_on_another_device_is_identical(tmp_path, monkeypatch, device_path):
    make_clip_layout(tmp_path / "in", rows=(20, 21, 22, 23), dim=16, metadata=False)
    out = tmp_path / "out"
    real = pipeline.pair_task

    def failing(plan, i):
        if i == 2:
            raise RuntimeError("stop here")
        return real(plan, i)

    with monkeypatch.context() as m:
        m.setattr(pipeline, "pair_task", failing)
        with pytest.raises(RuntimeError, match="stop here"):
            compress(_opts(tmp_path / "in", out, drop_rate=0.5, workers=1))  # device path
    monkeypatch.undo()  # the resume runs on the plain CPU path
    compress(_opts(tmp_path / "in", out, drop_rate=0.5, workers=1, resume=True))
    compress(_opts(tmp_path / "in", tmp_path / "ref", drop_rate=0.5, workers=1))
    assert tree_sha(out) == tree_sha(tmp_path / "ref")
    m = json.loads((out / "manifest.json").read_text())
    assert "device" not in m and "device" not in m["parameters"]


# ---- the block pipeline --------------------------------------------------------------------


class _Source:
    """Blocks of sizes `sizes`, all served from ONE reused buffer (as the readers do)."""

    def __init__(self, sizes, dim=3):
        self.sizes, self.dim = sizes, dim
        self.pulled, self.closed = 0, False
        self.buf = torch.empty(max(sizes), dim)

    def block(self, k):
        n = self.sizes[k]
        return torch.arange(n * self.dim, dtype=torch.float32).reshape(n, self.dim) + 1000 * k

    def __iter__(self):
        try:
            for k in range(len(self.sizes)):
                v = self.buf[: self.sizes[k]]
                v.copy_(self.block(k))
                self.pulled += 1
                yield {"k": k}, [v]
        finally:
            self.closed = True


def _compute(meta, dev):
    return {"out": dev[0] * 2, "finite": torch.isfinite(dev[0]).all(1)}


@pytest.mark.parametrize("sizes", [(16, 16, 16, 16, 5), (7,), (16, 4)])
@pytest.mark.parametrize("lag", [0, 1, 2])
def test_pipeline_order_lag_and_bounded_blocks(sizes, lag):
    src = _Source(sizes)
    pipe = BlockPipeline("cpu", lag=lag)
    seen = []
    for meta, host, got in pipe.run(iter(src), _compute):
        k = meta["k"]
        # block k is handed out once block k+1 is computed and k+2 uploaded (lag 1), not before
        assert src.pulled == min(k + lag + 2, len(sizes))
        assert torch.equal(host[0], src.block(k))  # the staged copy, intact despite the reused buffer
        assert torch.equal(got["out"], src.block(k) * 2) and got["out"].shape[0] == sizes[k]
        seen.append(k)
    assert seen == list(range(len(sizes))) and src.closed
    assert pipe.stats["max_in_flight"] <= lag + 2 and pipe.stats["slots"] == lag + 2
    assert pipe.stats["allocations"] <= min(lag + 2, len(sizes))  # the ring is reused, not reallocated


def test_pipeline_early_close_and_errors():
    src = _Source((16,) * 6)
    gen = BlockPipeline("cpu", lag=1).run(iter(src), _compute)
    next(gen)
    gen.close()  # returns at once, closes the source (its readers)
    assert src.closed and src.pulled == 3

    def bad(meta, dev):
        if meta["k"] == 2:
            raise ValueError("block 2 failed")
        return _compute(meta, dev)

    src = _Source((16,) * 6)
    with pytest.raises(ValueError, match="block 2 failed"):
        list(BlockPipeline("cpu", lag=1).run(iter(src), bad))
    assert src.closed and src.pulled == 4
    with pytest.raises(ValueError, match="lag must be >= 0"):
        BlockPipeline("cpu", lag=-1)


def test_pair_task_closes_blocks_early(tmp_path, device_path):
    """The codec sample stops after a few rows: the device generator is closed, no thread left."""
    import threading

    make_clip_layout(tmp_path / "in", rows=(200, 50), dim=16, metadata=False)
    before = threading.active_count()
    m = compress(_opts(tmp_path / "in", tmp_path / "out", codec="int8", codec_sample_rows=20, workers=1))
    assert m["status"] == "complete" and threading.active_count() <= before + 1


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "", "CUDA", "cpu:0:1", None])
def test_bad_device_named(spec):
    with pytest.raises(ValueError, match=r"^device must be cpu, cuda or cuda:N, got"):
        resolve_device(spec)


def test_cuda_with_ray_is_refused():
    with pytest.raises(ValueError, match="^device cuda runs with engine 'local' only"):
        resolve_device("cuda", engine="ray")
    assert resolve_device("cpu", engine="ray") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_unavailable_is_one_line_before_any_work(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", rows=(5,), dim=8, metadata=False)
    rc = main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--device cuda: CUDA is not available" in err
    assert not (tmp_path / "out").exists()  # nothing was started
    rc = main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--device", "tpu"])
    assert rc == 2 and "--device must be cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


# ---- on a GPU ------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device and semcomp_ext built with CUDA")


def _cli(src, out, *args):
    assert main(["compress", str(src), "-o", str(out), "--batch-size", "16", "-q", *map(str, args)]) == 0
    return tree_sha(out)


@cuda
@pytest.mark.parametrize("normalize", ["none", "input", "output", "both"])
@pytest.mark.parametrize("dtype,mods", [(np.float32, 2), (np.float16, 3)])
def test_cuda_pairs_cli_matches_cpu(tmp_path, normalize, dtype, mods):
    names = ("img", "text", "audio")[:mods]
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=40, dtype=dtype, metadata=False, mods=names)
    _with_nans(tmp_path / "in")
    args = ["--drop-rate", "0.5", "--normalize", normalize, "--skip-invalid"]
    assert _cli(tmp_path / "in", tmp_path / "gpu", *args, "--device", "cuda") == \
        _cli(tmp_path / "in", tmp_path / "cpu", *args, "--device", "cpu")
    # every column kept, two workers sharing the GPU
    args = ["--normalize", normalize, "--skip-invalid", "--workers", "2"]
    assert _cli(tmp_path / "in", tmp_path / "gpu2", *args, "--device", "cuda") == \
        _cli(tmp_path / "in", tmp_path / "cpu2", *args)


@cuda
@pytest.mark.parametrize("normalize", ["none", "input", "both"])
@pytest.mark.parametrize("dtype,mods", [(np.float32, 2), (np.float16, 3)])
def test_cuda_concepts_cli_matches_cpu(tmp_path, normalize, dtype, mods):
    names = ("img", "text", "audio")[:mods]
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=40, dtype=dtype, metadata=False, mods=names)
    _ids(tmp_path / "ids", ROWS)
    args = ["--concepts", tmp_path / "ids", "--partitions", "2", "--drop-rate", "0.25", "--normalize", normalize]
    assert _cli(tmp_path / "in", tmp_path / "gpu", *args, "--device", "cuda") == \
        _cli(tmp_path / "in", tmp_path / "cpu", *args)


@cuda
def test_cuda_non_finite_error_matches_cpu(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=16, metadata=False)
    _with_nans(tmp_path / "in")
    errs = []
    for dev in ("cpu", "cuda"):
        assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / dev), "--batch-size", "16",
                     "--workers", "1", "--device", dev, "-q"]) == 2
        errs.append(capsys.readouterr().err)
    assert errs[0] == errs[1] and "non-finite" in errs[0]


@cuda
def test_cuda_pipeline_pinned_ring_and_order():
    src = _Source((64, 64, 64, 64, 9), dim=32)
    pipe = BlockPipeline("cuda", lag=1)
    seen = []
    for meta, host, got in pipe.run(iter(src), _compute):
        assert host[0].is_pinned() and got["out"].is_pinned() and got["out"].device.type == "cpu"
        assert torch.equal(got["out"], src.block(meta["k"]) * 2)
        seen.append(meta["k"])
    assert seen == list(range(5)) and pipe.stats["max_in_flight"] <= 3
    assert resolve_device("cuda").type == "cuda"


def test_plan_device_chooses_the_backend(tmp_path, monkeypatch):
    from semcomp_ext.compress import device as device_mod
    from semcomp_ext.compress.backends import backend_for
    from semcomp_ext.compress.plan import build_plan

    make_clip_layout(tmp_path / "in", rows=ROWS, dim=16, metadata=False)
    opts = _opts(tmp_path / "in", tmp_path / "out")
    plain = build_plan(opts)
    assert plain.device is None and backend_for(plain).name == "cpu"
    on_host = build_plan(opts, device="cpu")
    assert on_host.device == "cpu" and backend_for(on_host).name == "cuda" and "device" not in on_host.params
    # the route these tests use runs the job's blocks through device.py
    calls = []
    real = device_mod.pair_blocks

    def counted(*a, **kw):
        calls.append(1)
        yield from real(*a, **kw)

    monkeypatch.setattr(device_mod, "pair_blocks", counted)
    _route_device(monkeypatch)
    compress(opts)
    assert len(calls) == len(ROWS) and verify(str(tmp_path / "out")) == []
