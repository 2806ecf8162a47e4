"""Distributed ClipLoss / multimodal loss in real processes (gloo, CPU): W = 2 and 4.

One launch per world size runs every check (semcomp_ext.distributed.verify.suite_worker) and
returns max abs differences; the tests below assert on them. Against open_clip's ClipLoss run
in the same processes, against a single-process reference on the global batch, ring vs gather.
Upstream gradients differ per rank, so who-receives-which-gradient is checked too.
"""

import pytest
import torch

from semcomp_ext.distributed.launch import launch
from semcomp_ext.distributed.verify import COMBOS, suite_worker

TOL = {"float64": 1e-10, "float32": 1e-5}
WORLD_SIZES = [2, 4]


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"W{w}")
def suite(request):
    return request.param, launch(suite_worker, request.param, (4, 8), timeout=150, pg_timeout=30)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("local_loss,gather_with_grad", COMBOS)
def test_clip_loss_matches_open_clip_and_single_process(suite, dtype, local_loss, gather_with_grad):
    world, per_rank = suite
    key = f"local_loss={local_loss},gather_with_grad={gather_with_grad}"
    for rank, res in enumerate(per_rank):
        for comparison, diffs in res[f"clip_{dtype}"][key].items():
            for what, value in diffs.items():
                assert value <= TOL[dtype], f"W={world} rank {rank} {key} {comparison} {what}: {value:.3g}"


def test_multimodal_distributed_matches_single_process(suite):
    world, per_rank = suite
    for rank, res in enumerate(per_rank):
        assert len(res["multimodal_float64"]) == 2 * 4 * 2  # pairs x combos x impls
        for case, diffs in res["multimodal_float64"].items():
            for what, value in diffs.items():
                assert value <= TOL["float64"], f"W={world} rank {rank} {case} {what}: {value:.3g}"


def test_learnable_temperature_gets_its_gradient_distributed(suite):
    """multimodal_infonce_loss(distributed=True) with a temperature tensor: gradcheck (fp64)
    passes on every rank, for gather and ring and every (local_loss, gather_with_grad).
    Run by the W = 2 launch only (the gradient path of the scale does not depend on W)."""
    world, per_rank = suite
    if world != 2:
        assert all("temperature_gradcheck" not in res for res in per_rank)
        return
    for rank, res in enumerate(per_rank):
        cases = res["temperature_gradcheck"]
        assert len(cases) == 2 * 4
        failed = [case for case, ok in cases.items() if not ok]
        assert not failed, f"W={world} rank {rank}: gradcheck failed for {failed}"


@pytest.mark.parametrize("impl", ["gather", "ring"])
def test_mismatched_shapes_raise_on_every_rank(suite, impl):
    world, per_rank = suite
    for rank, res in enumerate(per_rank):
        msgs = res[f"errors_{impl}"]
        assert msgs["uneven_batch"] and "same n (equal local batches)" in msgs["uneven_batch"]
        assert f"rank {world - 1} image_features is 2-D (9, 16)" in msgs["uneven_batch"]
        assert msgs["different_D"] and "rank 1 image_features is 2-D (8, 32)" in msgs["different_D"]
        assert msgs["after"] == world  # the group is still usable: no rank was left behind


def _hangs(rank, world):
    import torch.distributed as dist

    if rank == 0:
        dist.barrier()  # rank 1 never arrives


def test_launcher_times_out_instead_of_hanging():
    with pytest.raises(RuntimeError, match="rank 0 failed|did not finish"):
        launch(_hangs, 2, timeout=40, pg_timeout=3)


def test_world_size_without_process_group_is_a_clear_error():
    import semcomp_ext as sc

    loss = sc.ClipLoss(world_size=2, rank=0)
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0))
    with pytest.raises(ValueError, match="impl must be one of"):
        sc.ClipLoss(impl="allreduce")


def test_multimodal_single_process_m3_matches_reference():
    import torch.nn.functional as F

    import semcomp_ext as sc

    g = torch.Generator().manual_seed(0)
    zs = [F.normalize(torch.randn(12, 8, generator=g, dtype=torch.float64), dim=1).requires_grad_() for _ in range(3)]
    loss = sc.multimodal_infonce_loss(zs, 0.1)
    ref = 0
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        logits = zs[i] @ zs[j].T / 0.1
        ref = ref + 0.5 * (F.cross_entropy(logits, torch.arange(12)) + F.cross_entropy(logits.T, torch.arange(12))) / 3
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    got = torch.autograd.grad(loss, zs)
    want = torch.autograd.grad(ref, zs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
