"""The per-call CUDA implementation choice (impl=) of the InfoNCE and sigmoid ops, the measured
table behind impl="auto" (semcomp_ext/kernel_choice.py, benchmarks.impl_table) and its
precedence; on a CUDA device every implementation that runs there against fp64 and the others."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

import semcomp_ext as sc
from semcomp_ext import kernel_choice as kc
from semcomp_ext import reference as R
from semcomp_ext._ops import ops
from semcomp_ext.bench import impl_table

IMPL_OPS = ("infonce_fwd", "infonce_bwd", "infonce_rect_fwd", "infonce_rect_bwd", "sigmoid_fwd", "sigmoid_bwd",
            "sigmoid_fwd_bwd")
HAS_CUDA = torch.cuda.is_available() and sc.build_info().get("cuda")
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and semcomp_ext built with CUDA")


@pytest.fixture
def setting():
    """Restores the process-wide setting after the test."""
    previous = sc.get_infonce_cuda_impl()
    yield sc.set_infonce_cuda_impl
    sc.set_infonce_cuda_impl(previous)


def _pair(n=7, d=5, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)
    b = F.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)
    return a, b


# ---- the op schemas and the CPU kernels ---------------------------------------------------------


@pytest.mark.parametrize("name", IMPL_OPS)
def test_schema_ends_with_impl_defaulting_to_the_process_wide_choice(name):
    args = getattr(ops, name).default._schema.arguments
    assert args[-1].name == "impl" and str(args[-1].type) == "int" and args[-1].default_value == 0
    assert args[-2].name == "chunk_size"


def test_cpu_kernels_take_the_default_and_preferences_and_refuse_exact_requests():
    a, b = _pair()
    s, t = torch.tensor(5.0), torch.tensor(-1.0)
    want = ops.infonce_fwd(a, b, s)
    for code in (0, -1, -2, -3, -4):  # the CPU has one implementation: same bits
        for x, y in zip(ops.infonce_fwd(a, b, s, 0, code), want):
            assert torch.equal(x, y)
        assert torch.equal(ops.sigmoid_fwd(a, b, s, t, False, 0, code), ops.sigmoid_fwd(a, b, s, t))
    for code, name in ((1, "gemm"), (2, "tile"), (3, "mma"), (4, "wgmma")):
        with pytest.raises(ValueError, match=rf"infonce_fwd: impl={code} \({name}\) is a CUDA implementation"):
            ops.infonce_fwd(a, b, s, 0, code)
        with pytest.raises(ValueError, match=rf"infonce_rect_bwd: impl={code} \({name}\)"):
            ops.infonce_rect_bwd(a, b, s, want[1], want[1], want[1], 0, 0, code)
        with pytest.raises(ValueError, match=rf"sigmoid_fwd_bwd: impl={code} \({name}\)"):
            ops.sigmoid_fwd_bwd(a, b, s, t, False, 0, code)
    for code in (5, -5):
        with pytest.raises(ValueError, match=f"impl must be 0 .*got {code}"):
            ops.infonce_fwd(a, b, s, 0, code)
        with pytest.raises(ValueError, match=f"impl must be 0 .*got {code}"):
            ops.sigmoid_bwd(a, b, s, t, torch.ones(7), False, 0, code)


def test_opcheck_with_an_impl_argument():
    a, b = _pair(6, 4, torch.float64)
    s = torch.tensor(3.0, dtype=torch.float64)
    t = torch.tensor(-2.0, dtype=torch.float64)

    def rg(*xs):
        return tuple(x.clone().requires_grad_() for x in xs)

    _, r, c = ops.infonce_fwd(a, b, s, 0, -3)
    coef = torch.rand(6, dtype=torch.float64)
    _, lse = ops.infonce_rect_fwd(a[:3], b, s, 2, 0, -3)
    cases = [
        (ops.infonce_fwd.default, rg(a, b, s) + (4, -3)),
        (ops.infonce_bwd.default, (a, b, s, r, c, coef, coef, coef, 4, -2)),
        (ops.infonce_rect_fwd.default, rg(a[:3], b, s) + (2, 4, -4)),
        (ops.infonce_rect_bwd.default, (a[:3], b, s, lse, coef[:3], coef[:3], 2, 4, -3)),
        (ops.sigmoid_fwd.default, rg(a, b, s, t) + (False, 4, -3)),
        (ops.sigmoid_fwd_bwd.default, rg(a, b, s, t) + (False, 4, -3)),
        (ops.sigmoid_bwd.default, (a, b, s, t, coef, True, 4, -3)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- the forward's implementation reaches the backward ------------------------------------------


class _Recorder:
    def __init__(self, monkeypatch, name):
        self.impls = []
        real = getattr(ops, name)

        def wrapper(*args):
            self.impls.append(args[-1])
            return real(*args)

        monkeypatch.setattr(ops, name, wrapper)


def test_backward_gets_the_forwards_impl_even_when_the_setting_changes(monkeypatch, setting):
    bwd = _Recorder(monkeypatch, "infonce_bwd")
    rect = _Recorder(monkeypatch, "infonce_rect_bwd")
    sig = _Recorder(monkeypatch, "sigmoid_bwd")
    a, b = (x.requires_grad_() for x in _pair())
    s = torch.tensor(5.0, requires_grad=True)
    t = torch.tensor(-1.0)
    setting("tile")
    loss_default = ops.infonce_fwd(a, b, s)[0].sum()  # impl 0: the setting at forward time
    loss_pref = ops.infonce_fwd(a, b, s, 0, -3)[0].sum()
    rect_default = ops.infonce_rect_fwd(a[:3], b, s, 2)[0].sum()
    sig_default = ops.sigmoid_fwd(a, b, s, t).sum()
    sig_pref = ops.sigmoid_fwd(a, b, s, t, False, 0, -3).sum()
    setting("mma")  # changed between forward and backward: no effect on the backward
    (loss_default + loss_pref + rect_default + sig_default + sig_pref).backward()
    assert sorted(bwd.impls) == [-3, -2] and rect.impls == [-2]
    assert sorted(sig.impls) == [-3, -1]  # SigLIP's default is gemm (no process-wide setting)
    setting("auto")
    ops.infonce_fwd(a, b, s)[0].sum().backward()
    assert bwd.impls[-1] == -1  # "auto" in the raw ops: gemm


def test_functional_api_on_cpu_passes_the_default_to_the_kernels(monkeypatch):
    bwd = _Recorder(monkeypatch, "infonce_bwd")
    a, b = (x.requires_grad_() for x in _pair())
    sc.infonce_loss(a, b, 0.1).backward()
    assert bwd.impls == [-1]


# ---- the functional API's impl argument ------------------------------------------------------------


def test_bad_impl_names_are_value_errors_naming_impl_and_value():
    a, b = _pair()
    with pytest.raises(ValueError, match=r"infonce_loss: impl must be one of .*'wgmma'\), got 'fast'"):
        sc.infonce_loss(a, b, impl="fast")
    with pytest.raises(ValueError, match=r"infonce_rect_loss: impl must be one of .*got 'MMA'"):
        sc.infonce_rect_loss(a, b, 5.0, impl="MMA")
    with pytest.raises(ValueError, match=r"sigmoid_loss: impl must be one of .*got 'tile'"):
        sc.sigmoid_loss(a, b, 5.0, impl="tile")  # no SigLIP tile implementation
    with pytest.raises(ValueError, match=r"impl must be one of .*got 3"):
        sc.infonce_loss(a, b, impl=3)
    with pytest.raises(ValueError, match=r"op must be one of \('infonce', 'sigmoid'\), got 'siglip'"):
        kc.pick_impl("siglip", setting="auto", capability=(9, 0), dtype=torch.bfloat16, rows=(8, 8), d=8)


@pytest.mark.parametrize("impl", ["tile", "mma", "wgmma"])
def test_cuda_only_impls_on_cpu_tensors_are_value_errors(impl):
    for dtype in (torch.float32, torch.bfloat16):
        a, b = _pair(dtype=dtype)
        dt = str(dtype).replace("torch.", "")
        with pytest.raises(ValueError, match=rf"infonce_loss: impl='{impl}' needs CUDA bfloat16/float16 inputs, "
                                             rf"got device cpu / dtype {dt}"):
            sc.infonce_loss(a, b, impl=impl)
        with pytest.raises(ValueError, match=rf"infonce_rect_loss: impl='{impl}' needs CUDA"):
            sc.infonce_rect_loss(a, b, 5.0, impl=impl)
    if impl != "tile":
        with pytest.raises(ValueError, match=rf"sigmoid_loss: impl='{impl}'"):
            sc.sigmoid_loss(a, b, 5.0, impl=impl)
    with pytest.raises(ValueError, match="impl='gemm' needs CUDA inputs, got device cpu"):
        sc.infonce_loss(a, b, impl="gemm")


def test_auto_fused_and_reference_agree_on_cpu():
    a, b = _pair(9, 6, torch.float64)
    for impl in ("auto", "fused"):
        torch.testing.assert_close(sc.infonce_loss(a, b, 0.2, impl=impl), sc.infonce_loss(a, b, 0.2, impl="reference"))
        torch.testing.assert_close(sc.infonce_rect_loss(a[:4], b, 5.0, offset=3, impl=impl),
                                   sc.infonce_rect_loss(a[:4], b, 5.0, offset=3, impl="reference"))
        torch.testing.assert_close(sc.sigmoid_loss(a, b, 5.0, -2.0, impl=impl, reduction="none"),
                                   sc.sigmoid_loss(a, b, 5.0, -2.0, impl="reference", reduction="none"))


def test_choose_cuda_impl_refuses_cpu_tensors():
    a, _ = _pair()
    with pytest.raises(ValueError, match="choose_cuda_impl: a is on cpu"):
        sc.choose_cuda_impl("infonce", a)


# ---- the table: generator, margin rule, resolution and precedence ------------------------------------


def test_margin_rule_keeps_gemm_unless_another_is_at_least_margin_faster():
    assert impl_table.choose({"gemm": 10.0, "mma": 9.5}, 0.05)[0] == "mma"  # exactly 5% less time
    assert impl_table.choose({"gemm": 10.0, "mma": 9.51}, 0.05)[0] == "gemm"
    assert impl_table.choose({"gemm": 10.0, "mma": 9.0, "tile": 8.0}, 0.05)[0] == "tile"
    assert impl_table.choose({"gemm": 10.0, "tile": 9.0}, 0.2)[0] == "gemm"
    assert impl_table.choose({"tile": 1.0}, 0.05) == ("gemm", "gemm not measured here: kept")
    assert impl_table.choose({"gemm": 3.0, "mma": 3.0}, 0.0)[0] == "gemm"  # a tie keeps gemm
    with pytest.raises(ValueError, match="margin must be in"):
        impl_table.build_table([], 1.0)


def _timing_file(path, capability, rows, siglip=(), commit="abc1234"):
    res = {"device": "NVIDIA Test GPU", "capability": capability,
           "env": {"git_commit": commit, "date": "2026-12-07T00:00:00+00:00", "device": "cuda"},
           "infonce": [dict(impl=i, n=n, d=d, dtype=dt, median_ms=ms) for i, n, d, dt, ms in rows],
           "siglip": [dict(impl=i, n=n, d=d, dtype=dt, median_ms=ms) for i, n, d, dt, ms in siglip]}
    path.write_text(json.dumps(res))
    return str(path)


@pytest.fixture
def synthetic_table(tmp_path):
    f1 = _timing_file(tmp_path / "t90.json", "9.0", [
        ("gemm", 32768, 512, "bfloat16", 10.0), ("mma", 32768, 512, "bfloat16", 9.0),    # mma 10% faster
        ("wgmma", 32768, 512, "bfloat16", 8.0),                                           # wgmma 20% faster
        ("gemm", 4096, 512, "bfloat16", 1.0), ("tile", 4096, 512, "bfloat16", 0.97),      # 3%: gemm kept
        ("gemm", 32768, 512, "float16", 10.0), ("tile", 32768, 512, "float16", 9.4),     # 6%: tile
    ], siglip=[("gemm", 32768, 512, "bfloat16", 20.0), ("mma", 32768, 512, "bfloat16", 15.0)])
    f2 = _timing_file(tmp_path / "t80.json", [8, 0], [
        ("gemm", 65536, 768, "bfloat16", 50.0), ("mma", 65536, 768, "bfloat16", 40.0)], commit="def5678")
    out = tmp_path / "data" / "table.json"
    assert impl_table.main([f1, f2, "--out", str(out)]) == 0
    assert sorted(os.listdir(out.parent)) == ["table.json"]  # written whole: no temp file left
    return out


def test_generated_table_names_sources_and_resolves_auto(synthetic_table):
    table = kc.load_table(synthetic_table)
    entries = table["ops"]["infonce"]["9.0"]["bfloat16"]
    big = next(e for e in entries if e["n_bucket"] == 15)
    assert big["impl"] == "wgmma" and big["times_ms"] == {"gemm": 10.0, "mma": 9.0, "wgmma": 8.0}
    assert big["source"].endswith("t90.json") and big["commit"] == "abc1234"
    assert table["ops"]["infonce"]["8.0"]["bfloat16"][0]["commit"] == "def5678"

    def pick(op="infonce", cap=(9, 0), dtype=torch.bfloat16, n=32768, d=512, setting="auto"):
        return kc.pick_impl(op, setting=setting, capability=cap, dtype=dtype, rows=(n, n), d=d, table=synthetic_table)

    assert pick() == "wgmma"
    assert pick(n=30000, d=600) == "wgmma"            # same power-of-two bucket
    assert pick(n=4096) == "gemm"                     # 3% faster is within the margin
    assert pick(n=8192) == "gemm"                     # unmeasured bucket
    assert pick(d=128) == "gemm"
    assert pick(dtype=torch.float16) == "tile"
    assert pick(dtype=torch.float32) == "gemm"        # fp32 always gemm
    assert pick(cap=(8, 0), n=65536, d=768) == "mma"
    assert pick(cap=(8, 9), n=65536, d=768) == "gemm"  # unmeasured device
    assert pick(op="sigmoid") == "mma"
    assert kc.pick_impl("infonce", setting="auto", capability=(9, 0), dtype=torch.bfloat16, rows=(16384, 65536),
                        d=512, table=synthetic_table) == "wgmma"  # N = sqrt(Na * Nb)
    # precedence: the process-wide setting (when not "auto") over the table
    assert pick(setting="gemm") == "gemm" and pick(setting="tile", n=8) == "tile"
    # a pick the device cannot run falls back to gemm
    assert pick(cap=(8, 0), setting="wgmma") == "gemm" and pick(cap=(7, 5), setting="mma") == "gemm"


def test_an_unrunnable_table_entry_falls_back_to_gemm(tmp_path):
    f = _timing_file(tmp_path / "t.json", "8.0", [("gemm", 1024, 64, "bfloat16", 2.0),
                                                 ("wgmma", 1024, 64, "bfloat16", 1.0)])
    out = tmp_path / "table.json"
    assert impl_table.main([f, "--out", str(out)]) == 0
    assert kc.lookup(kc.load_table(out), "infonce", "8.0", "bfloat16", 1024, 64)[0] == "wgmma"
    assert kc.pick_impl("infonce", setting="auto", capability=(8, 0), dtype=torch.bfloat16, rows=(1024, 1024), d=64,
                        table=out) == "gemm"


def test_sigmoid_wgmma_is_picked_where_it_runs_and_falls_back_elsewhere(tmp_path):
    """SigLIP has wgmma kernels (csrc/siglip/siglip_wgmma_cuda.cu): the same capability rule as
    InfoNCE's (9.0, bf16/fp16), a measured win makes it the "auto" pick there, gemm elsewhere."""
    for op in ("infonce", "sigmoid"):
        assert kc.can_run(op, "wgmma", (9, 0), torch.bfloat16) and kc.can_run(op, "wgmma", (9, 0), torch.float16)
        assert not kc.can_run(op, "wgmma", (8, 0), torch.bfloat16) and not kc.can_run(op, "wgmma", (10, 0), torch.bfloat16)
        assert not kc.can_run(op, "wgmma", (9, 0), torch.float32)
    f = _timing_file(tmp_path / "t.json", "9.0", [], siglip=[
        ("gemm", 32768, 512, "bfloat16", 20.0), ("mma", 32768, 512, "bfloat16", 15.0),
        ("wgmma", 32768, 512, "bfloat16", 12.0)])
    out = tmp_path / "table.json"
    assert impl_table.main([f, "--out", str(out)]) == 0

    def pick(cap=(9, 0), setting="auto", dtype=torch.bfloat16):
        return kc.pick_impl("sigmoid", setting=setting, capability=cap, dtype=dtype, rows=(32768, 32768), d=512,
                            table=out)

    assert pick() == "wgmma"
    assert pick(cap=(8, 0)) == "gemm"  # the table has no 8.0 entry: gemm; an 8.0 device cannot run wgmma anyway
    assert pick(dtype=torch.float32) == "gemm"


def test_bench_results_need_an_implementation_per_row(tmp_path):
    res = {"benchmark": "infonce fwd+bwd", "env": {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3",
                                                    "git_commit": "1234567"},
           "rows": [dict(method="semcomp", n=4096, d=512, dtype="bfloat16", device="cuda", median_s=0.002),
                    dict(method="semcomp_tile", n=4096, d=512, dtype="bfloat16", device="cuda", median_s=0.001),
                    dict(method="open_clip", n=4096, d=512, dtype="bfloat16", device="cuda", median_s=0.0005)]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(res))
    rows = impl_table.measurements(str(path))
    assert [(r["impl"], r["capability"], r["ms"]) for r in rows] == [("tile", "9.0", 1.0)]  # H100 -> 9.0
    rows = impl_table.measurements(str(path), method_impl={"semcomp": "gemm"})
    assert sorted(r["impl"] for r in rows) == ["gemm", "tile"]
    table = impl_table.build_table(rows)
    assert table["ops"]["infonce"]["9.0"]["bfloat16"][0]["impl"] == "tile"
    res["env"]["device_name"] = "Some GPU"
    path.write_text(json.dumps(res))
    with pytest.raises(ValueError, match="no compute capability recorded for device 'Some GPU'; pass --capability"):
        impl_table.measurements(str(path))
    assert impl_table.main([str(path), "--out", str(tmp_path / "x.json")]) == 1
    assert not (tmp_path / "x.json").exists()
    res["env"]["device"] = "cpu"  # a CPU run: nothing to choose from, the table is left alone
    path.write_text(json.dumps(res))
    assert impl_table.measurements(str(path)) == []
    assert impl_table.main([str(path), "--out", str(tmp_path / "x.json")]) == 1
    assert not (tmp_path / "x.json").exists()


def test_packaged_table_loads_and_names_existing_results():
    table = kc.load_table(kc.table_path())
    assert table["format"] == kc.TABLE_FORMAT and table["fallback"] == "gemm"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for src in table["sources"]:
        assert os.path.exists(os.path.join(root, src)), src
    for caps in table["ops"].values():
        for dtypes in caps.values():
            for entries in dtypes.values():
                for e in entries:
                    assert e["impl"] in kc.IMPLS["infonce"] and e["source"] in table["sources"] and e["commit"]


# ---- CUDA: every implementation that runs here against fp64 and the others ------------------------


def _runs(op, impl, dtype):
    a, _ = _pair(64, 64, dtype, "cuda")
    try:
        if op == "infonce":
            sc.infonce_loss(a, a, impl=impl)
        else:
            sc.sigmoid_loss(a, a, 5.0, impl=impl)
    except ValueError:
        return False
    return True


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_every_infonce_impl_against_fp64_and_gemm(dtype):
    impls = [i for i in kc.IMPLS["infonce"] if _runs("infonce", i, dtype)]
    assert "gemm" in impls and "tile" in impls
    n, d = 130, 72
    a, b = (x.requires_grad_() for x in _pair(n, d, dtype, "cuda", seed=1))
    s = torch.tensor(14.3, device="cuda", requires_grad=True)
    outs = {}
    for impl in impls:
        loss = sc.infonce_loss(a, b, logit_scale=s, impl=impl)
        rows = sc.infonce_rect_loss(a[:50], b, s, offset=40, impl=impl)
        outs[impl] = (loss, *torch.autograd.grad(loss, (a, b, s)), rows,
                      *torch.autograd.grad(rows.sum(), (a, b, s)))
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    sd = s.detach().double().requires_grad_()
    ref = R.infonce_reference(ad, bd, sd)
    ref_rows = R.infonce_rect_reference(ad[:50], bd, sd, 40)
    want = (ref, *torch.autograd.grad(ref, (ad, bd, sd)), ref_rows, *torch.autograd.grad(ref_rows.sum(), (ad, bd, sd)))
    for impl, got in outs.items():
        for x, r, y in zip(got, want, outs["gemm"]):
            assert torch.isfinite(x).all(), impl
            scale = float(r.abs().max()) + 1e-6
            assert float((x.double() - r).abs().max()) <= 3e-2 * scale, impl  # bf16/fp16 inputs vs fp64
            assert float((x.double() - y.double()).abs().max()) <= 2e-2 * scale, impl  # vs gemm


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_every_sigmoid_impl_against_fp64_and_gemm(dtype):
    impls = [i for i in kc.IMPLS["sigmoid"] if _runs("sigmoid", i, dtype)]
    assert "gemm" in impls
    # SigLIP's wgmma kernels run exactly where InfoNCE's do (the same mainloop and rules)
    assert ("wgmma" in impls) == _runs("infonce", "wgmma", dtype)
    a, b = (x.requires_grad_() for x in _pair(130, 72, dtype, "cuda", seed=2))
    s = torch.tensor(10.0, device="cuda", requires_grad=True)
    t = torch.tensor(-10.0, device="cuda", requires_grad=True)
    outs = {}
    for impl in impls:
        outs[impl] = []
        for backward in ("onepass", "recompute"):
            loss = sc.sigmoid_loss(a, b, s, t, impl=impl, backward=backward)
            outs[impl] += [loss, *torch.autograd.grad(loss, (a, b, s, t))]
    ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    sd, td = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = R.sigmoid_loss_reference(ad, bd, sd, td)
    want = [ref, *torch.autograd.grad(ref, (ad, bd, sd, td))] * 2
    for impl, got in outs.items():
        for x, r, y in zip(got, want, outs["gemm"]):
            scale = float(r.abs().max()) + 1e-6
            assert float((x.double() - r).abs().max()) <= 3e-2 * scale, impl
            assert float((x.double() - y.double()).abs().max()) <= 2e-2 * scale, impl


@needs_cuda
def test_cuda_explicit_requests_that_cannot_run_raise_and_auto_does_not(setting):
    a, b = _pair(16, 8, torch.float32, "cuda")
    s = torch.tensor(5.0, device="cuda")
    with pytest.raises(ValueError, match="impl='mma' needs CUDA bfloat16/float16 inputs, got device cuda:0 / dtype float32"):
        sc.infonce_loss(a, b, impl="mma")
    with pytest.raises(ValueError, match=r"infonce_fwd: impl=3 \(mma\) cannot run these inputs: it needs bf16/fp16"):
        ops.infonce_fwd(a, b, s, 0, 3)
    with pytest.raises(ValueError, match=r"sigmoid_fwd: impl=2 \(tile\) is not an implementation of the sigmoid ops"):
        ops.sigmoid_fwd(a.bfloat16(), b.bfloat16(), s, s, False, 0, 2)
    for impl in ("tile", "mma", "wgmma"):
        setting(impl)  # the process-wide setting falls back where it cannot run
        torch.testing.assert_close(sc.infonce_loss(a, b, impl="auto"), sc.infonce_loss(a, b, impl="gemm"))
    assert sc.choose_cuda_impl("infonce", a) == "gemm"
    setting("tile")
    assert sc.choose_cuda_impl("infonce", a.bfloat16()) == "tile"
