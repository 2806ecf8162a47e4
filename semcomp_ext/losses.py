"""Loss modules: an open_clip-compatible ClipLoss on the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from .functional import infonce_loss

__all__ = ["ClipLoss", "InfoNCELoss"]


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
        from .distributed import IMPLS

        if use_horovod:
            raise ValueError("ClipLoss: use_horovod=True is not supported; use torch.distributed (world_size, rank)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ClipLoss: need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if impl not in IMPLS:
            raise ValueError(f"ClipLoss: impl must be one of {IMPLS}, got {impl!r}")
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
            from .functional import _attach_bias, _resolve_scale

            if dist.is_available() and dist.is_initialized() and dist.get_rank(self.group) != self.rank:
                raise ValueError(f"ClipLoss: rank={self.rank} but this process is rank {dist.get_rank(self.group)} of the group")
            scale = _resolve_scale("ClipLoss", None, logit_scale, image_features)
            loss = distributed_infonce(
                [image_features, text_features], scale, [(0, 1)],
                local_loss=self.local_loss, gather_with_grad=self.gather_with_grad, impl=self.impl,
                world_size=self.world_size, group=self.group, names=("image_features", "text_features"),
                fn="ClipLoss", check_shapes=self.check_shapes,
            )
            loss = _attach_bias(loss, "ClipLoss", logit_bias)
        else:
            loss = infonce_loss(image_features, text_features, logit_scale=logit_scale, logit_bias=logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class InfoNCELoss(nn.Module):
    """Module form of :func:`semcomp_ext.infonce_loss` with a fixed temperature or a learnable
    logit scale (``learnable=True``: parameter log(1/temperature), clamped to max_logit_scale
    like open_clip's training loop does)."""

    def __init__(self, temperature: float = 0.07, *, learnable: bool = False, max_logit_scale: float = 100.0, reduction: str = "mean"):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"InfoNCELoss: temperature must be > 0, got {temperature}")
        self.reduction = reduction
        self.max_logit_scale = max_logit_scale
        init = torch.tensor(1.0 / temperature).log()
        if learnable:
            self.log_logit_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_logit_scale", init)

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=self.max_logit_scale)

    def forward(self, a, b):
        scale = self.logit_scale.to(a.device)
        if a.dtype == torch.float64:
            scale = scale.double()
        return infonce_loss(a, b, logit_scale=scale, reduction=self.reduction)
