"""Fused sigmoid (SigLIP) loss: fp64 reference, gradcheck, opcheck, torch.compile, bf16 error
relative to PyTorch's, open_clip parity (single process and gloo on 2 and 4 ranks), bad input,
edge cases. CPU only here; the CUDA kernels are compile-checked (CI) and run on a GPU elsewhere."""

import pytest
import torch
import torch.nn.functional as F

import semcomp_ext as sc
from semcomp_ext.reference import sigmoid_loss_reference as reference

ops = torch.ops.semcomp
BACKWARDS = ["recompute", "onepass"]


def _inputs(na, d, nb=None, dtype=torch.float64, scale=3.0, bias=-2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(na, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    b = F.normalize(torch.randn(nb or na, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return a, b, torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)


def _loss_and_grads(fn, a, b, s, t, upstream=None):
    xs = [x.detach().clone().requires_grad_(True) for x in (a, b, s, t)]
    loss = fn(*xs)
    (loss if upstream is None else (loss * upstream).sum()).backward()
    return [loss.detach()] + [x.grad for x in xs]


def _assert_all_close(got, want, **tol):
    for name, x, y in zip(("loss", "grad_a", "grad_b", "grad_scale", "grad_bias"), got, want):
        torch.testing.assert_close(x.double(), y.double(), msg=lambda m, n=name: f"{n}: {m}", **tol)


# ---- fp64 reference ------------------------------------------------------------------------


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("na,nb,d,negative_only,chunk", [
    (1, 1, 4, False, 0),      # N = 1: a single positive pair
    (37, 37, 16, False, 8),   # several chunks with a tail
    (123, 123, 7, False, 0),
    (29, 11, 5, True, 4),     # negative-only block, Nb != Na
    (3, 40, 9, True, 0),
])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_fp64_reference(backward, na, nb, d, negative_only, chunk, reduction):
    a, b, s, t = _inputs(na, d, nb, scale=5.0, bias=-3.0)
    got = _loss_and_grads(lambda *x: sc.sigmoid_loss(*x, negative_only=negative_only, reduction=reduction,
                                                     backward=backward, chunk_size=chunk), a, b, s, t)
    want = _loss_and_grads(lambda *x: reference(*x, negative_only=negative_only, reduction=reduction), a, b, s, t)
    _assert_all_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_every_device_matches_fp64_reference(device, dtype, tol):
    a, b, s, t = _inputs(70, 12, scale=10.0, bias=-5.0)
    want = _loss_and_grads(reference, a, b, s, t)
    for backward in BACKWARDS:
        got = _loss_and_grads(lambda *x: sc.sigmoid_loss(*x, backward=backward, chunk_size=16),
                              *(x.to(device, dtype) for x in (a, b, s, t)))
        _assert_all_close([x.cpu() for x in got], want, rtol=tol, atol=tol)


def test_per_row_losses_with_per_row_upstream_gradients():
    a, b, s, t = _inputs(21, 6)
    up = torch.linspace(-1.0, 2.0, 21, dtype=torch.float64)
    got = _loss_and_grads(lambda *x: sc.sigmoid_loss(*x, reduction="none", chunk_size=5), a, b, s, t, up)
    want = _loss_and_grads(lambda *x: reference(*x, reduction="none"), a, b, s, t, up)
    _assert_all_close(got, want, rtol=1e-10, atol=1e-12)


def test_extreme_logits_stay_finite():
    # |z| up to ~1000: softplus and sigmoid must neither overflow nor lose the linear part
    a, b, s, t = _inputs(16, 8, scale=500.0, bias=-400.0)
    got = _loss_and_grads(sc.sigmoid_loss, a, b, s, t)
    want = _loss_and_grads(reference, a, b, s, t)
    assert all(torch.isfinite(x).all() for x in got)
    _assert_all_close(got, want, rtol=1e-9, atol=1e-9)
    got32 = _loss_and_grads(sc.sigmoid_loss, *(x.float() for x in (a, b, s, t)))
    _assert_all_close(got32, want, rtol=1e-4, atol=1e-3)


def test_confident_positive_keeps_its_small_loss():
    # z_ii = 30: softplus(-30) ~ 9.4e-14 must not be lost to cancellation (not softplus(z) - z)
    a = torch.eye(3, dtype=torch.float32)
    s, t = torch.tensor(40.0), torch.tensor(-10.0)
    rows = sc.sigmoid_loss(a, a, s, t, reduction="none")
    want = reference(a.double(), a.double(), s.double(), t.double(), reduction="none")
    torch.testing.assert_close(rows.double(), want, rtol=1e-5, atol=0)


def test_no_bias_and_number_parameters():
    a, b, s, _ = _inputs(9, 4)
    torch.testing.assert_close(sc.sigmoid_loss(a, b, 3.0), reference(a, b, s))
    torch.testing.assert_close(sc.sigmoid_loss(a, b, 3.0, -2.0), reference(a, b, s, torch.tensor(-2.0, dtype=a.dtype)))


def test_non_contiguous_inputs():
    big_a, big_b, s, t = _inputs(20, 24)
    a, b = big_a[::2, ::3], big_b.T.contiguous().T[1::2, ::3]  # strided rows and columns
    assert not a.is_contiguous() and not b.is_contiguous()
    for backward in BACKWARDS:
        got = _loss_and_grads(lambda *x: sc.sigmoid_loss(*x, backward=backward), a, b, s, t)
        want = _loss_and_grads(reference, a.contiguous(), b.contiguous(), s, t)
        _assert_all_close(got, want, rtol=1e-10, atol=1e-12)


def test_fp32_close_to_fp64():
    a, b, s, t = _inputs(200, 32, scale=10.0, bias=-10.0)
    want = _loss_and_grads(reference, a, b, s, t)
    got = _loss_and_grads(sc.sigmoid_loss, *(x.float() for x in (a, b, s, t)))
    _assert_all_close(got, want, rtol=2e-5, atol=1e-6)


# ---- gradcheck, opcheck, compile -----------------------------------------------------------


@pytest.mark.parametrize("backward", BACKWARDS)
@pytest.mark.parametrize("negative_only", [False, True])
def test_gradcheck_including_scale_and_bias(backward, negative_only):
    a, b, s, t = _inputs(7, 5, 7 if not negative_only else 4, scale=2.0, bias=-1.5)
    xs = [x.clone().requires_grad_(True) for x in (a, b, s, t)]
    # onepass: a repeated backward through the same graph recomputes (equal up to rounding)
    assert torch.autograd.gradcheck(
        lambda *x: sc.sigmoid_loss(*x, negative_only=negative_only, backward=backward, chunk_size=3), xs,
        nondet_tol=1e-12 if backward == "onepass" else 0.0)


def test_onepass_graph_can_be_backpropagated_twice():
    a, b, s, t = (x.clone().requires_grad_(True) for x in _inputs(33, 8, dtype=torch.float32))
    loss = sc.sigmoid_loss(a, b, s, t, backward="onepass", chunk_size=8)
    first = torch.autograd.grad(loss * 2.0, (a, b, s, t), retain_graph=True)
    second = torch.autograd.grad(loss * 2.0, (a, b, s, t))  # recomputed from the inputs
    for x, y in zip(first, second):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_gradcheck_per_row():
    xs = [x.clone().requires_grad_(True) for x in _inputs(6, 4, scale=2.0, bias=-1.0)]
    assert torch.autograd.gradcheck(lambda *x: sc.sigmoid_loss(*x, reduction="none", chunk_size=4), xs)


def test_opcheck():
    a, b, s, t = _inputs(9, 6)
    g = torch.rand(9, dtype=a.dtype)
    for args in [(a, b, s, t, False, 4), (a, b[:5], s, t, True, 0)]:
        rg = [x.clone().requires_grad_(True) if torch.is_tensor(x) else x for x in args]
        torch.library.opcheck(ops.sigmoid_fwd, rg)
        torch.library.opcheck(ops.sigmoid_fwd_bwd, rg)
        torch.library.opcheck(ops.sigmoid_bwd, args[:4] + (g,) + args[4:])


def test_torch_compile_fullgraph():
    a, b, s, t = _inputs(24, 8, dtype=torch.float32)
    compiled = torch.compile(sc.sigmoid_loss, fullgraph=True, backend="aot_eager")
    got = _loss_and_grads(compiled, a, b, s, t)
    want = _loss_and_grads(sc.sigmoid_loss, a, b, s, t)
    _assert_all_close(got, want, rtol=1e-6, atol=1e-7)


# ---- low precision -------------------------------------------------------------------------


def test_bf16_error_at_most_twice_torch_bf16():
    a, b, s, t = _inputs(96, 64, scale=10.0, bias=-5.0)
    truth = _loss_and_grads(reference, a, b, s, t)
    lows = [x.to(torch.bfloat16) for x in (a, b)] + [s.float(), t.float()]  # open_clip keeps s, t fp32
    ours = _loss_and_grads(sc.sigmoid_loss, *lows)
    theirs = _loss_and_grads(lambda x, y, u, v: reference(x, y, u.to(x.dtype), v.to(x.dtype)), *lows)
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    for name, o, p, w in zip(("loss", "grad_a", "grad_b", "grad_scale", "grad_bias"), ours, theirs, truth):
        err_ours = (o.double() - w).abs().max().item()
        err_torch = (p.double() - w).abs().max().item()
        assert err_ours <= 2 * err_torch + 1e-12, f"{name}: {err_ours:.3g} vs torch bf16 {err_torch:.3g}"


# ---- open_clip parity ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backward", ["auto", "recompute"])
def test_open_clip_parity_single_process(dtype, tol, backward):
    from semcomp_ext._compat import import_open_clip

    oc = import_open_clip().loss.SigLipLoss()
    a, b, s, t = _inputs(48, 16, dtype=dtype, scale=10.0, bias=-10.0)
    got = _loss_and_grads(sc.SigLipLoss(backward=backward), a, b, s, t)
    want = _loss_and_grads(oc, a, b, s, t)
    _assert_all_close(got, want, rtol=tol, atol=tol)
    assert sc.SigLipLoss()(a, b, s, t, output_dict=True)["contrastive_loss"].shape == ()


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_parity_with_open_clip(world):
    from semcomp_ext.distributed.launch import launch
    from semcomp_ext.siglip_verify import BACKWARDS as BWS
    from semcomp_ext.siglip_verify import DIST_IMPLS, make_data, siglip_parity_worker

    n, d = 4, 8
    per_rank = launch(siglip_parity_worker, world, (n, d), timeout=150, pg_timeout=30)
    tol = {"float64": 1e-12, "float32": 2e-6}
    for rank, res in enumerate(per_rank):
        assert len(res) == 2 * len(DIST_IMPLS) * len(BWS)
        for case, diffs in res.items():
            for what, value in diffs.items():
                if what != "value":
                    assert value <= tol[case.split("/")[0]], f"W={world} rank {rank} {case} {what}: {value:.3g}"
    # the ranks' losses add up to the global loss (positives on the global diagonal) / n
    img, txt, s, t = make_data(world, n, d, torch.float64)
    total = reference(img, txt, s, t, reduction="sum") / n
    for case in per_rank[0]:
        if case.startswith("float64"):
            assert abs(sum(r[case]["value"] for r in per_rank) - float(total)) < 1e-10, case


def test_world_size_without_process_group_is_a_clear_error():
    a, b, s, t = _inputs(4, 8)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        sc.SigLipLoss(rank=0, world_size=2)(a, b, s, t)
    with pytest.raises(ValueError, match="dist_impl must be one of"):
        sc.SigLipLoss(dist_impl="ring")


# ---- bad input -----------------------------------------------------------------------------


def test_bad_input_errors_name_the_argument():
    a, b, s, t = _inputs(5, 4)
    cases = [
        (TypeError, "a must be a torch.Tensor", lambda: sc.sigmoid_loss([[1.0]], b, s, t)),
        (ValueError, "b must be 2-D", lambda: sc.sigmoid_loss(a, b[0], s, t)),
        (ValueError, "a must be float32, float64", lambda: sc.sigmoid_loss(a.long(), b, s, t)),
        (ValueError, "same feature dimension D, got 4 and 3", lambda: sc.sigmoid_loss(a, b[:, :3], s, t)),
        (ValueError, "same number of rows N", lambda: sc.sigmoid_loss(a, b[:3], s, t)),
        (ValueError, "empty batch: a has 0 rows", lambda: sc.sigmoid_loss(a[:0], b[:0], s, t)),
        (ValueError, "logit_scale must be a one-element tensor", lambda: sc.sigmoid_loss(a, b, torch.ones(2), t)),
        (ValueError, "logit_scale must be finite, got nan", lambda: sc.sigmoid_loss(a, b, torch.tensor(float("nan")), t)),
        (ValueError, "logit_bias must be finite, got inf", lambda: sc.sigmoid_loss(a, b, s, float("inf"))),
        (TypeError, "logit_bias must be a number or a one-element tensor", lambda: sc.sigmoid_loss(a, b, s, "zero")),
        (ValueError, "logit_bias must be a floating tensor", lambda: sc.sigmoid_loss(a, b, s, torch.tensor(1))),
        (ValueError, "reduction must be one of", lambda: sc.sigmoid_loss(a, b, s, t, reduction="avg")),
        (ValueError, "backward must be one of", lambda: sc.sigmoid_loss(a, b, s, t, backward="fast")),
        (ValueError, "needs a scalar loss", lambda: sc.sigmoid_loss(a, b, s, t, reduction="none", backward="onepass")),
        (ValueError, "chunk_size must be an int >= 0", lambda: sc.sigmoid_loss(a, b, s, t, chunk_size=-1)),
        (TypeError, "negative_only must be a bool", lambda: sc.sigmoid_loss(a, b, s, t, negative_only=1)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()


def test_native_ops_raise_value_errors():
    a, b, s, t = _inputs(5, 4)
    with pytest.raises(ValueError, match="sigmoid_fwd: a must be 2-D"):
        ops.sigmoid_fwd(a[0], b, s, t)
    with pytest.raises(ValueError, match="sigmoid_fwd_bwd: a and b must have the same number of rows"):
        ops.sigmoid_fwd_bwd(a, b[:2], s, t)
    with pytest.raises(ValueError, match="sigmoid_bwd: grad_rows must have shape"):
        ops.sigmoid_bwd(a, b, s, t, torch.ones(3, dtype=a.dtype))
    with pytest.raises(ValueError, match="sigmoid_fwd: logit_bias must be finite"):
        ops.sigmoid_fwd(a, b, s, torch.tensor(float("nan"), dtype=a.dtype))
    with pytest.raises(ValueError, match="sigmoid_fwd: logit_scale must be a one-element tensor"):
        ops.sigmoid_fwd(a, b, torch.ones(2, dtype=a.dtype), t)


def test_nan_embeddings_propagate():
    a, b, s, t = _inputs(6, 4)
    a[2, 1] = float("nan")
    rows = sc.sigmoid_loss(a, b, s, t, reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3, 4, 5]]).all()
