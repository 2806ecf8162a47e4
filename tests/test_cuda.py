"""CUDA-only behaviour: CUDA-graph capture (no host syncs in the captured ops), the
reduce-overhead torch.compile mode, and fp16 gradients at a batch size where unscaled
entries of s*G fall below fp16's smallest subnormal. The op-by-op comparisons with the
reference run on CUDA through the `device` fixture of the other test files."""

import pytest
import torch
import torch.nn.functional as F

import semcomp_ext as sc
from semcomp_ext import reference as R
from semcomp_ext._ops import has_kernel, ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and has_kernel("infonce_fwd", "cuda")),
    reason="needs a CUDA device and semcomp_ext built with CUDA",
)


def _unit(n, d, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, device="cuda"), dim=1).to(dtype)


def _all_ops(a, b, s, x, ids, idx, feats):
    loss, r, c = ops.infonce_fwd(a, b, s, 0)
    coef = torch.full_like(r, 0.5 / a.shape[0])
    ga, gb, gs = ops.infonce_bwd(a, b, s, r, c, coef, coef, coef * 2, 0)
    lr, lse = ops.infonce_rect_fwd(a[:50], b, s, 20, 0)
    gq, gk, gs2 = ops.infonce_rect_bwd(a[:50], b, s, lse, torch.ones_like(lse), torch.ones_like(lse), 20, 0)
    m, cnt = ops.segment_mean(x, ids, 7, feats)
    gx = ops.segment_mean_bwd(m.contiguous(), ids, cnt, x.shape[1], feats)
    y = ops.gather_columns(x, idx)
    gy = ops.gather_columns_bwd(y, idx, x.shape[1])
    return [loss, r, c, ga, gb, gs, lr, lse, gq, gk, gs2, m, cnt, gx, y, gy]


def test_cuda_graph_capture_of_every_op():
    """Every op captures into a CUDA graph (a host sync during capture raises) and the
    replay on new inputs matches eager execution."""
    a, b = _unit(200, 64), _unit(200, 64)
    s = torch.tensor(14.3, device="cuda")
    x = torch.randn(300, 40, device="cuda")
    ids = torch.randint(0, 7, (300,), device="cuda")
    idx = torch.tensor([3, 0, 39, 3], device="cuda")
    feats = torch.tensor([5, 1, 1], device="cuda")
    static = [a, b, s, x, ids, idx, feats]
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture (workspaces, cuBLAS handles)
        _all_ops(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = _all_ops(*static)
    fresh = [_unit(200, 64), _unit(200, 64), torch.tensor(9.0, device="cuda"), torch.randn(300, 40, device="cuda"),
             torch.randint(0, 7, (300,), device="cuda"), torch.tensor([1, 2, 2, 38], device="cuda"),
             torch.tensor([0, 39, 20], device="cuda")]
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    expect = _all_ops(*fresh)
    for got, want in zip(outs, expect):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compile_reduce_overhead_training_step():
    """torch.compile(mode='reduce-overhead') (CUDA graphs) over a step that uses the loss,
    centroids and feature selection; its forward and backward (run by autograd through the
    compiled graph) match eager."""
    feats = torch.tensor([0, 5, 9, 15], device="cuda")
    cols = torch.tensor([3, 0], device="cuda")
    w0 = torch.randn(32, 16, device="cuda")

    def step(w, xa, xb, ids, s):
        za, zb = F.normalize(xa @ w, dim=1), F.normalize(xb @ w, dim=1)
        loss = sc.infonce_loss(za, zb, logit_scale=s)
        cent = sc.centroids(za, ids, 5, features=feats)
        return loss + sc.select_features(cent, cols).square().mean()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    s = torch.tensor(10.0, device="cuda")
    for _ in range(4):  # warm-up, record, replays
        xa, xb = torch.randn(64, 32, device="cuda"), torch.randn(64, 32, device="cuda")
        ids = torch.randint(0, 5, (64,), device="cuda")
        w1, w2 = w0.clone().requires_grad_(), w0.clone().requires_grad_()
        got = compiled(w1, xa, xb, ids, s)
        got.backward()
        want = step(w2, xa, xb, ids, s)
        want.backward()
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-6)


def test_bad_index_still_raises_on_cuda():
    x = torch.randn(10, 4, device="cuda")
    with pytest.raises((ValueError, RuntimeError), match="out of range|must be in"):
        sc.centroids(x, torch.tensor([0] * 9 + [5], device="cuda"), 3)
        torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients_at_large_n(dtype):
    """N = 32768, reduction='mean': the entries of s*G are ~1e-8..1e-25, below fp16's
    subnormals unless pre-scaled. Gradients must stay within 2x of what torch's own
    autograd reaches in the same dtype, and within 2% of the fp64 reference."""
    n, d = 32768, 64
    a, b = _unit(n, d, dtype).requires_grad_(), _unit(n, d, dtype).requires_grad_()
    s = torch.tensor(100.0, device="cuda", requires_grad=True)
    ga, gb, gs = torch.autograd.grad(sc.infonce_loss(a, b, logit_scale=s), (a, b, s))
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    sd = s.detach().double().requires_grad_()
    ra, rb, rs = torch.autograd.grad(R.infonce_reference(ad, bd, sd), (ad, bd, sd))
    del ad, bd
    at, bt = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    ta, tb = torch.autograd.grad(R.infonce_reference(at, bt, s.detach().to(dtype)), (at, bt))

    def rel(x, y):
        return float((x.double() - y).norm() / y.norm())

    for ours, theirs, ref in ((ga, ta, ra), (gb, tb, rb)):
        assert torch.isfinite(ours).all()
        e, et = rel(ours, ref), rel(theirs, ref)
        assert e <= max(2 * et, 2e-2), (e, et)
    assert abs(float(gs) - float(rs)) <= 1e-2 * abs(float(rs)) + 1e-6


@pytest.fixture
def tile_impl():
    previous = sc.set_infonce_cuda_impl("tile")
    yield
    sc.set_infonce_cuda_impl(previous)


@pytest.mark.parametrize("impl", ["tile", "mma", "wgmma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,chunk", [(70, 40, 0), (130, 33, 50), (257, 64, 0), (1000, 96, 256), (5, 8, 0)])
def test_tensor_core_impls_match_gemm_impl_and_fp64(impl, dtype, n, d, chunk):
    """The tensor-core kernels (WMMA tiles; ldmatrix + mma.sync; wgmma + TMA on sm_90a) against
    the gemm path (same rounding of G to the input dtype) and against the fp64 reference,
    symmetric and rectangular with an offset. The process-wide setting is a preference: where
    a kernel cannot take the inputs (wgmma with d % 8 != 0) the call runs gemm."""
    if impl == "wgmma":
        from semcomp_ext.bench.gpu_timing import why_not_here

        why = why_not_here("infonce", "wgmma", "cuda")  # an exact request says why it cannot run
        if why:
            pytest.skip(f"wgmma cannot run here: {why}")
    chosen = sc.set_infonce_cuda_impl(impl)
    try:
        _tensor_core_impl_matches_gemm_impl_and_fp64(dtype, n, d, chunk)
    finally:
        sc.set_infonce_cuda_impl(chosen)


def _tensor_core_impl_matches_gemm_impl_and_fp64(dtype, n, d, chunk):
    a, b = _unit(n, d, dtype).requires_grad_(), _unit(n, d, dtype).requires_grad_()
    s = torch.tensor(14.3, device="cuda", requires_grad=True)

    def both(fn):
        out_tile = fn()
        previous = sc.set_infonce_cuda_impl("gemm")
        try:
            out_gemm = fn()
        finally:
            sc.set_infonce_cuda_impl(previous)
        return out_tile, out_gemm

    def sym():
        loss = sc.infonce_loss(a, b, logit_scale=s, chunk_size=chunk)
        return (loss, *torch.autograd.grad(loss, (a, b, s)))

    def rect():
        q = a[: max(1, n // 2)]
        rows = sc.infonce_rect_loss(q, b, s, offset=n // 3, chunk_size=chunk)
        w = torch.linspace(0.5, 1.5, rows.shape[0], device="cuda")
        return (rows, *torch.autograd.grad((rows * w).sum(), (a, b, s)))

    for fn in (sym, rect):
        tile, gemm = both(fn)
        for x, y in zip(tile, gemm):
            assert torch.isfinite(x).all()
            torch.testing.assert_close(x.float(), y.float(), rtol=2e-2, atol=2e-4)
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    ref = R.infonce_reference(ad, bd, s.detach().double())
    ra, rb = torch.autograd.grad(ref, (ad, bd))
    loss, ga, gb, _ = sym()
    assert abs(float(loss) - float(ref)) <= 1e-3 * abs(float(ref))
    for g, r in ((ga, ra), (gb, rb)):
        assert float((g.double() - r).norm() / r.norm()) < 2e-2


def test_tile_impl_nan_and_bad_scale_and_graph_capture(tile_impl):
    a, b = _unit(100, 32, torch.bfloat16), _unit(100, 32, torch.bfloat16)
    a[3, 1] = float("nan")
    assert torch.isnan(sc.infonce_loss(a, b, reduction="none")).all()  # via every column LSE
    a[3, 1] = 0
    _, r, c = ops.infonce_fwd(a, b, torch.tensor(-1.0, device="cuda"), 0)
    assert torch.isnan(r).all() and torch.isnan(c).all()
    s = torch.tensor(10.0, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.infonce_fwd(a, b, s, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.infonce_fwd(a, b, s, 0)
    a.copy_(_unit(100, 32, torch.bfloat16))
    graph.replay()
    for x, y in zip(out, ops.infonce_fwd(a, b, s, 0)):
        torch.testing.assert_close(x, y)


def test_dk_accumulation_path_is_reported():
    a, b = _unit(64, 32, torch.bfloat16).requires_grad_(), _unit(64, 32, torch.bfloat16)
    sc.infonce_loss(a, b, 0.1).backward()
    assert sc.build_info()["infonce_dk_accumulate"] in ("addmm.dtype_out", "mm.dtype_out + add_")


def test_autocast_cuda_runs_the_bf16_kernels():
    a, b = _unit(300, 64).requires_grad_(), _unit(300, 64)
    s = torch.tensor(14.3, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = sc.infonce_loss(a, b, logit_scale=s)
    torch.testing.assert_close(out.detach(), sc.infonce_loss(a.detach().bfloat16(), b.bfloat16(), logit_scale=s))
    (g,) = torch.autograd.grad(out, a)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


# ---- the tile implementation: d = 0, chunked column partials -----------------------------


@pytest.mark.parametrize("sym", [True, False])
def test_tile_impl_with_zero_features_runs_the_gemm_path(sym, tile_impl):
    """d = 0: every logit is 0 (loss = log N per row), every gradient 0; routed to the gemm
    path (the tile kernels need d > 0)."""
    n = 70
    q = torch.empty(n, 0, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.empty(n + (0 if sym else 5), 0, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    if sym:
        rows = sc.infonce_loss(q, k, logit_scale=s, reduction="none")
    else:
        rows = sc.infonce_rect_loss(q, k, s, offset=3)
    torch.testing.assert_close(rows.float(), torch.full((n,), torch.log(torch.tensor(float(k.shape[0]))).item(),
                                                        device="cuda"))
    _, _, gs = torch.autograd.grad(rows.sum(), (q, k, s))
    assert float(gs) == 0.0


def test_tile_forward_chunks_its_column_partials(tile_impl):
    """N = 65536 (column partials of every row block would take 256 MiB): the forward keeps
    at most 128 MiB of them plus O(N), and the chunked merge equals the gemm path."""
    n, d = 65536, 64
    a, b = _unit(n, d, torch.bfloat16), _unit(n, d, torch.bfloat16)
    s = torch.tensor(20.0, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, r, c = ops.infonce_fwd(a, b, s, 0)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - 3 * n * 4  # outputs: loss, row and column LSEs
    assert extra <= 140 * 2**20, f"{extra / 2**20:.0f} MiB"
    previous = sc.set_infonce_cuda_impl("gemm")
    try:
        want = ops.infonce_fwd(a, b, s, 0)
    finally:
        sc.set_infonce_cuda_impl(previous)
    for x, y in zip((loss, r, c), want):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-4)


# ---- SigLIP in mixed precision -------------------------------------------------------------


def _siglip_grads(fn, a, b, s, t, g):
    a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    rows = fn(a, b, s, t)
    return (rows.detach(), *torch.autograd.grad((rows * g.to(rows.dtype)).sum(), (a, b)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [300, 8192])
def test_siglip_low_precision_within_twice_torch_same_dtype(dtype, n):
    """bf16/fp16 GEMM operands with fp32 accumulation: losses and gradients (upstream 1/N, so
    fp16 s*G needs its pre-scale) within twice plain PyTorch's error in the same dtype."""
    from semcomp_ext.siglip import sigmoid_loss_reference

    d = 64
    a, b = _unit(n, d, dtype), _unit(n, d, dtype)
    g = torch.full((n,), 1.0 / n, device="cuda")
    s, t = torch.tensor(10.0, device="cuda"), torch.tensor(-10.0, device="cuda")

    def ours(x, y, u, v):
        return sc.sigmoid_loss(x, y, u, v, reduction="none")

    def plain(x, y, u, v):
        return sigmoid_loss_reference(x, y, u.to(x.dtype), v.to(x.dtype), reduction="none")

    def exact(x, y, u, v):
        return sigmoid_loss_reference(x.double(), y.double(), u.double(), v.double(), reduction="none")

    mine, theirs, truth = (_siglip_grads(f, a, b, s, t, g) for f in (ours, plain, exact))
    assert mine[1].dtype == dtype and mine[2].dtype == dtype
    for name, o, p, w in zip(("loss", "grad_a", "grad_b"), mine, theirs, truth):
        e_ours, e_torch = (float((x.double() - w).norm() / w.norm()) for x in (o, p))
        assert torch.isfinite(o).all() and e_ours <= 2 * e_torch + 1e-7, (name, e_ours, e_torch)
