"""Neighbour exchanges for the distributed sigmoid (SigLIP) loss: text features travel between
ranks by point-to-point sends ("bidir": both neighbours per step, "shift": a ring) or by
collectives ("reduce", "gather"), with every gradient routed back to the rank whose features
it belongs to (open_clip's SigLipLoss semantics).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["DIST_IMPLS", "sigmoid_remote_loss"]

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _exchange(sends, recvs_like, group):
    """Posts every (tensor, peer) send and (peer) receive of one step together; returns the
    received tensors in the order of recvs_like."""
    import torch.distributed as dist

    out = [torch.empty(like.shape, dtype=like.dtype, device=like.device) for like, _ in recvs_like]  # contiguous
    p2p = [dist.P2POp(dist.isend, t.contiguous(), peer, group) for t, peer in sends]
    p2p += [dist.P2POp(dist.irecv, buf, peer, group) for buf, (_, peer) in zip(out, recvs_like)]
    for req in dist.batch_isend_irecv(p2p):
        req.wait()
    return out


class ShiftRight(torch.autograd.Function):
    """x goes to the right neighbour, the left neighbour's x arrives; the gradient goes back."""

    @staticmethod
    def forward(ctx, x, left, right, group):
        ctx.left, ctx.right, ctx.group = left, right, group
        return _exchange([(x, right)], [(x, left)], group)[0]

    @staticmethod
    def backward(ctx, g):
        return _exchange([(g, ctx.left)], [(g, ctx.right)], ctx.group)[0], None, None, None


class ShiftBoth(torch.autograd.Function):
    """to_left goes left and to_right goes right in one step; returns (from_right, from_left)."""

    @staticmethod
    def forward(ctx, to_left, to_right, left, right, group):
        ctx.left, ctx.right, ctx.group = left, right, group
        from_right, from_left = _exchange([(to_left, left), (to_right, right)], [(to_left, right), (to_right, left)], group)
        return from_right, from_left

    @staticmethod
    def backward(ctx, g_from_right, g_from_left):
        # from_right came from the right neighbour's to_left: its gradient goes back right
        g_to_left, g_to_right = _exchange(
            [(g_from_right, ctx.right), (g_from_left, ctx.left)],
            [(g_from_right, ctx.left), (g_from_left, ctx.right)], ctx.group)
        return g_to_left, g_to_right, None, None, None


def sigmoid_remote_loss(neg: Callable[[torch.Tensor], torch.Tensor], text_features: torch.Tensor, *,
                        rank: int, world_size: int, dist_impl: str, group=None):
    """Sum over the other ranks' text features t of neg(t) (this rank's negative-only sigmoid
    loss against t), the features exchanged by dist_impl (one of DIST_IMPLS)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"SigLipLoss: world_size={world_size} needs an initialised torch.distributed process group")
    w, r = world_size, rank
    right, left = (r + 1) % w, (r - 1 + w) % w
    if group is not None:  # P2P peers are global ranks
        right, left = dist.get_global_rank(group, right), dist.get_global_rank(group, left)
    total = 0
    if dist_impl == "bidir":
        to_left = to_right = text_features
        for _ in range((w - 1) // 2):
            from_right, from_left = ShiftBoth.apply(to_left, to_right, left, right, group)
            total = total + neg(from_right) + neg(from_left)
            to_left, to_right = from_right, from_left
        if (w - 1) % 2:
            total = total + neg(ShiftRight.apply(to_right, left, right, group))
    elif dist_impl == "shift":
        t = text_features
        for _ in range(w - 1):
            t = ShiftRight.apply(t, left, right, group)
            total = total + neg(t)
    elif dist_impl == "reduce":
        import torch.distributed.nn as dnn

        for i in range(w):
            other = dnn.all_reduce(text_features * (r == i), dist.ReduceOp.SUM, group=group or dist.group.WORLD)
            # this rank's own slot still joins the graph (with a zero gradient): the backward
            # of every all_reduce is a collective that all ranks must enter
            total = total + (neg(other) if i != r else 0.0 * other.sum())
    else:  # gather
        import torch.distributed.nn as dnn

        parts = dnn.all_gather(text_features, group=group or dist.group.WORLD)
        for i in range(w):
            if i != r:
                total = total + neg(parts[i])
    return total
