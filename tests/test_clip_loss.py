"""semcomp_ext.ClipLoss is a drop-in for open_clip.loss.ClipLoss (single process)."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import semcomp_ext as sc
from conftest import open_clip_module


@pytest.fixture(scope="module")
def OpenClipLoss():
    return open_clip_module().loss.ClipLoss


def test_constructor_and_forward_signatures_match(OpenClipLoss):
    ours_init = inspect.signature(sc.ClipLoss.__init__).parameters
    theirs_init = inspect.signature(OpenClipLoss.__init__).parameters
    # open_clip's parameters come first, in order, with the same defaults; ours may add
    # keyword-only extras (impl, check_shapes, group) with defaults.
    assert list(ours_init)[: len(theirs_init)] == list(theirs_init)
    assert all(ours_init[k].default == theirs_init[k].default for k in theirs_init)
    extras = [ours_init[k] for k in list(ours_init)[len(theirs_init):]]
    assert all(p.kind == p.KEYWORD_ONLY and p.default is not p.empty for p in extras)
    ours = inspect.signature(sc.ClipLoss.forward).parameters
    theirs = inspect.signature(OpenClipLoss.forward).parameters
    assert list(ours) == list(theirs)
    assert all(ours[k].default == theirs[k].default for k in ours)


@pytest.mark.parametrize("n,d", [(8, 16), (97, 64), (256, 32)])
@pytest.mark.parametrize("output_dict", [False, True])
@pytest.mark.parametrize("scale_shape", [(), (1,)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_open_clip(OpenClipLoss, n, d, output_dict, scale_shape, with_bias):
    img = F.normalize(torch.randn(n, d), dim=1)
    txt = F.normalize(torch.randn(n, d), dim=1)
    log_scale = torch.full(scale_shape, 2.659)  # log(1/0.07)
    bias = torch.tensor(-1.5) if with_bias else None
    results = []
    for loss_cls in (OpenClipLoss, sc.ClipLoss):
        i, t, ls = img.clone().requires_grad_(), txt.clone().requires_grad_(), log_scale.clone().requires_grad_()
        b = bias.clone().requires_grad_() if with_bias else None
        out = loss_cls()(i, t, ls.exp(), logit_bias=b, output_dict=output_dict)
        loss = out["contrastive_loss"] if output_dict else out
        if output_dict:
            assert set(out) == {"contrastive_loss"}
        loss.backward()
        results.append((loss, i.grad, t.grad, ls.grad, b.grad if with_bias else None))
    (l0, gi0, gt0, gs0, gb0), (l1, gi1, gt1, gs1, gb1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for x, y in ((gi1, gi0), (gt1, gt0), (gs1, gs0)):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    if with_bias:
        torch.testing.assert_close(gb1, gb0, rtol=0, atol=1e-5)  # both ~0: the bias cancels in softmax


def test_world_size_without_process_group_is_a_clear_error():
    loss = sc.ClipLoss(world_size=2, rank=1)
    with pytest.raises(RuntimeError, match="initialised torch.distributed"):
        loss(torch.randn(4, 8), torch.randn(4, 8), torch.tensor(10.0))
    with pytest.raises(ValueError, match="use_horovod"):
        sc.ClipLoss(use_horovod=True)
