"""Fused sigmoid (SigLIP) loss: ``sigmoid_loss`` and the drop-in ``SigLipLoss`` module.

For a (Na, D), b (Nb, D), a logit scale s and a logit bias t (one-element tensors or numbers)::

    z_ij = s <a_i, b_j> + t,    y_ij = +1 if j == i else -1   (all -1 with negative_only=True)
    loss_i = sum_j -log sigmoid(y_ij z_ij)                     (per row, reduction="none")
    loss   = sum_i loss_i / Na                                  (reduction="mean", open_clip's)

The native ops (``torch.ops.semcomp.sigmoid_fwd`` / ``sigmoid_bwd`` / ``sigmoid_fwd_bwd``,
csrc/siglip/) never build the Na x Nb logit matrix: rows of a are processed in chunks and the
extra memory is one chunk plus O(N). Two backward strategies:

* ``backward="recompute"``: the forward keeps only its inputs; the backward recomputes each
  chunk of logits (one GEMM more than autograd through the full matrix).
* ``backward="onepass"``: when a gradient will be needed, the forward also computes the
  gradients of the summed loss in the same pass over the chunks (no recomputation) and keeps
  them (2 x N x D, the size of the gradients themselves) until the backward scales them by the
  upstream gradient. Only for a scalar loss (``reduction`` "mean" or "sum").
* ``"auto"`` (default): "onepass" for a scalar loss that needs gradients, else "recompute".

Layer: this module registers fake kernels and autograd for the sigmoid ops (as ``_ops`` does
for the others) and validates arguments like :mod:`semcomp_ext.functional` (``TypeError`` for an
argument of the wrong kind, ``ValueError`` naming the argument for a bad shape, dtype, device or
value). Non-finite embeddings propagate to NaN outputs.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import nn

from ._ops import ops
from .functional import _check_matrix, _check_one_element

__all__ = ["SigLipLoss", "sigmoid_loss", "sigmoid_loss_reference"]

_REDUCTIONS = ("mean", "sum", "none")
_BACKWARDS = ("auto", "recompute", "onepass")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels ----------------------------------------------------------------------


def _check_fake(op, a, b, logit_scale, logit_bias, negative_only):
    torch._check_value(a.dim() == 2 and b.dim() == 2, lambda: f"{op}: a and b must be 2-D")
    torch._check_value(a.dtype == b.dtype, lambda: f"{op}: dtypes differ: {a.dtype} vs {b.dtype}")
    torch._check_value(a.shape[1] == b.shape[1], lambda: f"{op}: feature dimensions differ")
    torch._check_value(logit_scale.numel() == 1, lambda: f"{op}: logit_scale must have one element")
    torch._check_value(logit_bias.numel() == 1, lambda: f"{op}: logit_bias must have one element")
    if not negative_only:
        torch._check_value(a.shape[0] == b.shape[0], lambda: f"{op}: a and b row counts differ")


@torch.library.register_fake("semcomp::sigmoid_fwd")
def _sigmoid_fwd_fake(a, b, logit_scale, logit_bias, negative_only=False, chunk_size=0):
    _check_fake("sigmoid_fwd", a, b, logit_scale, logit_bias, negative_only)
    return a.new_empty(a.shape[0], dtype=_acc_dtype(a.dtype))


@torch.library.register_fake("semcomp::sigmoid_bwd")
def _sigmoid_bwd_fake(a, b, logit_scale, logit_bias, grad_rows, negative_only=False, chunk_size=0):
    _check_fake("sigmoid_bwd", a, b, logit_scale, logit_bias, negative_only)
    return (a.new_empty(a.shape), b.new_empty(b.shape), torch.empty_like(logit_scale),
            torch.empty_like(logit_bias))


@torch.library.register_fake("semcomp::sigmoid_fwd_bwd")
def _sigmoid_fwd_bwd_fake(a, b, logit_scale, logit_bias, negative_only=False, chunk_size=0):
    _check_fake("sigmoid_fwd_bwd", a, b, logit_scale, logit_bias, negative_only)
    acc = _acc_dtype(a.dtype)
    return (a.new_empty((), dtype=acc), a.new_empty(a.shape, dtype=acc), b.new_empty(b.shape, dtype=acc),
            torch.empty_like(logit_scale), torch.empty_like(logit_bias))


# ---- autograd ----------------------------------------------------------------------------


def _fwd_setup(ctx, inputs, output):
    a, b, logit_scale, logit_bias, negative_only, chunk_size = inputs
    ctx.negative_only, ctx.chunk_size = negative_only, chunk_size
    if any(ctx.needs_input_grad[:4]):
        ctx.save_for_backward(a, b, logit_scale, logit_bias)


def _fwd_backward(ctx, g_rows):
    a, b, logit_scale, logit_bias = ctx.saved_tensors
    ga, gb, gs, gt = ops.sigmoid_bwd(a, b, logit_scale, logit_bias, g_rows, ctx.negative_only, ctx.chunk_size)
    need = ctx.needs_input_grad
    return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
            gt if need[3] else None, None, None)


torch.library.register_autograd("semcomp::sigmoid_fwd", _fwd_backward, setup_context=_fwd_setup)


def _is_eager(x: torch.Tensor) -> bool:
    """Plain eager execution: no compiler, no tensor subclass (fake, functional), no dispatch
    mode (tracing) active."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


def _onepass_setup(ctx, inputs, output):
    a, b, logit_scale, logit_bias, negative_only, chunk_size = inputs
    _, ga, gb, gs, gt = output
    ctx.dtypes = (a.dtype, b.dtype)
    ctx.negative_only, ctx.chunk_size = negative_only, chunk_size
    # the gradient outputs are never differentiated: without this, autograd would hand the
    # backward N x D zero tensors for them
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(a, b, logit_scale, logit_bias)  # references only: for a second backward
    if _is_eager(ga):
        ctx.grads = [ga, gb, gs, gt]
    else:  # traced (torch.compile, opcheck): the gradients are saved and scaled out of place
        ctx.save_for_backward(a, b, logit_scale, logit_bias, ga, gb, gs, gt)
        ctx.grads = None


def _onepass_backward(ctx, g_loss, *_unused):
    # The gradients computed by the forward are those of the summed loss: the upstream gradient
    # scales them. The first backward (in eager mode) scales them in place and hands them over,
    # so the peak holds one set of N x D gradients; a later backward through the same graph
    # (retain_graph=True) recomputes them from the inputs.
    need = ctx.needs_input_grad
    if g_loss is None:  # only the gradient outputs were used: they are constants
        return None, None, None, None, None, None
    saved = ctx.saved_tensors
    a, b, logit_scale, logit_bias = saved[:4]
    if len(saved) > 4:  # traced by torch.compile: out of place
        ga, gb, gs, gt = saved[4:]
        g = g_loss.to(ga.dtype)
        ga, gb = g * ga, g * gb
    elif ctx.grads is not None:
        ga, gb, gs, gt = ctx.grads
        ctx.grads = None
        g = g_loss.to(ga.dtype)
        ga, gb = ga.mul_(g), gb.mul_(g)
    else:
        rows = g_loss.reshape(1).expand(a.shape[0])
        ga, gb, gs, gt = ops.sigmoid_bwd(a, b, logit_scale, logit_bias, rows, ctx.negative_only, ctx.chunk_size)
        return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
                gt if need[3] else None, None, None)
    return (ga.to(ctx.dtypes[0]) if need[0] else None,
            gb.to(ctx.dtypes[1]) if need[1] else None,
            (g.to(gs.dtype) * gs) if need[2] else None,
            (g.to(gt.dtype) * gt) if need[3] else None, None, None)


torch.library.register_autograd("semcomp::sigmoid_fwd_bwd", _onepass_backward, setup_context=_onepass_setup)


# ---- validation ----------------------------------------------------------------------------


def _param(fn: str, name: str, value, like: torch.Tensor) -> torch.Tensor:
    """logit_scale / logit_bias as a one-element floating tensor on like's device. Numbers
    become constants in the accumulation dtype; tensors are used as they are (learnable).
    Finite values are required: checked here for numbers and CPU tensors (outside tracing),
    by the native CPU kernels otherwise."""
    if not torch.is_tensor(value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{fn}: {name} must be a number or a one-element tensor, got {type(value).__name__} {value!r}")
        if not math.isfinite(float(value)):
            raise ValueError(f"{fn}: {name} must be finite, got {value}")
        return torch.full((), float(value), dtype=_acc_dtype(like.dtype), device=like.device)
    _check_one_element(fn, name, value, like)
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        v = float(value.detach().reshape(()))
        if not math.isfinite(v):
            raise ValueError(f"{fn}: {name} must be finite, got {v}")
    return value


def _check_inputs(fn, a, b, negative_only):
    _check_matrix(fn, "a", a)
    _check_matrix(fn, "b", b)
    if a.device != b.device:
        raise ValueError(f"{fn}: a and b must be on the same device, got {a.device} and {b.device}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: a and b must have the same feature dimension D, got {a.shape[1]} and {b.shape[1]}")
    if a.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch: a has 0 rows")
    if b.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch: b has 0 rows")
    if not negative_only and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{fn}: a and b must have the same number of rows N (row i of a pairs with row i of b) "
            f"unless negative_only=True, got {a.shape[0]} and {b.shape[0]}")
    if a.dtype != b.dtype:
        if torch.is_autocast_enabled(a.device.type):
            low = torch.get_autocast_dtype(a.device.type)
            a, b = (x if x.dtype == torch.float64 else x.to(low) for x in (a, b))
        target = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(target), b.to(target)
    return a, b


# ---- public API ----------------------------------------------------------------------------


def sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None = None,
    *,
    negative_only: bool = False,
    reduction: str = "mean",
    backward: str = "auto",
    chunk_size: int = 0,
) -> torch.Tensor:
    """Sigmoid (SigLIP) loss of a (Na, D) against b (Nb, D), fused (O(N) extra memory).

    ``logit_scale`` multiplies the dot products (open_clip passes ``logit_scale.exp()``),
    ``logit_bias`` is added (None: 0); both may be learnable one-element tensors and receive
    gradients. Positives are the pairs (a_i, b_i) (Na == Nb), or none with
    ``negative_only=True`` (a block against another rank's b). ``reduction``: "mean" (open_clip's
    normalisation: the sum over all Na x Nb pairs divided by Na), "sum", or "none" (per-row
    losses, shape (Na,), each summed over the Nb columns). ``backward``: see the module
    docstring. ``chunk_size``: rows per chunk (0: about 4M logits per chunk on the CPU, 32M on CUDA).
    Returns a 0-d tensor (or (Na,)) in fp32 (fp64 for fp64 inputs).
    """
    fn = "sigmoid_loss"
    if not isinstance(negative_only, bool):
        raise TypeError(f"{fn}: negative_only must be a bool, got {type(negative_only).__name__}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backward not in _BACKWARDS:
        raise ValueError(f"{fn}: backward must be one of {_BACKWARDS}, got {backward!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"{fn}: chunk_size must be an int >= 0, got {chunk_size!r}")
    a, b = _check_inputs(fn, a, b, negative_only)
    scale = _param(fn, "logit_scale", logit_scale, a)
    bias = _param(fn, "logit_bias", 0.0 if logit_bias is None else logit_bias, a)
    if backward == "onepass" and reduction == "none":
        raise ValueError(f"{fn}: backward='onepass' needs a scalar loss (reduction 'mean' or 'sum'), got reduction='none'")
    wants_grad = torch.is_grad_enabled() and any(
        x.requires_grad for x in (a, b, scale, bias))
    onepass = wants_grad and reduction != "none" and backward in ("auto", "onepass")
    if onepass:
        total = ops.sigmoid_fwd_bwd(a, b, scale, bias, negative_only, chunk_size)[0]
        return total / a.shape[0] if reduction == "mean" else total
    rows = ops.sigmoid_fwd(a, b, scale, bias, negative_only, chunk_size)
    if reduction == "mean":
        return rows.sum() / a.shape[0]
    return rows.sum() if reduction == "sum" else rows


def sigmoid_loss_reference(a, b, logit_scale, logit_bias=None, *, negative_only=False, reduction="mean"):
    """Pure-PyTorch sigmoid loss through the full Na x Nb logit matrix (the test reference)."""
    z = logit_scale * (a @ b.T)
    if logit_bias is not None:
        z = z + logit_bias
    y = -torch.ones_like(z)
    if not negative_only:
        y = y + 2 * torch.eye(a.shape[0], b.shape[0], dtype=z.dtype, device=z.device)
    rows = -torch.nn.functional.logsigmoid(y * z).sum(1)
    if reduction == "none":
        return rows
    return rows.sum() / a.shape[0] if reduction == "mean" else rows.sum()


# ---- distributed exchange ------------------------------------------------------------------


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


class _ShiftRight(torch.autograd.Function):
    """x goes to the right neighbour, the left neighbour's x arrives; the gradient goes back."""

    @staticmethod
    def forward(ctx, x, left, right, group):
        ctx.left, ctx.right, ctx.group = left, right, group
        return _exchange([(x, right)], [(x, left)], group)[0]

    @staticmethod
    def backward(ctx, g):
        return _exchange([(g, ctx.left)], [(g, ctx.right)], ctx.group)[0], None, None, None


class _ShiftBoth(torch.autograd.Function):
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


class SigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss`` on the fused sigmoid loss.

    Same constructor and ``forward(image_features, text_features, logit_scale, logit_bias,
    output_dict=False)``; the loss is the local block (positives on the diagonal) plus, for
    ``world_size > 1``, a negative-only block against every other rank's text features, each
    divided by the local batch size. Text features travel by ``dist_impl``: "bidir" (default;
    both neighbours per step), "shift" (ring), "reduce" (all_reduce per rank) or "gather"
    (all_gather), with gradients returned to their owners as in open_clip. ``cache_labels`` is
    accepted for compatibility (no label matrix is built). ``group``: an optional process group
    (open_clip uses the default one). Extra keyword arguments go to :func:`sigmoid_loss`
    (``backward``, ``chunk_size``).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: Optional[str] = None,
        *,
        group=None,
        backward: str = "auto",
        chunk_size: int = 0,
    ):
        super().__init__()
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"SigLipLoss: dist_impl must be one of ('bidir', 'shift', 'reduce', 'gather'), got {dist_impl!r}")
        if backward not in _BACKWARDS:
            raise ValueError(f"SigLipLoss: backward must be one of {_BACKWARDS}, got {backward!r}")
        self.group = group
        self.backward_mode = backward
        self.chunk_size = chunk_size
        self.prev_num_logits = 0
        self.labels = {}

    # open_clip's helpers, for code that calls them (they build N x N matrices)
    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> torch.Tensor:
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        logits = logit_scale * image_features @ text_features.T
        return logits if logit_bias is None else logits + logit_bias

    def _loss(self, image_features, text_features, logit_scale, logit_bias=None, negative_only=False):
        return sigmoid_loss(image_features, text_features, logit_scale, logit_bias, negative_only=negative_only,
                            backward=self.backward_mode, chunk_size=self.chunk_size)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        loss = self._loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            loss = loss + self._remote_loss(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss

    def _remote_loss(self, image_features, text_features, logit_scale, logit_bias):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"SigLipLoss: world_size={self.world_size} needs an initialised torch.distributed process group")
        w, r, group = self.world_size, self.rank, self.group
        right, left = (r + 1) % w, (r - 1 + w) % w
        if group is not None:  # P2P peers are global ranks
            right, left = dist.get_global_rank(group, right), dist.get_global_rank(group, left)

        def neg(t):
            return self._loss(image_features, t, logit_scale, logit_bias, negative_only=True)

        total = 0
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            for _ in range((w - 1) // 2):
                from_right, from_left = _ShiftBoth.apply(to_left, to_right, left, right, group)
                total = total + neg(from_right) + neg(from_left)
                to_left, to_right = from_right, from_left
            if (w - 1) % 2:
                total = total + neg(_ShiftRight.apply(to_right, left, right, group))
        elif self.dist_impl == "shift":
            t = text_features
            for _ in range(w - 1):
                t = _ShiftRight.apply(t, left, right, group)
                total = total + neg(t)
        elif self.dist_impl == "reduce":
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
