"""API contracts of the losses and ops: a learnable temperature, temperature or logit_scale
(never both), exact zeros at N = 1, one exception type for bad input, one-way layering (no
import cycle, no private names across modules), mixed-dtype promotion, lazy exports."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import semcomp_ext as sc
from semcomp_ext import functional
from semcomp_ext._ops import ops


def _pair(n=9, d=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    b = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return a, b


def _temp(value=0.15, shape=()):
    return torch.full(shape, value, dtype=torch.float64, requires_grad=True)


# ---- 1. a learnable temperature receives its gradient -------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("shape", [(), (1,)])
def test_infonce_loss_temperature_tensor_gradcheck(symmetric, shape):
    a, b = _pair(5, 3)
    a.requires_grad_()
    b.requires_grad_()
    t = _temp(shape=shape)
    assert torch.autograd.gradcheck(lambda a, b, t: sc.infonce_loss(a, b, t, symmetric=symmetric), (a, b, t))


def test_infonce_loss_temperature_gradient_value():
    """d/dt equals what autograd gives for the reference with logits <a, b> / t."""
    a, b = _pair()
    t = _temp()
    (got,) = torch.autograd.grad(sc.infonce_loss(a, b, t), t)
    t2 = _temp()
    logits = a @ b.T / t2
    labels = torch.arange(a.shape[0])
    ref = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    (want,) = torch.autograd.grad(ref, t2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got.item() != 0.0


def test_infonce_loss_float32_temperature_tensor_gets_a_gradient():
    a, b = _pair(dtype=torch.float32)
    t = torch.tensor(0.1, requires_grad=True)
    sc.infonce_loss(a, b, t).backward()
    assert t.grad is not None and t.grad.dtype == torch.float32 and t.grad.item() != 0.0


def test_infonce_loss_module_temperature_parameter_gradcheck():
    a, b = _pair(5, 3)
    t = torch.nn.Parameter(torch.tensor(0.2, dtype=torch.float64))
    mod = sc.InfoNCELoss(t)
    assert any(p is t for p in mod.parameters())  # an nn.Parameter registers on the module
    assert torch.autograd.gradcheck(lambda a, b, t: sc.InfoNCELoss(t)(a, b), (a.requires_grad_(), b, t))
    mod(a, b).backward()
    assert t.grad is not None and t.grad.item() != 0.0
    torch.testing.assert_close(mod.logit_scale, 1.0 / t)


def test_infonce_loss_module_refuses_learnable_with_tensor():
    with pytest.raises(ValueError, match="learnable=True"):
        sc.InfoNCELoss(torch.tensor(0.1), learnable=True)


@pytest.mark.parametrize("pairs", ["all", "anchor"])
def test_multimodal_temperature_tensor_gradcheck(pairs):
    zs = [_pair(7, 4, seed=s)[0] for s in range(3)]
    t = _temp()
    assert torch.autograd.gradcheck(lambda t: sc.multimodal_infonce_loss(zs, t, pairs=pairs), (t,))


# ---- 1b. temperature or logit_scale, never both ---------------------------------------------


@pytest.mark.parametrize("call", [
    lambda a, b: sc.infonce_loss(a, b, 0.07, logit_scale=1.0),
    lambda a, b: sc.infonce_loss(a, b, temperature=0.07, logit_scale=torch.tensor(2.0)),
    lambda a, b: sc.infonce_loss(a, b, 0.5, logit_scale=1.0, symmetric=False),
    lambda a, b: sc.multimodal_infonce_loss([a, b], 0.07, logit_scale=1.0),
    lambda a, b: sc.multimodal_infonce_loss([a, b], 0.07, logit_scale=1.0, distributed=True),
], ids=["positional-0.07", "keyword-0.07", "rect", "multimodal", "multimodal-distributed"])
def test_temperature_and_logit_scale_both_given_is_value_error(call):
    """An explicit temperature, even equal to the default 0.07, together with logit_scale."""
    a, b = _pair(5, 4, torch.float32)
    with pytest.raises(ValueError, match=r"give temperature or logit_scale, not both \(got temperature=0\.\d+"):
        call(a, b)


def test_default_temperature_gives_way_to_logit_scale():
    import copy
    import inspect
    import pickle

    a, b = _pair(6, 4)
    by_scale = sc.infonce_loss(a, b, logit_scale=2.0)
    torch.testing.assert_close(by_scale, sc.infonce_loss(a, b, 0.5), rtol=0, atol=0)
    torch.testing.assert_close(sc.multimodal_infonce_loss([a, b], logit_scale=2.0), by_scale, rtol=0, atol=0)
    default = inspect.signature(sc.infonce_loss).parameters["temperature"].default
    assert default == 0.07 and repr(default) == "0.07"
    torch.testing.assert_close(sc.infonce_loss(a, b), sc.infonce_loss(a, b, 0.07), rtol=0, atol=0)
    for same in (copy.copy(default), copy.deepcopy(default), pickle.loads(pickle.dumps(default))):
        torch.testing.assert_close(sc.infonce_loss(a, b, same, logit_scale=2.0), by_scale, rtol=0, atol=0)


# ---- 2. N = 1: loss and gradients exactly zero ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_single_pair_gradient_is_exactly_zero(dtype, symmetric, device):
    """With one row the loss is LSE of one logit minus that logit: identically 0. The backward
    must recompute the forward's logit bit for bit to get exactly 0 (not ~1e-5)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(8):
        q = torch.randn(1, 64, generator=g).to(device, dtype).requires_grad_()
        k = torch.randn(1, 64, generator=g).to(device, dtype).requires_grad_()
        s = torch.tensor(14.3, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         requires_grad=True)
        loss = sc.infonce_loss(q, k, logit_scale=s, symmetric=symmetric)
        loss.backward()
        assert loss.item() == 0.0
        assert q.grad.abs().max().item() == 0.0
        assert k.grad.abs().max().item() == 0.0
        assert s.grad.item() == 0.0


def test_rect_single_row_against_one_key_is_exactly_zero():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(1, 32, generator=g).requires_grad_()
    k = torch.randn(1, 32, generator=g).requires_grad_()
    s = torch.tensor(100.0, requires_grad=True)
    loss = sc.infonce_rect_loss(q, k, s, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and q.grad.abs().max().item() == 0.0 and k.grad.abs().max().item() == 0.0
    assert s.grad.item() == 0.0


# ---- 3. one exception type for bad input ---------------------------------------------------


def test_native_segment_and_gather_ops_raise_value_error():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"segment_mean: ids\[2\] = 9 is out of range \[0, 3\)"):
        ops.segment_mean(x, torch.tensor([0, 1, 9, 0, 1, 2]), 3, None)
    with pytest.raises(ValueError, match=r"segment_mean: ids\[0\] = -2 is out of range"):
        ops.segment_mean(x, torch.tensor([-2, 1, 0, 0, 1, 2], dtype=torch.int32), 3, None)
    with pytest.raises(ValueError, match="segment_mean: ids must be int64 or int32"):
        ops.segment_mean(x, torch.zeros(6), 3, None)
    with pytest.raises(ValueError, match="segment_mean: num_groups must be >= 1"):
        ops.segment_mean(x, torch.zeros(6, dtype=torch.long), 0, None)
    with pytest.raises(ValueError, match=r"segment_mean: features\[0\] = 4 is out of range \[0, 4\)"):
        ops.segment_mean(x, torch.zeros(6, dtype=torch.long), 1, torch.tensor([4]))
    with pytest.raises(ValueError, match=r"segment_mean_bwd: counts must have shape"):
        ops.segment_mean_bwd(torch.randn(3, 4), torch.zeros(6, dtype=torch.long), torch.ones(2, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"gather_columns: index\[1\] = 4 is out of range \[0, 4\)"):
        ops.gather_columns(x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="gather_columns: x must be 2-D"):
        ops.gather_columns(x[0], torch.tensor([0]))
    with pytest.raises(ValueError, match=r"gather_columns_bwd: index\[0\] = 7 is out of range"):
        ops.gather_columns_bwd(torch.randn(6, 1), torch.tensor([7]), 4)


def test_fake_kernels_raise_value_error():
    """Meta tensors run the fake kernels (what torch.compile traces): same exception type."""
    def m(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    with pytest.raises(ValueError, match="infonce_fwd: a and b row counts differ"):
        ops.infonce_fwd(m(5, 4), m(3, 4), m(()))
    with pytest.raises(ValueError, match="infonce_rect_fwd: offset must satisfy"):
        ops.infonce_rect_fwd(m(5, 4), m(6, 4), m(()), 2)
    with pytest.raises(ValueError, match="segment_mean: ids must have one entry per row"):
        ops.segment_mean(m(5, 4), m(4, dtype=torch.long), 3, None)
    with pytest.raises(ValueError, match="gather_columns: x must be 2-D"):
        ops.gather_columns(m(5), m(2, dtype=torch.long))


def test_python_api_out_of_range_is_value_error():
    x = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"ids\[5\] = 3 is out of range \[0, 3\)"):
        sc.centroids(x, torch.tensor([0, 1, 2, 0, 1, 3]), 3)
    with pytest.raises(ValueError, match=r"index\[0\] = -1 is out of range"):
        sc.select_features(x, torch.tensor([-1]))
    with pytest.raises(ValueError, match=r"features\[0\] = 9 is out of range \[0, 4\)"):
        sc.centroids(x, torch.zeros(6, dtype=torch.long), 1, features=torch.tensor([9]))
    with pytest.raises(TypeError, match="num_groups must be an int"):
        sc.centroids(x, torch.zeros(6, dtype=torch.long), "3")


@pytest.mark.parametrize("call,exc,msg", [
    (lambda a, b: sc.infonce_loss(a, b, temperature="0.07"), TypeError, r"temperature must be a number .*str '0.07'"),
    (lambda a, b: sc.infonce_loss(a, b, temperature=True), TypeError, "temperature must be a number"),
    (lambda a, b: sc.infonce_loss(a, b, logit_scale="14"), TypeError, "logit_scale must be a number"),
    (lambda a, b: sc.infonce_loss(a, b, "0.07", logit_scale=2.0), TypeError, "temperature must be a number"),
    (lambda a, b: sc.infonce_loss(a, b, logit_scale=torch.tensor(-2.0)), ValueError,
     r"infonce_loss: logit_scale must be finite and > 0, got -2.0"),
    (lambda a, b: sc.infonce_loss(a, b, logit_scale=torch.tensor([float("nan")])), ValueError,
     r"logit_scale must be finite and > 0, got nan"),
    (lambda a, b: sc.infonce_loss(a, b, torch.tensor(-0.1)), ValueError, r"temperature must be finite and > 0, got -0.1"),
    (lambda a, b: sc.infonce_loss(a, b, torch.tensor([0.1, 0.2])), ValueError, "temperature must be a one-element tensor"),
    (lambda a, b: sc.infonce_loss(a, b, torch.tensor(1)), ValueError, "temperature must be a floating tensor"),
    (lambda a, b: sc.infonce_loss(a, b, torch.tensor(0.1), logit_scale=2.0), ValueError, "not both"),
    (lambda a, b: sc.infonce_rect_loss(a, b, torch.tensor(0.0)), ValueError, "infonce_rect_loss: logit_scale must be finite and > 0, got 0.0"),
    (lambda a, b: sc.multimodal_infonce_loss([a, b], "0.1"), TypeError, "temperature must be a number"),
    (lambda a, b: sc.multimodal_infonce_loss([a, b], torch.tensor(-1.0)), ValueError, "temperature must be finite and > 0"),
    (lambda a, b: sc.InfoNCELoss("0.07"), TypeError, "InfoNCELoss: temperature must be a number"),
    (lambda a, b: sc.InfoNCELoss(-1.0), ValueError, "InfoNCELoss: temperature must be finite and > 0"),
    (lambda a, b: sc.ClipLoss()(a, b, torch.tensor(-3.0)), ValueError, "logit_scale must be finite and > 0, got -3.0"),
    (lambda a, b: sc.infonce_loss(a, b, logit_bias="1"), TypeError, "logit_bias must be a number"),
])
def test_scalar_arguments_are_validated_consistently(call, exc, msg):
    a, b = _pair(5, 4, torch.float32)
    with pytest.raises(exc, match=msg):
        call(a, b)


# ---- 4. no import cycle: functional does not load distributed -------------------------------


def test_functional_does_not_import_distributed():
    code = (
        "import sys\n"
        "import semcomp_ext.functional\n"
        "import semcomp_ext\n"
        "assert 'semcomp_ext.distributed' not in sys.modules, sorted(m for m in sys.modules if 'semcomp' in m)\n"
        "import semcomp_ext.distributed\n"  # the other direction is allowed
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_one_multimodal_infonce_loss():
    from semcomp_ext import losses

    assert not hasattr(functional, "multimodal_infonce_loss")
    assert sc.multimodal_infonce_loss is losses.multimodal_infonce_loss


def test_sigmoid_loss_is_layered_like_infonce():
    """sigmoid_loss in functional, SigLipLoss beside ClipLoss, the reference in reference, the
    neighbour exchange in distributed; semcomp_ext.siglip only re-exports them."""
    from semcomp_ext import losses, reference, siglip
    from semcomp_ext.distributed import neighbour

    assert sc.sigmoid_loss is functional.sigmoid_loss is siglip.sigmoid_loss
    assert sc.SigLipLoss is losses.SigLipLoss is siglip.SigLipLoss
    assert siglip.sigmoid_loss_reference is reference.sigmoid_loss_reference
    assert losses._SIGLIP_DIST_IMPLS == neighbour.DIST_IMPLS


def test_no_module_imports_private_names_of_another():
    """`from .x import _name` and `x._name` across the loss/op modules: what is shared is public."""
    import ast
    import pathlib

    root = pathlib.Path(sc.__file__).parent
    files = [root / f for f in ("_ops.py", "functional.py", "validation.py", "losses.py", "siglip.py", "reference.py",
                                "siglip_verify.py", "metrics.py", "features.py")]
    files += sorted((root / "distributed").glob("*.py")) + sorted((root / "bench").glob("*.py"))
    bad = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                bad += [f"{f.name}: from {node.module} import {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__") and a.name != "_C"]
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and isinstance(node.value, ast.Name) and node.value.id in ("F", "functional", "losses", "validation")):
                bad.append(f"{f.name}: {node.value.id}.{node.attr}")
    assert not bad, bad


def test_clip_loss_impls_match_the_distributed_package():
    from semcomp_ext import losses
    from semcomp_ext.distributed import IMPLS

    assert losses._IMPLS == IMPLS


def test_search_and_build_index_exported_without_importing_faiss():
    code = (
        "import sys\n"
        "import semcomp_ext as sc\n"
        "assert 'faiss' not in sys.modules and 'semcomp_ext.compress.index' not in sys.modules\n"
        "from semcomp_ext.compress import index\n"
        "assert sc.search is index.search and sc.build_index is index.build_index\n"
        "assert {'search', 'build_index'} <= set(sc.__all__)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


# ---- 5. mixed dtypes are promoted ----------------------------------------------------------


def test_autocast_promotes_mixed_dtypes():
    """bf16 autocast, image features fp32 (under autocast), text features cached in fp32 or
    bf16: the result equals both embeddings cast to bf16, as autocast does for a matmul."""
    a, b = _pair(40, 16, torch.float32)
    a.requires_grad_()
    s = torch.tensor(1 / 0.07)
    want = sc.infonce_loss(a.detach().bfloat16(), b.bfloat16(), logit_scale=s)
    for other in (b.bfloat16(), b.half()):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = sc.infonce_loss(a, other, logit_scale=s)
            clip = sc.ClipLoss()(a, other, s)
            mm = sc.multimodal_infonce_loss([a, other], logit_scale=s)
        assert torch.equal(got.detach(), want) if other.dtype == torch.bfloat16 else torch.isfinite(got)
        torch.testing.assert_close(clip.detach(), got.detach())
        torch.testing.assert_close(mm.detach(), got.detach())
        (ga,) = torch.autograd.grad(got, a)
        assert ga.dtype == torch.float32 and torch.isfinite(ga).all()


def test_mixed_dtypes_outside_autocast_promote():
    a, b = _pair(20, 8, torch.float32)
    a.requires_grad_()
    bb = b.bfloat16().requires_grad_()
    got = sc.infonce_loss(a, bb)
    want = sc.infonce_loss(a.detach(), bb.detach().float())
    assert torch.equal(got.detach(), want)
    got.backward()
    assert a.grad.dtype == torch.float32 and bb.grad.dtype == torch.bfloat16
    # fp32 with fp64 -> fp64, loss in fp64
    a64 = a.detach().double()
    out = sc.infonce_loss(a.detach(), a64)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, sc.infonce_loss(a64, a64), rtol=0, atol=0)
    rect = sc.infonce_rect_loss(a.detach()[:5], bb.detach(), 3.0, offset=2)
    torch.testing.assert_close(rect, sc.infonce_rect_loss(a.detach()[:5], bb.detach().float(), 3.0, offset=2), rtol=0, atol=0)
