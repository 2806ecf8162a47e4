"""semcomp::pair_mean: row-aligned mean over M modalities with the random-feature-selection
column gather and the per-row finite flags fused into one read (the offline compressor's
pairs mode). Contract (csrc/gather/pair_mean.h): out[i, c] = (((zs[0][i, f[c]] + zs[1][i, f[c]])
+ ...) + zs[M-1][i, f[c]]) / M in fp32 (fp64 for fp64 input), and finite[i] = every value of
row i, in every modality and every column (kept or not), is finite."""

import pytest
import torch

from semcomp_ext._ops import has_kernel, ops

CUDA = torch.cuda.is_available() and has_kernel("pair_mean", "cuda")
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device and semcomp_ext built with CUDA")
NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _composition(zs, feats=None):
    """The documented rounding: gather, upcast, add in place in modality order, divide by M."""
    f = slice(None) if feats is None else feats.long()
    g = zs[0][:, f].to(_acc(zs[0].dtype)).clone()
    for z in zs[1:]:
        g.add_(z[:, f].to(_acc(z.dtype)))
    return g.div_(len(zs))


def _reference_fp64(zs, feats=None):
    f = slice(None) if feats is None else feats.long()
    out = torch.stack([z.double()[:, f] for z in zs]).mean(0)
    finite = torch.stack([torch.isfinite(z).all(1) for z in zs]).all(0)
    return out, finite


def _bits_equal(x, y):
    """Bit identity: same dtype and shape, NaN at the same places, -0 and +0 told apart."""
    if x.dtype != y.dtype or x.shape != y.shape:
        return False
    view = {torch.float64: torch.int64, torch.float32: torch.int32}[x.dtype]
    return torch.equal(x.contiguous().view(view), y.contiguous().view(view))


def _data(m, n, d, dtype=torch.float32, device="cpu"):
    """Values over several binades, so that the order of the additions shows in the bits."""
    scale = torch.exp2(torch.randint(-6, 7, (m, n, 1), dtype=torch.float64))
    return [(torch.randn(n, d, dtype=torch.float64) * scale[i]).to(dtype).to(device) for i in range(m)]


def _features(kind, d, device="cpu"):
    if kind is None:
        return None
    if kind == "subset":
        return torch.randperm(d)[: max(1, d // 3)].sort().values.to(device)
    if kind == "dups":
        return torch.tensor([d - 1, 0, 2, 2, d - 1, 1], device=device) % d
    if kind == "int32":
        return torch.randperm(d)[: max(1, d // 2)].int().to(device)
    if kind == "empty":
        return torch.zeros(0, dtype=torch.long, device=device)
    raise AssertionError(kind)


# ---- values -----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 2, 3, 9])
@pytest.mark.parametrize("feat_kind", [None, "subset", "dups"])
def test_matches_fp64_reference(m, feat_kind, device):
    zs = [torch.randn(37, 20, dtype=torch.float64, device=device) for _ in range(m)]
    feats = _features(feat_kind, 20, device)
    out, finite = ops.pair_mean(zs, feats)
    ref, ref_finite = _reference_fp64(zs, feats)
    assert out.dtype == torch.float64 and finite.dtype == torch.bool
    torch.testing.assert_close(out, ref, rtol=1e-13, atol=1e-13)
    assert torch.equal(finite, ref_finite) and finite.all()
    # fp32 input: fp32 output, within fp32 rounding of the exact mean
    zs32 = [z.float() for z in zs]
    out32, _ = ops.pair_mean(zs32, feats)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), _reference_fp64(zs32, feats)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 9, 12])
@pytest.mark.parametrize("feat_kind", [None, "subset", "dups", "int32", "empty"])
@pytest.mark.parametrize("generic", [False, True])
def test_bit_identical_to_gather_add_div_fp32(m, feat_kind, generic, monkeypatch):
    # fp32 rows with a sorted duplicate-free index (or none) take the CPU's AVX-512 path where
    # the machine has it; SEMCOMP_PAIR_MEAN_GENERIC=1 forces the generic loop: both must match
    if generic:
        monkeypatch.setenv("SEMCOMP_PAIR_MEAN_GENERIC", "1")
    for n, d in ((65, 48), (3, 1000), (8, 1), (5, 37)):
        zs = _data(m, n, d)
        feats = _features(feat_kind, d)
        out, finite = ops.pair_mean(zs, feats)
        assert _bits_equal(out, _composition(zs, feats)), (m, feat_kind, n, d)
        assert finite.all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 10])
def test_low_precision_inputs_accumulate_in_fp32(dtype, m):
    zs = _data(m, 50, 64, dtype)
    feats = _features("dups", 64)
    for f in (None, feats):
        out, finite = ops.pair_mean(zs, f)
        assert out.dtype == torch.float32 and finite.all()
        assert _bits_equal(out, _composition([z.float() for z in zs], f))
    # against plain PyTorch in the same dtype: the fp32 accumulation is at least as accurate
    truth = _reference_fp64(zs)[0]
    plain = torch.stack(zs).mean(0)
    out = ops.pair_mean(zs)[0]
    assert (out.double() - truth).abs().max() <= (plain.double() - truth).abs().max()


def _layout(kind, n, d, m):
    if kind == "slice":  # unit column stride, row stride d + 3, storage offset 1
        return torch.randn(n, d + 3)[:, 1:d + 1]
    if kind == "transposed":  # transposed-contiguous: column stride n
        return torch.randn(d, n).T
    if kind == "step2":  # column stride 2
        return torch.randn(n, 2 * d)[:, ::2]
    if kind == "expanded":  # row stride 0
        return torch.randn(1, d).expand(n, d)
    if kind == "mixed":  # modalities with different layouts
        return torch.randn(d, n).T if m % 2 else torch.randn(n, d)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["slice", "transposed", "step2", "expanded", "mixed"])
@pytest.mark.parametrize("feat_kind", [None, "dups"])
def test_strided_inputs(kind, feat_kind):
    n, d = 29, 40
    zs = [_layout(kind, n, d, m) for m in range(3)]
    if kind != "expanded":
        assert not all(z.is_contiguous() for z in zs)
    feats = _features(feat_kind, d)
    out, finite = ops.pair_mean(zs, feats)
    assert _bits_equal(out, _composition(zs, feats))
    assert _bits_equal(out, ops.pair_mean([z.contiguous() for z in zs], feats)[0])
    assert finite.all()
    # a non-finite value read through the strides
    if kind != "expanded":
        zs[1][7, 5] = float("inf")
        assert ops.pair_mean(zs, feats)[1].tolist() == [i != 7 for i in range(n)]


# ---- finite flags ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_finite_flags_cover_kept_and_dropped_columns(dtype, strided, device):
    n, d, m = 24, 300, 3
    zs = [(torch.randn(d, n).T if strided else torch.randn(n, d)).to(dtype).to(device) for _ in range(m)]
    # sorted and duplicate-free (the CPU's AVX-512 path for fp32 rows), or with a repeat
    feats = torch.tensor([0, 3, 10, 250] if dtype == torch.float32 else [3, 10, 10, 250, 0], device=device)
    dropped = [1, 2, 299, 150]
    kept = [3, 10, 250, 0]
    bad_rows = {}
    for t, i in enumerate(range(1, n, 2)):  # every other row gets one non-finite value
        where = kept if t % 2 else dropped
        mod, col, val = t % m, where[t % len(where)], NONFINITE[t % 3]
        zs[mod][i, col] = val
        bad_rows[i] = col
    out, finite = ops.pair_mean(zs, feats)
    ref, ref_finite = _reference_fp64(zs, feats)
    assert torch.equal(finite.cpu(), ref_finite.cpu())
    assert finite.tolist() == [i not in bad_rows for i in range(n)]
    # a value in a kept column reaches the output, one in a dropped column does not
    for i, col in bad_rows.items():
        assert torch.isfinite(out[i]).all().item() == (col in dropped)
    if device.type == "cpu":
        assert _bits_equal(out, _composition(zs, feats))  # NaN/Inf propagate as in the composition
    else:
        assert _bits_equal(out.cpu(), ops.pair_mean([z.cpu() for z in zs], feats.cpu())[0])


def test_finite_flag_is_about_inputs_not_the_sum():
    # Finite inputs whose fp32 sum overflows: the flag stays True (it describes the rows read),
    # the mean is +inf exactly as in the composition.
    big = torch.full((2, 4), 3.0e38)
    out, finite = ops.pair_mean([big, big])
    assert finite.all() and torch.isinf(out).all()
    assert _bits_equal(out, _composition([big, big]))
    # -0.0 and subnormals are finite
    z = torch.tensor([[-0.0, 1e-45, -1e-45, 0.0]])
    assert ops.pair_mean([z, z])[1].item()


def test_empty_shapes(device):
    z = torch.randn(0, 6, device=device)
    out, finite = ops.pair_mean([z, z, z], torch.tensor([5, 0], device=device))
    assert out.shape == (0, 2) and finite.shape == (0,) and out.dtype == torch.float32
    out, finite = ops.pair_mean([z.double()])
    assert out.shape == (0, 6) and out.dtype == torch.float64
    # no kept column: the flags still look at every column
    x = torch.randn(4, 6, device=device)
    x[2, 3] = float("nan")
    out, finite = ops.pair_mean([x, x], torch.zeros(0, dtype=torch.long, device=device))
    assert out.shape == (4, 0) and finite.tolist() == [True, True, False, True]
    # D == 0
    out, finite = ops.pair_mean([torch.randn(3, 0, device=device)] * 2)
    assert out.shape == (3, 0) and finite.tolist() == [True] * 3


# ---- autograd, opcheck, compile ---------------------------------------------------------------


@pytest.mark.parametrize("feat_kind", [None, "subset", "dups"])
def test_gradcheck(feat_kind, device):
    zs = [torch.randn(9, 7, dtype=torch.float64, device=device, requires_grad=True) for _ in range(3)]
    feats = _features(feat_kind, 7, device)
    assert torch.autograd.gradcheck(lambda *zs: ops.pair_mean(list(zs), feats)[0], tuple(zs))
    # a modality without requires_grad gets no gradient; the others still do
    frozen = zs[1].detach()
    out = ops.pair_mean([zs[0], frozen, zs[2]], feats)[0]
    out.square().sum().backward()
    assert frozen.grad is None and zs[0].grad is not None
    torch.testing.assert_close(zs[0].grad, zs[2].grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_dtype_follows_input(dtype):
    zs = [torch.randn(5, 4).to(dtype).requires_grad_() for _ in range(2)]
    out = ops.pair_mean(zs, torch.tensor([3, 3, 1]))[0]
    out.sum().backward()
    assert zs[0].grad.dtype == dtype
    # column 3 kept twice, column 1 once, the rest never: gradient 2/M, 1/M, 0
    assert zs[0].grad[0].float().tolist() == [0.0, 0.5, 0.0, 1.0]


def test_opcheck(device):
    zs = [torch.randn(12, 9, device=device, requires_grad=True) for _ in range(3)]
    feats = torch.tensor([8, 1, 1, 4], device=device)
    for args in ((zs, feats), ([z.detach().half() for z in zs[:1]], feats.int())):
        torch.library.opcheck(ops.pair_mean.default, args)


def test_torch_compile_fullgraph(device):
    # aot_eager: the op is opaque to inductor; its fake kernel and autograd are what is traced
    backend = "aot_eager"
    zs = [torch.randn(16, 10, device=device, requires_grad=True) for _ in range(3)]
    feats = torch.tensor([9, 0, 4], device=device)

    @torch.compile(fullgraph=True, backend=backend)
    def f(a, b, c, feats):
        out, finite = ops.pair_mean([a, b, c], feats)
        return (out * finite.unsqueeze(1)).square().sum()

    loss = f(*zs, feats)
    torch.testing.assert_close(loss, _reference_fp64(zs, feats)[0].float().square().sum())
    loss.backward()
    assert zs[0].grad.shape == zs[0].shape and zs[0].grad[:, [1, 2, 3]].eq(0).all()


# ---- bad input ----------------------------------------------------------------------------------


def _bad_cases():
    x = torch.randn(4, 5)
    return [
        ([x, x[:3]], None, r"pair_mean: zs\[1\] must match zs\[0\] in shape, dtype and device"),
        ([x, x, x.double()], None, r"zs\[2\] must match zs\[0\] in shape, dtype and device"),
        ([x, x[:, :4]], None, r"zs\[1\] must match zs\[0\]"),
        ([x], torch.tensor([0, 5]), r"pair_mean: features\[1\] = 5 is out of range \[0, 5\)"),
        ([x, x], torch.tensor([-1]), r"features\[0\] = -1 is out of range \[0, 5\)"),
        ([x], torch.tensor([[0, 1]]), r"pair_mean: features must be 1-D"),
        ([x], torch.tensor([0.0, 1.0]), r"pair_mean: features must be int64 or int32"),
        ([x[0]], None, r"pair_mean: zs\[0\] must be 2-D"),
        ([x, x[0]], None, r"pair_mean: zs\[1\] must be 2-D"),
        ([x.int()], None, r"pair_mean: zs\[0\] must be float32, float64, bfloat16 or float16"),
        ([], torch.tensor([0]), r"pair_mean: zs must hold at least one"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_value_error_naming_the_argument(case):
    zs, feats, msg = _bad_cases()[case]
    with pytest.raises(ValueError, match=msg):
        ops.pair_mean(zs, feats)


def test_empty_list_without_features_raises_value_error():
    with pytest.raises(ValueError, match="zs must hold at least one"):
        ops.pair_mean([])


def test_non_strided_layouts_raise_value_error():
    """Sparse (and mkldnn) tensors dispatch to keys with no semcomp kernel: a clear error
    naming the argument and its layout, not a claim that the device has no kernel."""
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"zs\[0\] must be a dense \(strided\) tensor, got layout torch.sparse_coo"):
        ops.pair_mean([z.to_sparse(), z.to_sparse()])
    if torch.backends.mkldnn.is_available():
        with pytest.raises(ValueError, match="got layout torch._mkldnn"):
            ops.pair_mean([z.to_mkldnn(), z.to_mkldnn()])


# ---- CUDA: bit for bit the CPU result --------------------------------------------------------------


def _cuda_vs_cpu(zs, feats):
    out, finite = ops.pair_mean([z.cuda() for z in zs], None if feats is None else feats.cuda())
    cout, cfinite = ops.pair_mean(zs, feats)
    assert out.is_cuda and finite.is_cuda
    assert _bits_equal(out.cpu(), cout), "CUDA output differs from the CPU output"
    assert torch.equal(finite.cpu(), cfinite)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 17])  # > 8: several launches continue the partial sums
@pytest.mark.parametrize("feat_kind", [None, "subset", "dups", "int32", "empty"])
def test_cuda_bit_identical_to_cpu(dtype, m, feat_kind):
    n, d = 203, 70  # rows not a multiple of the warps per block
    zs = _data(m, n, d, dtype)
    for t, i in enumerate(range(0, n, 9)):
        zs[t % m][i, (7 * t) % d] = NONFINITE[t % 3]
    _cuda_vs_cpu(zs, _features(feat_kind, d))


@cuda_only
@pytest.mark.parametrize("kind", ["slice", "transposed", "step2", "expanded", "mixed"])
def test_cuda_strided_bit_identical_to_cpu(kind):
    zs = [_layout(kind, 45, 33, m) for m in range(10)]
    _cuda_vs_cpu(zs, None)
    _cuda_vs_cpu(zs, _features("dups", 33))


@cuda_only
def test_cuda_grid_stride_rows():
    # more rows than one launch has warps (65535 blocks x 8 warps)
    zs = [torch.randn(600_000, 3) for _ in range(2)]
    zs[1][599_999, 2] = float("nan")
    _cuda_vs_cpu(zs, torch.tensor([2, 0]))


@cuda_only
def test_cuda_bad_input_and_graph_capture():
    x = torch.randn(6, 5, device="cuda")
    with pytest.raises(ValueError, match=r"pair_mean: features\[2\] = 9 is out of range \[0, 5\)"):
        ops.pair_mean([x, x], torch.tensor([0, 1, 9], device="cuda"))
    with pytest.raises(ValueError, match=r"features must be on cuda"):
        ops.pair_mean([x, x], torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"zs\[1\] must match zs\[0\] in shape, dtype and device"):
        ops.pair_mean([x, x.cpu()], None)
    # CUDA-graph capture (no host sync while captured), replay on new inputs
    zs = [torch.randn(64, 32, device="cuda") for _ in range(10)]
    feats = torch.tensor([31, 0, 5, 5], device="cuda")
    ops.pair_mean(zs, feats)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, finite = ops.pair_mean(zs, feats)
    for z in zs:
        z.copy_(torch.randn_like(z))
    zs[4][3, 1] = float("inf")
    graph.replay()
    ref, ref_finite = ops.pair_mean(zs, feats)
    assert _bits_equal(out, ref) and torch.equal(finite, ref_finite) and not finite[3]
