"""Segment mean (centroids), column gather (select_features) and random feature selection."""

import pytest
import torch

import semcomp_ext as sc
from semcomp_ext import reference as R
from semcomp_ext._ops import ops


def _ids(n, g, device, sorted_=False):
    ids = torch.randint(0, g, (n,), device=device)
    return ids.sort().values if sorted_ else ids


@pytest.mark.parametrize("n,d,g", [(257, 77, 10), (1000, 3, 997), (5, 8, 1), (64, 33, 200)])
@pytest.mark.parametrize("sorted_", [True, False])
@pytest.mark.parametrize("with_features", [False, True])
def test_centroids_match_reference_fp64(n, d, g, sorted_, with_features, device):
    x = torch.randn(n, d, dtype=torch.float64, device=device)
    ids = _ids(n, g, device, sorted_)
    feats = torch.randperm(d, device=device)[: max(1, d // 3)] if with_features else None
    out, counts = sc.centroids(x, ids, g, return_counts=True, features=feats)
    ref, rc = R.centroids_reference(x, ids, g, feats)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(counts, rc)
    empty = rc == 0
    assert (out[empty] == 0).all()  # empty groups give zero rows


def test_centroids_int32_ids_and_empty_input(device):
    x = torch.randn(20, 4, device=device)
    ids = torch.randint(0, 5, (20,), dtype=torch.int32, device=device)
    torch.testing.assert_close(sc.centroids(x, ids, 5), R.centroids_reference(x, ids, 5)[0])
    out, counts = sc.centroids(x[:0], ids[:0], 3, return_counts=True)
    assert out.shape == (3, 4) and (out == 0).all() and (counts == 0).all()


@pytest.mark.parametrize("sorted_", [True, False])
def test_centroids_gradcheck(sorted_, device):
    x = torch.randn(17, 6, dtype=torch.float64, device=device, requires_grad=True)
    ids = _ids(17, 5, device, sorted_)
    feats = torch.tensor([4, 0, 4, 2], device=device)  # duplicates accumulate in backward
    assert torch.autograd.gradcheck(lambda x: sc.centroids(x, ids, 5), (x,))
    assert torch.autograd.gradcheck(lambda x: sc.centroids(x, ids, 5, features=feats), (x,))


def test_gather_matches_reference_and_gradcheck(device):
    x = torch.randn(33, 21, dtype=torch.float64, device=device, requires_grad=True)
    idx = torch.tensor([20, 3, 3, 0, 7], device=device)
    torch.testing.assert_close(sc.select_features(x, idx), R.select_features_reference(x, idx))
    assert torch.autograd.gradcheck(lambda x: sc.select_features(x, idx), (x,))
    xt = torch.randn(21, 33, device=device).T  # non-contiguous
    torch.testing.assert_close(sc.select_features(xt, idx), xt[:, idx])
    assert sc.select_features(x[:0], idx).shape == (0, 5)


def test_opcheck_segment_and_gather(device):
    x = torch.randn(30, 9, device=device, requires_grad=True)
    ids = _ids(30, 4, device)
    feats = torch.tensor([1, 8, 2], device=device)
    out, counts = ops.segment_mean(x, ids, 4, feats)
    for op, args in [
        (ops.segment_mean.default, (x, ids, 4, None)),
        (ops.segment_mean.default, (x, ids, 4, feats)),
        (ops.segment_mean_bwd.default, (out.detach(), ids, counts, 9, feats)),
        (ops.gather_columns.default, (x, feats)),
        (ops.gather_columns_bwd.default, (torch.randn(30, 3, device=device), feats, 9)),
    ]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_centroids_torch_compile_fullgraph(device, backend):
    x = torch.randn(40, 8, device=device, requires_grad=True)
    ids = _ids(40, 6, device)

    @torch.compile(fullgraph=True, backend=backend)
    def f(x, ids):
        return sc.centroids(x, ids, 6).square().sum()

    out = f(x, ids)
    torch.testing.assert_close(out, R.centroids_reference(x, ids, 6)[0].square().sum())
    out.backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_centroids_low_precision_accumulate_fp32(dtype, device):
    x = (torch.randn(4000, 16, device=device) + 3).to(dtype)
    ids = torch.zeros(4000, dtype=torch.long, device=device)  # one large group: worst case for low-precision sums
    truth = R.centroids_reference(x.double(), ids, 1)[0]
    ours = sc.centroids(x, ids, 1)
    low = R.centroids_reference(x, ids, 1)[0]
    err = lambda y: (y.double() - truth).abs().max().item()  # noqa: E731
    assert ours.dtype == dtype
    assert err(ours) <= 2 * err(low) + 1e-6


def test_pair_centroids(device):
    zs = [torch.randn(10, 6, dtype=torch.float64, device=device) for _ in range(3)]
    torch.testing.assert_close(sc.pair_centroids(zs), torch.stack(zs).mean(0))
    nz = [torch.nn.functional.normalize(z, dim=1) for z in zs]
    torch.testing.assert_close(sc.pair_centroids(zs, normalize=True), torch.stack(nz).mean(0))
    out = sc.pair_centroids(zs, normalize="both")
    torch.testing.assert_close(out.norm(dim=1), torch.ones(10, dtype=torch.float64, device=device))
    idx = torch.tensor([5, 1], device=device)
    torch.testing.assert_close(sc.pair_centroids(zs, features=idx), torch.stack(zs).mean(0)[:, idx])
    with pytest.raises(ValueError, match=r"zs\[1\] must match zs\[0\]"):
        sc.pair_centroids([zs[0], zs[1][:5]])


def test_random_feature_selector_contract():
    sel = sc.RandomFeatureSelector(512, drop_rate=0.95, seed=3)
    assert sel.keep == 26 and sel.index.dtype == torch.int64
    assert torch.equal(sel.index, sel.index.sort().values) and len(set(sel.index.tolist())) == 26
    assert torch.equal(sc.RandomFeatureSelector(512, keep=26, seed=3).index, sel.index)
    assert not torch.equal(sc.RandomFeatureSelector(512, keep=26, seed=4).index, sel.index)
    # The index is a cross-machine contract (SplitMix64 + partial Fisher-Yates): pin one value so
    # any change to the algorithm is caught.
    assert sc.rfs_index(10, 3, seed=0).tolist() == _splitmix_reference(10, 3, 0)
    x = torch.randn(4, 512)
    torch.testing.assert_close(sel(x), x[:, sel.index])
    assert sc.RandomFeatureSelector.from_dict(sel.to_dict()).index.tolist() == sel.index.tolist()
    # Every column is equally likely: over many seeds the counts are near uniform.
    counts = torch.zeros(20)
    for seed in range(2000):
        counts[sc.rfs_index(20, 5, seed)] += 1
    assert (counts / 500 - 1).abs().max() < 0.15


def _splitmix_reference(dim, keep, seed):
    """Independent restatement of the documented algorithm."""
    m = (1 << 64) - 1
    st, perm = seed, list(range(dim))
    for t in range(keep):
        st = (st + 0x9E3779B97F4A7C15) & m
        z = st
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        z ^= z >> 31
        j = t + z % (dim - t)
        perm[t], perm[j] = perm[j], perm[t]
    return sorted(perm[:keep])


@pytest.mark.parametrize("kw,msg", [
    ({"drop_rate": 1.0}, "drop_rate"), ({"keep": 0}, "keep"), ({"keep": 600}, "keep"), ({}, "exactly one"),
    ({"drop_rate": 0.5, "keep": 3}, "exactly one"),
])
def test_selector_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg):
        sc.RandomFeatureSelector(512, **kw)


def test_segment_bad_input(device):
    x = torch.randn(6, 4, device=device)
    ids = torch.tensor([0, 1, 2, 7, 1, -1], device=device)
    with pytest.raises(ValueError, match=r"segment_mean: ids\[3\] = 7 is out of range \[0, 5\)"):
        sc.centroids(x, ids, 5)
    with pytest.raises(ValueError, match=r"ids\[5\] = -1 is out of range"):
        sc.centroids(x, ids.clamp(max=4), 5)
    with pytest.raises(ValueError, match="num_groups must be >= 1, got 0"):
        sc.centroids(x, ids, 0)
    with pytest.raises(ValueError, match=r"ids must have one entry per row of x \(6\), got 5"):
        sc.centroids(x, ids[:5], 5)
    with pytest.raises(ValueError, match="ids must be int64 or int32"):
        sc.centroids(x, ids.float(), 5)
    with pytest.raises(ValueError, match="x must be 2-D"):
        sc.centroids(x[0], ids, 5)
    with pytest.raises(ValueError, match=r"features\[1\] = 4 is out of range \[0, 4\)"):
        sc.centroids(x, ids.clamp(0, 4), 5, features=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"gather_columns: index\[0\] = -1 is out of range \[0, 4\)"):
        sc.select_features(x, torch.tensor([-1, 2], device=device))
    with pytest.raises(ValueError, match="index must be 1-D"):
        sc.select_features(x, torch.tensor([[1]], device=device))


def test_nan_propagates_in_centroids(device):
    x = torch.randn(6, 3, device=device)
    x[2, 1] = float("nan")
    out = sc.centroids(x, torch.tensor([0, 0, 1, 1, 2, 2], device=device), 3)
    assert torch.isnan(out[1, 1]) and torch.isfinite(out[0]).all() and torch.isfinite(out[2]).all()
