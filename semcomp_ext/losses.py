"""Loss modules on the fused kernels: open_clip-compatible ClipLoss and SigLipLoss, InfoNCELoss,
and the multimodal InfoNCE loss (single-process and distributed).

Layering runs one way: :mod:`.functional` (single process) <- :mod:`.distributed` (builds on
functional) <- this module, which chooses the distributed path when asked for it. The
distributed package is imported on first distributed use, so ``import semcomp_ext`` does not
load it (nor torch.distributed's collectives machinery).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn


from .functional import SIGMOID_BACKWARDS, infonce_loss, sigmoid_loss
from .validation import (
    DEFAULT_TEMPERATURE,
    attach_bias,
    check_matrix,
    check_modalities,
    check_pair,
    check_reduction,
    check_scale_tensor,
    modality_pairs,
    number,
    promote,
    resolve_scale,
)

__all__ = ["ClipLoss", "InfoNCELoss", "SigLipLoss", "multimodal_infonce_loss"]

_IMPLS = ("gather", "ring")  # semcomp_ext.distributed.IMPLS (checked equal in the tests)
_SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # distributed.neighbour.DIST_IMPLS (tested equal)


def multimodal_infonce_loss(
    zs: Sequence[torch.Tensor],
    temperature: float | torch.Tensor | None = DEFAULT_TEMPERATURE,
    *,
    pairs: str = "all",
    anchor: int = 0,
    logit_scale=None,
    reduction: str = "mean",
    distributed: bool = False,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    impl: str = "gather",
    group=None,
) -> torch.Tensor:
    """Mean of the symmetric InfoNCE over modality pairs of M >= 2 row-aligned (N, D) tensors:
    all M(M-1)/2 pairs (pairs="all") or the M-1 pairs (anchor, m) (pairs="anchor"). Each pair
    runs on the fused kernels. temperature: a number or a one-element tensor (a tensor that
    requires grad receives its gradient); or give logit_scale. Mixed dtypes are promoted.

    distributed=True: zs are this rank's local (n, D) features of a torch.distributed group
    (default: the world); the loss is over the global batch W*n with ClipLoss's semantics per
    pair: local_loss, gather_with_grad, impl="gather" | "ring" (see semcomp_ext.ClipLoss).
    local_loss=False returns the global loss on every rank. reduction must be "mean" then.
    """
    fn = "multimodal_infonce_loss"
    zs = check_modalities(fn, zs)
    idx = modality_pairs(fn, len(zs), pairs, anchor)
    if not distributed:
        for i, z in enumerate(zs):
            check_pair(fn, zs[0], z, ("zs[0]", f"zs[{i}]"))
        resolve_scale(fn, temperature, logit_scale, zs[0])  # validated once, before any pair runs
        zs = promote(fn, zs)
        losses = [infonce_loss(zs[i], zs[j], temperature, logit_scale=logit_scale, reduction=reduction)
                  for i, j in idx]
        return torch.stack(losses).mean(0)
    if reduction != "mean":
        raise ValueError(f"{fn}: distributed=True supports reduction='mean' only, got {reduction!r}")
    if impl not in _IMPLS:
        raise ValueError(f"{fn}: impl must be one of {_IMPLS}, got {impl!r}")
    for i, z in enumerate(zs):
        check_matrix(fn, f"zs[{i}]", z)
    zs = promote(fn, zs)
    s = resolve_scale(fn, temperature, logit_scale, zs[0])
    from .distributed import distributed_infonce

    return distributed_infonce(
        zs, s, idx, local_loss=local_loss, gather_with_grad=gather_with_grad, impl=impl, group=group, fn=fn
    )


class ClipLoss(nn.Module):
    """Drop-in replacement for ``open_clip.loss.ClipLoss`` computed by the fused InfoNCE kernels
    (no N x N logits). Same constructor, same ``forward`` keywords and return value.

    ``logit_scale`` is the already-exponentiated scale (a tensor of shape [] or [1], as open_clip
    passes ``model.logit_scale.exp()``); ``logit_bias`` shifts all logits equally and changes
    neither the loss nor the gradients. The loss is returned in fp32 for fp16/bf16 features.

    With world_size > 1 (torch.distributed initialised) the loss and the gradients every rank
    receives equal open_clip's for each (local_loss, gather_with_grad) combination (design §2.3):
    local_loss=True computes this rank's rows against all columns with the rectangular kernel
    (labels offset by n * rank); local_loss=False the global loss on every rank.

    Extra keywords (not in open_clip):
      impl: "gather" (all-gather the features, open_clip's way) or "ring" (key blocks travel
        around the ring by send/recv; never all ranks' features at once; same values).
      check_shapes: all-gather every rank's (n, D, dtype) first so unequal local batches or
        feature sizes raise the same ValueError on every rank instead of hanging (one tiny
        collective per call).
      group: the process group (default: the world).
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False, *, impl="gather", check_shapes=True, group=None):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss: use_horovod=True is not supported; use torch.distributed (world_size, rank)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ClipLoss: need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if impl not in _IMPLS:
            raise ValueError(f"ClipLoss: impl must be one of {_IMPLS}, got {impl!r}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: no label tensor is built
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.impl = impl
        self.check_shapes = check_shapes
        self.group = group

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            import torch.distributed as dist

            from .distributed import distributed_infonce

            if dist.is_available() and dist.is_initialized() and dist.get_rank(self.group) != self.rank:
                raise ValueError(f"ClipLoss: rank={self.rank} but this process is rank {dist.get_rank(self.group)} of the group")
            if torch.is_tensor(image_features) and torch.is_tensor(text_features):
                image_features, text_features = promote("ClipLoss", (image_features, text_features))
            scale = resolve_scale("ClipLoss", None, logit_scale, image_features)
            loss = distributed_infonce(
                [image_features, text_features], scale, [(0, 1)],
                local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, impl=self.impl,
                world_size=self.world_size, group=self.group, names=("image_features", "text_features"),
                fn="ClipLoss", check_shapes=self.check_shapes,
            )
            loss = attach_bias(loss, "ClipLoss", logit_bias)
        else:
            loss = infonce_loss(image_features, text_features, logit_scale=logit_scale, logit_bias=logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(nn.Module):
    """Module form of :func:`semcomp_ext.infonce_loss`.

    temperature: a number (fixed; or with ``learnable=True`` the start of a learnable logit
    scale, held as the parameter log(1/temperature) and clamped to max_logit_scale as
    open_clip's training loop does), or a one-element tensor used as it is: an ``nn.Parameter``
    (registered on the module) or any tensor that requires grad receives dL/dtemperature.
    """

    def __init__(self, temperature: float | torch.Tensor = 0.07, *, learnable: bool = False,
                 max_logit_scale: float = 100.0, reduction: str = "mean"):
        super().__init__()
        fn = "InfoNCELoss"
        check_reduction(fn, reduction)
        self.reduction = reduction
        self.max_logit_scale = max_logit_scale
        if torch.is_tensor(temperature):
            if learnable:
                raise ValueError(
                    f"{fn}: learnable=True makes its own parameter from a number; a tensor temperature "
                    "is used as given (pass an nn.Parameter or a tensor that requires grad to learn it)"
                )
            check_scale_tensor(fn, "temperature", temperature, temperature)
            self.temperature = temperature  # an nn.Parameter registers itself here
            self.log_logit_scale = None
            return
        t = number(fn, "temperature", temperature)
        if not (t > 0 and t < float("inf")):
            raise ValueError(f"{fn}: temperature must be finite and > 0, got {temperature}")
        self.temperature = None
        init = torch.tensor(1.0 / t).log()
        if learnable:
            self.log_logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_logit_scale", init)

    @property
    def logit_scale(self) -> torch.Tensor:
        if self.temperature is not None:
            return 1.0 / self.temperature
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, a, b):
        if self.temperature is not None:
            return infonce_loss(a, b, self.temperature.to(a.device), reduction=self.reduction)
        scale = self.logit_scale.to(a.device)
        if a.dtype == torch.float64:
            scale = scale.double()
        return infonce_loss(a, b, logit_scale=scale, reduction=self.reduction)


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
        if self.dist_impl not in _SIGLIP_DIST_IMPLS:
            raise ValueError(f"SigLipLoss: dist_impl must be one of {_SIGLIP_DIST_IMPLS}, got {dist_impl!r}")
        if backward not in SIGMOID_BACKWARDS:
            raise ValueError(f"SigLipLoss: backward must be one of {SIGMOID_BACKWARDS}, got {backward!r}")
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
            from .distributed.neighbour import sigmoid_remote_loss

            def neg(t):
                return self._loss(image_features, t, logit_scale, logit_bias, negative_only=True)

            loss = loss + sigmoid_remote_loss(neg, text_features, rank=self.rank, world_size=self.world_size,
                                              dist_impl=self.dist_impl, group=self.group)
        return {"contrastive_loss": loss} if output_dict else loss
