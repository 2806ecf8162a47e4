"""Metrics, build information and the OpenMP-enabled CPU kernels."""

import math

import pytest
import torch
import torch.nn.functional as F

import semcomp_ext as sc
from semcomp_ext import _C


def test_build_info():
    info = sc.build_info()
    assert info["version"] == sc.__version__
    assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["cuda"], bool) and info["openmp"] is True
    assert set(info["cpu_lowp_gemm"]) <= {"bfloat16", "float16"}
    # the CPU backward never uses the CUDA dk accumulation
    a, b = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4)
    sc.infonce_loss(a, b, 0.5).backward()
    assert sc.build_info()["infonce_dk_accumulate"] == "not yet used"


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs >= 2 torch threads to observe parallelism")
def test_cpu_kernels_use_more_than_one_thread():
    # The probe runs at::parallel_for compiled inside the extension, like every CPU kernel;
    # without -fopenmp it would run on exactly one thread.
    assert _C._parallel_thread_count(64) > 1


def test_modality_gap_and_true_pair_cosine():
    a = torch.randn(500, 16)
    shift = torch.zeros(16)
    shift[0] = 3.0
    assert sc.modality_gap(a, a).item() == 0
    gap_small = sc.modality_gap(a, a + 0.1 * shift).item()
    gap_large = sc.modality_gap(a, a + shift).item()
    assert 0 < gap_small < gap_large
    an, bn = F.normalize(a, dim=1), F.normalize(a + shift, dim=1)
    assert math.isclose(gap_large, (an.mean(0) - bn.mean(0)).norm().item(), rel_tol=1e-5)
    assert math.isclose(sc.true_pair_cosine(a, a).item(), 1.0, rel_tol=1e-9)
    gaps, mean = sc.modality_gaps([a, a + shift, a - shift])
    assert gaps.shape == (3, 3) and torch.allclose(gaps, gaps.T) and mean > 0


def test_fisher_ratio_orders_separation():
    y = torch.arange(300) % 3
    centers = torch.randn(3, 8) * 5
    tight = centers[y] + 0.1 * torch.randn(300, 8)
    loose = centers[y] + 3.0 * torch.randn(300, 8)
    assert sc.fisher_ratio([tight, tight], y) > 10 * sc.fisher_ratio([loose, loose], y)
    # explicit formula check
    x = loose.double()
    mu = x.mean(0)
    mc = torch.stack([x[y == c].mean(0) for c in range(3)])
    sb = sum((y == c).sum() * ((mc[c] - mu) ** 2).sum() for c in range(3))
    sw = ((x - mc[y]) ** 2).sum()
    torch.testing.assert_close(sc.fisher_ratio(loose, y), sb / sw)


def test_explained_variance_counts_components():
    basis = torch.linalg.qr(torch.randn(32, 32)).Q
    coeff = torch.randn(2000, 32) * torch.tensor([10.0] * 4 + [0.01] * 28)
    ev = sc.explained_variance(coeff @ basis.T)
    assert ev.components[0.9] <= 4 and ev.components[0.99] <= 4
    assert torch.isclose(ev.cumulative[-1], torch.tensor(1.0, dtype=torch.float64))
    assert ev.ratio.shape == (32,)


def test_compression_ratio():
    assert sc.compression_ratio(2, 512) == 2.0
    assert sc.compression_ratio(2, 512, keep=26) == pytest.approx(2 * 512 / 26)
    assert sc.compression_ratio(2, 512, keep=256, in_bytes=4, out_bytes=2) == 8.0
    with pytest.raises(ValueError, match="keep"):
        sc.compression_ratio(2, 512, keep=1000)


def test_metric_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        sc.true_pair_cosine(torch.randn(3, 4), torch.randn(4, 4))
    with pytest.raises(ValueError, match="empty"):
        sc.modality_gap(torch.randn(0, 4), torch.randn(0, 4))
    with pytest.raises(ValueError, match="labels must have shape"):
        sc.fisher_ratio(torch.randn(5, 3), torch.arange(4))


def test_infonce_cuda_impl_selection_round_trips():
    assert sc.get_infonce_cuda_impl() == "auto"
    assert sc.set_infonce_cuda_impl("tile") == "auto"
    try:
        assert sc.get_infonce_cuda_impl() == "tile"
        a, b = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
        torch.testing.assert_close(sc.infonce_loss(a, b, 0.5), sc.infonce_loss(a, b, 0.5, impl="reference"))
    finally:
        assert sc.set_infonce_cuda_impl("auto") == "tile"
    with pytest.raises(ValueError, match="impl must be one of .*got 'fast'"):
        sc.set_infonce_cuda_impl("fast")
    assert sc.infonce_cuda_impls() == ("auto", "gemm", "tile", "mma", "wgmma")
    for impl in ("mma", "wgmma"):
        assert sc.set_infonce_cuda_impl(impl) == "auto"
        try:
            assert sc.get_infonce_cuda_impl() == impl
        finally:
            assert sc.set_infonce_cuda_impl("auto") == impl
