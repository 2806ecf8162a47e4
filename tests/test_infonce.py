"""Fused InfoNCE (symmetric and rectangular) vs the pure-PyTorch reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import semcomp_ext as sc
from semcomp_ext import reference as R
from semcomp_ext._ops import ops

# (N, D, chunk): odd sizes, chunks that divide N, that do not, of one row, and larger than N.
SHAPES = [(257, 77, 0), (257, 77, 16), (257, 77, 1), (100, 33, 7), (64, 5, 64), (3, 1, 1000), (1, 4, 0)]


def _pair(n, d, device, dtype=torch.float64, normalize=True):
    a, b = torch.randn(n, d, dtype=dtype, device=device), torch.randn(n, d, dtype=dtype, device=device)
    if normalize:
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    return a, b


@pytest.mark.parametrize("n,d,chunk", SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_symmetric_matches_reference_fp64(n, d, chunk, reduction, device):
    a, b = _pair(n, d, device)
    a.requires_grad_(), b.requires_grad_()
    s = torch.tensor(11.0, dtype=torch.float64, device=device, requires_grad=True)
    out = sc.infonce_loss(a, b, logit_scale=s, reduction=reduction, chunk_size=chunk)
    ref = R.infonce_reference(a, b, s, reduction)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)  # a non-uniform upstream gradient for reduction="none"
    g = torch.autograd.grad((out * w).sum(), (a, b, s))
    gr = torch.autograd.grad((ref * w).sum(), (a, b, s))
    for x, y in zip(g, gr):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n,d,chunk", SHAPES[:4])
def test_one_directional_matches_reference(n, d, chunk, device):
    a, b = _pair(n, d, device)
    out = sc.infonce_loss(a, b, 0.1, reduction="none", symmetric=False, chunk_size=chunk)
    torch.testing.assert_close(out, R.infonce_rect_reference(a, b, 10.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nq,nk,offset,chunk", [(37, 111, 0, 0), (37, 111, 74, 8), (37, 111, 40, 5), (5, 5, 0, 2)])
def test_rect_with_offset(nq, nk, offset, chunk, device):
    q = torch.randn(nq, 19, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.randn(nk, 19, dtype=torch.float64, device=device, requires_grad=True)
    s = torch.tensor([2.5], dtype=torch.float64, device=device, requires_grad=True)
    out = sc.infonce_rect_loss(q, k, s, offset=offset, chunk_size=chunk)
    ref = R.infonce_rect_reference(q, k, s, offset)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.rand(nq, dtype=torch.float64, device=device)
    for x, y in zip(torch.autograd.grad((out * w).sum(), (q, k, s)), torch.autograd.grad((ref * w).sum(), (q, k, s))):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    assert s.shape == (1,)


def test_gradcheck_symmetric_including_logit_scale(device):
    a, b = _pair(9, 5, device)
    s = torch.tensor(2.0, dtype=torch.float64, device=device)
    for red in ("mean", "none"):
        f = lambda a, b, s: sc.infonce_loss(a, b, logit_scale=s, reduction=red, chunk_size=4)  # noqa: E731
        assert torch.autograd.gradcheck(f, (a.requires_grad_(), b.requires_grad_(), s.requires_grad_()))


def test_gradcheck_lse_outputs(device):
    """Gradients flowing into the saved log-sum-exp outputs are exact too."""
    a, b = _pair(7, 3, device)
    s = torch.tensor(1.5, dtype=torch.float64, device=device)
    f = lambda a, b, s: ops.infonce_fwd(a, b, s, 3)  # noqa: E731
    assert torch.autograd.gradcheck(f, (a.requires_grad_(), b.requires_grad_(), s.requires_grad_()))
    q, k = torch.randn(4, 3, dtype=torch.float64, device=device), torch.randn(9, 3, dtype=torch.float64, device=device)
    g = lambda q, k, s: ops.infonce_rect_fwd(q, k, s, 3, 2)  # noqa: E731
    assert torch.autograd.gradcheck(g, (q.requires_grad_(), k.requires_grad_(), s))


def _opcheck_args(device, dtype):
    a, b = _pair(13, 6, device, dtype)
    s = torch.tensor(3.0, dtype=dtype, device=device)
    n = a.shape[0]
    r, c = torch.randn(n, dtype=dtype, device=device), torch.randn(n, dtype=dtype, device=device)
    loss, rl, cl = ops.infonce_fwd(a, b, s, 4)
    _, lse = ops.infonce_rect_fwd(a[:5], b, s, 2, 4)
    return [
        (ops.infonce_fwd.default, (a.clone().requires_grad_(), b.clone().requires_grad_(), s.clone().requires_grad_(), 4)),
        (ops.infonce_bwd.default, (a, b, s, rl, cl, r, c, r, 4)),
        (ops.infonce_rect_fwd.default, (a[:5].clone().requires_grad_(), b.clone().requires_grad_(), s.clone().requires_grad_(), 2, 4)),
        (ops.infonce_rect_bwd.default, (a[:5].clone(), b, s, lse, r[:5].clone(), c[:5].clone(), 2, 4)),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(device, dtype):
    for op, args in _opcheck_args(device, dtype):
        torch.library.opcheck(op, args)


def test_opcheck_transposed_inputs(device):
    """Backward ops return contiguous gradients for transposed inputs; the fake kernels must
    say so too (a stride mismatch breaks compiled backward graphs)."""
    a, b = _pair(13, 6, device)
    at, bt = a.T.contiguous().T, b.T.contiguous().T
    s = torch.tensor(3.0, dtype=torch.float64, device=device)
    _, rl, cl = ops.infonce_fwd(a, b, s, 4)
    r = torch.rand(13, dtype=torch.float64, device=device)
    torch.library.opcheck(ops.infonce_bwd.default, (at, bt, s, rl, cl, r, r, r, 4))
    _, lse = ops.infonce_rect_fwd(a[:5], b, s, 2, 4)
    torch.library.opcheck(ops.infonce_rect_bwd.default, (at[:5], bt, s, lse, r[:5], r[:5], 2, 4))


def test_compiled_backward_with_transposed_inputs(device):
    w = torch.randn(6, 8, dtype=torch.float64, device=device, requires_grad=True)
    x = torch.randn(20, 6, dtype=torch.float64, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(w, x):
        z = (x @ w).T.contiguous().T  # transposed strides reach the op and its backward
        return sc.infonce_loss(z, z.flip(0), 0.5)

    (g,) = torch.autograd.grad(f(w, x), w)
    (gr,) = torch.autograd.grad(R.infonce_reference(x @ w, (x @ w).flip(0), 2.0), w)
    torch.testing.assert_close(g, gr)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    a, b = _pair(50, 8, device, torch.float32)
    a.requires_grad_()
    s = torch.tensor(5.0, device=device)

    @torch.compile(fullgraph=True, backend=backend)
    def f(a, b, s):
        return sc.infonce_loss(a, b, logit_scale=s) * 2

    out = f(a, b, s)
    ref = R.infonce_reference(a.double(), b.double(), s.double()) * 2
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_2x_of_torch_error(dtype, device):
    """Kernel error vs an fp64 ground truth (from the same rounded inputs) must be at most 2x
    the error of the plain-PyTorch reference computed in that dtype."""
    a, b = _pair(300, 64, device, torch.float32)
    a, b = a.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, device=device)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    truth = R.infonce_reference(a64, b64, s.double())
    t_grads = torch.autograd.grad(truth, (a64, b64))
    ours = sc.infonce_loss(a, b, logit_scale=s)
    o_grads = torch.autograd.grad(ours, (a, b))
    low = R.infonce_reference(a, b, s)
    l_grads = torch.autograd.grad(low, (a, b))
    assert ours.dtype == torch.float32 and o_grads[0].dtype == dtype
    err = lambda x, y: (x.double() - y).abs().max().item()  # noqa: E731
    assert err(ours, truth) <= 2 * err(low, truth) + 1e-7
    for o, l_, t in zip(o_grads, l_grads, t_grads):
        assert err(o, t) <= 2 * err(l_, t) + 1e-7


def _grads_vs_truth(fn, inputs):
    """(loss, grads) of fn at the inputs as given, and at their fp64 copies (the truth)."""
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    x64 = [x.detach().double().requires_grad_() for x in inputs]
    out, out64 = fn(*xs), fn(*x64)
    return (out, *torch.autograd.grad(out, xs)), (out64, *torch.autograd.grad(out64, x64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lowp_gemm", ["1", "0"])
@pytest.mark.parametrize("form", ["symmetric", "rect"])
def test_cpu_low_precision_paths_within_2x_of_torch_error(dtype, lowp_gemm, form, monkeypatch):
    """Both CPU paths for 16-bit inputs: GEMMs in the input dtype with fp32 accumulation (where
    build_info()["cpu_lowp_gemm"] lists the dtype) and inputs widened to fp32
    (SEMCOMP_CPU_LOWP_GEMM=0). Chunks that do not divide N, a 'sum' reduction (G ~ 1, far from
    the 'mean' scale: fp16's range for G is handled by a power-of-two scale), an offset in the
    rectangular form; loss and every gradient, logit scale included, within 2x the error of
    plain PyTorch in that dtype."""
    monkeypatch.setenv("SEMCOMP_CPU_LOWP_GEMM", lowp_gemm)
    a, b = _pair(203, 40, "cpu", torch.float32)
    a, b, s = a.to(dtype), b.to(dtype), torch.tensor(1 / 0.07)
    if form == "symmetric":
        ours = lambda a, b, s: sc.infonce_loss(a, b, logit_scale=s, reduction="sum", chunk_size=64)  # noqa: E731
        plain = lambda a, b, s: R.infonce_reference(a, b, s, "sum")  # noqa: E731
    else:
        ours = lambda q, k, s: sc.infonce_rect_loss(q[:150], k, s, offset=30, reduction="sum", chunk_size=64)  # noqa: E731
        plain = lambda q, k, s: R.infonce_rect_reference(q[:150], k, s.to(q.dtype), offset=30).sum()  # noqa: E731
    got, truth = _grads_vs_truth(ours, (a, b, s))
    low, _ = _grads_vs_truth(plain, (a, b, s))
    assert got[1].dtype == dtype and got[3].dtype == torch.float32
    for o, l_, t in zip(got, low, truth):
        assert (o.double() - t).abs().max() <= 2 * (l_.double() - t).abs().max() + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_gemm_path_is_taken_where_listed(dtype, monkeypatch):
    """Where build_info() lists the dtype, the default path differs from the widened-fp32 one
    (the GEMMs run in the input dtype); elsewhere the two are the same code."""
    a, b = _pair(64, 16, "cpu", torch.float32)
    a, b = a.to(dtype).requires_grad_(), b.to(dtype)
    monkeypatch.delenv("SEMCOMP_CPU_LOWP_GEMM", raising=False)
    listed = str(dtype).removeprefix("torch.") in sc.build_info()["cpu_lowp_gemm"]
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("SEMCOMP_CPU_LOWP_GEMM", flag)
        (g,) = torch.autograd.grad(sc.infonce_loss(a, b, 0.07), a)
        results.append(g)
    assert torch.equal(results[0], results[1]) == (not listed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lowp_gemm", ["1", "0"])
def test_cpu_low_precision_backward_sees_the_forward_logits(dtype, lowp_gemm, monkeypatch):
    """One pair (N = 1): exp(S_00 - r_0) is exactly 1 only if the backward recomputes S bit for
    bit as the forward did; then the loss and every gradient are exactly zero."""
    monkeypatch.setenv("SEMCOMP_CPU_LOWP_GEMM", lowp_gemm)
    a, b = torch.randn(1, 24).to(dtype).requires_grad_(), torch.randn(1, 24).to(dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, requires_grad=True)
    loss = sc.infonce_loss(a, b, logit_scale=s)
    grads = torch.autograd.grad(loss, (a, b, s))
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lowp_gemm", ["1", "0"])
def test_cpu_low_precision_with_zero_features_is_log_n(dtype, lowp_gemm, monkeypatch):
    """D = 0: every logit is 0, so each direction's loss is log N and every gradient is zero,
    on both 16-bit CPU paths (BLAS refuses a leading dimension of 0)."""
    monkeypatch.setenv("SEMCOMP_CPU_LOWP_GEMM", lowp_gemm)
    a = torch.zeros(7, 0, dtype=dtype, requires_grad=True)
    b = torch.zeros(7, 0, dtype=dtype, requires_grad=True)
    s = torch.tensor(1 / 0.07, requires_grad=True)
    loss = sc.infonce_loss(a, b, logit_scale=s)
    assert abs(loss.item() - math.log(7)) < 1e-2
    (gs,) = torch.autograd.grad(loss, (s,))
    assert gs.item() == 0.0
    rect = sc.infonce_rect_loss(a[:3], b, s, offset=2, reduction="none")
    assert torch.allclose(rect.float(), torch.full((3,), math.log(7)), atol=1e-2)


def test_large_logit_scale_is_stable(device):
    a, b = _pair(64, 16, device, torch.float32)
    out = sc.infonce_loss(a, b, logit_scale=100.0)
    torch.testing.assert_close(out.double(), R.infonce_reference(a.double(), b.double(), 100.0), rtol=1e-5, atol=1e-4)


def test_noncontiguous_inputs(device):
    a, b = _pair(40, 12, device)
    at, bt = a.T.contiguous().T, b[:, :].T.contiguous().T  # same values, transposed strides
    assert not at.is_contiguous()
    torch.testing.assert_close(sc.infonce_loss(at, bt), sc.infonce_loss(a, b))
    wide = torch.randn(40, 24, dtype=torch.float64, device=device)[:, ::2]
    torch.testing.assert_close(sc.infonce_loss(wide, b), R.infonce_reference(wide, b, 1 / 0.07))


def test_nan_in_nan_out(device):
    a, b = _pair(10, 4, device)
    a[3, 1] = float("nan")
    assert torch.isnan(sc.infonce_loss(a, b))
    rows = sc.infonce_loss(a, b, reduction="none")
    assert torch.isnan(rows).all()  # row 3's NaN reaches every column LSE


def test_temperature_and_logit_scale_agree(device):
    a, b = _pair(20, 8, device)
    torch.testing.assert_close(sc.infonce_loss(a, b, 0.2), sc.infonce_loss(a, b, logit_scale=5.0))
    assert math.isclose(float(sc.infonce_loss(a, b, 0.2, impl="reference")), float(sc.infonce_loss(a, b, 0.2)), rel_tol=1e-12)


def test_multimodal_infonce(device):
    zs = [F.normalize(torch.randn(30, 8, dtype=torch.float64, device=device), dim=1) for _ in range(3)]
    allp = sc.multimodal_infonce_loss(zs, 0.1)
    expect = sum(R.infonce_reference(zs[i], zs[j], 10.0) for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
    torch.testing.assert_close(allp, expect)
    anch = sc.multimodal_infonce_loss(zs, 0.1, pairs="anchor", anchor=2)
    torch.testing.assert_close(anch, (R.infonce_reference(zs[2], zs[0], 10.0) + R.infonce_reference(zs[2], zs[1], 10.0)) / 2)


BAD = [
    (lambda d: (torch.randn(5, 4, device=d), torch.randn(6, 4, device=d)), {}, "same number of rows"),
    (lambda d: (torch.randn(5, 4, device=d), torch.randn(5, 3, device=d)), {}, "feature dimension"),
    (lambda d: (torch.randn(5, device=d), torch.randn(5, device=d)), {}, "must be 2-D"),
    (lambda d: (torch.randn(2, 5, 4, device=d), torch.randn(2, 5, 4, device=d)), {}, "must be 2-D"),
    (lambda d: (torch.ones(5, 4, dtype=torch.long, device=d), torch.ones(5, 4, dtype=torch.long, device=d)), {}, "float32"),
    (lambda d: (torch.randn(0, 4, device=d), torch.randn(0, 4, device=d)), {}, "empty batch"),
    (lambda d: (torch.randn(5, 4, device=d), torch.randn(5, 4, device=d)), {"temperature": 0.0}, "temperature"),
    (lambda d: (torch.randn(5, 4, device=d), torch.randn(5, 4, device=d)), {"logit_scale": -1.0}, "logit_scale"),
    (lambda d: (torch.randn(5, 4, device=d), torch.randn(5, 4, device=d)), {"logit_scale": torch.ones(2)}, "one-element"),
    (lambda d: (torch.randn(5, 4, device=d), torch.randn(5, 4, device=d)), {"reduction": "avg"}, "reduction"),
    (lambda d: (torch.randn(5, 4, device=d), torch.randn(5, 4, device=d)), {"temperature": 0.5, "logit_scale": 2.0}, "not both"),
]


@pytest.mark.parametrize("make,kw,msg", BAD)
def test_bad_input_python(make, kw, msg, device):
    a, b = make(device)
    kw = {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}
    with pytest.raises(ValueError, match=msg):
        sc.infonce_loss(a, b, **kw)


def test_bad_input_reaches_native_checks():
    """The ops themselves validate too (they are public via torch.ops), with the same
    exception type as the Python API: ValueError."""
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match=r"infonce_fwd: logit_scale must be finite and > 0 .*got -2"):
        ops.infonce_fwd(a, b, torch.tensor(-2.0))
    with pytest.raises(ValueError, match=r"infonce_fwd: a and b must have the same number of rows"):
        ops.infonce_fwd(a, b[:3], torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"infonce_fwd: a and b must have the same dtype"):
        ops.infonce_fwd(a, b.double(), torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"infonce_fwd: a must be float32, float64, bfloat16 or float16"):
        ops.infonce_fwd(a.long(), b.long(), torch.tensor(2.0))
    with pytest.raises(ValueError, match=r"infonce_rect_fwd: offset must satisfy"):
        ops.infonce_rect_fwd(a, b, torch.tensor(2.0), 1)
    with pytest.raises(ValueError, match=r"infonce_bwd: row_lse must have shape \(5,\)"):
        ops.infonce_bwd(a, b, torch.tensor(2.0), torch.zeros(4), torch.zeros(5), torch.zeros(5), torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        sc.infonce_rect_loss(a, b, float("nan"))
    with pytest.raises(ValueError, match="infonce_loss: logit_scale must be finite and > 0, got 0.0"):
        sc.infonce_loss(a, b, logit_scale=torch.tensor(0.0))


def test_logit_bias_changes_nothing_but_gets_zero_grad(device):
    a, b = _pair(12, 6, device)
    bias = torch.tensor(-3.0, dtype=torch.float64, device=device, requires_grad=True)
    out = sc.infonce_loss(a, b, logit_bias=bias)
    assert out.item() == sc.infonce_loss(a, b).item()
    out.backward()
    assert bias.grad is not None and bias.grad.item() == 0.0


def test_autocast_casts_embeddings_not_the_scale():
    """Under torch.autocast the embeddings reach the kernels in the autocast dtype (the
    same result as passing bf16 tensors) while logit_scale keeps fp32; gradients come back
    to the fp32 inputs in fp32. (CPU autocast here; AutocastCUDA has the same kernel.)"""
    a, b = _pair(50, 16, "cpu", torch.float32)
    a.requires_grad_()
    s = torch.tensor(1 / 0.07, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sc.infonce_loss(a, b, logit_scale=s)
        rect = sc.infonce_rect_loss(a[:20], b, s, offset=5)
    want = sc.infonce_loss(a.detach().bfloat16(), b.bfloat16(), logit_scale=s.detach())
    torch.testing.assert_close(out.detach(), want)
    torch.testing.assert_close(rect.detach(), sc.infonce_rect_loss(a.detach()[:20].bfloat16(), b.bfloat16(), s.detach(), offset=5))
    ga, gs = torch.autograd.grad(out + rect.sum(), (a, s))
    assert ga.dtype == torch.float32 and gs.dtype == torch.float32 and torch.isfinite(ga).all()
    # the scale was not rounded to bf16: 1/0.07 is 14.2857 in fp32, 14.3125 in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        via_bf16_scale = sc.infonce_loss(a, b, logit_scale=s.detach().bfloat16().float())
    assert not torch.equal(out.detach(), via_bf16_scale.detach())


def test_autocast_under_torch_compile():
    a, b = _pair(40, 8, "cpu", torch.float32)
    s = torch.tensor(5.0)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(a, b, s):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sc.infonce_loss(a, b, logit_scale=s)

    torch.testing.assert_close(f(a, b, s), sc.infonce_loss(a.bfloat16(), b.bfloat16(), logit_scale=s))


@pytest.mark.parametrize("symmetric,offset", [(True, 0), (False, 0), (False, 3)])
def test_lse_reference_matches_the_ops_forward_outputs(symmetric, offset):
    """reference.infonce_lse_reference (the emulator drivers' ground truth) against every
    forward output of the fused CPU op (loss rows and log-sum-exps) and against the
    cross-entropy reference's loss."""
    q, k = torch.randn(9, 6, dtype=torch.float64), torch.randn(9 + offset, 6, dtype=torch.float64)
    s = torch.tensor(2.5, dtype=torch.float64)
    out = R.infonce_lse_reference(q, k, s, offset, symmetric=symmetric)
    if symmetric:
        native = ops.infonce_fwd(q, k, s)
        truth = R.infonce_rows_reference(q, k, s)
    else:
        native = ops.infonce_rect_fwd(q, k, s, offset)
        truth = R.infonce_rect_reference(q, k, s, offset)
    assert len(out) == len(native) == (3 if symmetric else 2)
    for ours, theirs in zip(out, native):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(out[0], truth)
