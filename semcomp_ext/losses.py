"""Loss modules: an open_clip-compatible ClipLoss on the fused kernels."""

from __future__ import annotations

import torch
from torch import nn

from .functional import infonce_loss, infonce_rect_loss

__all__ = ["ClipLoss", "InfoNCELoss"]


class ClipLoss(nn.Module):
    """Drop-in replacement for ``open_clip.loss.ClipLoss`` computed by the fused InfoNCE kernels
    (no N x N logits). Same constructor, same ``forward`` keywords and return value.

    ``logit_scale`` is the already-exponentiated scale (a tensor of shape [] or [1], as open_clip
    passes ``model.logit_scale.exp()``); ``logit_bias`` shifts all logits equally and changes
    neither the loss nor the gradients. The loss is returned in fp32 for fp16/bf16 features.

    With world_size > 1 (torch.distributed initialised) features are gathered as open_clip does:
    local_loss=True uses local rows against all columns (rectangular kernel, labels offset by
    n * rank); local_loss=False computes the global loss on every rank.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1, use_horovod=False):
        super().__init__()
        if use_horovod:
            raise ValueError("ClipLoss: use_horovod=True is not supported; use torch.distributed (world_size, rank)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ClipLoss: need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels  # accepted for compatibility: no label tensor is built
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
        if self.world_size > 1:
            from .distributed import gather_features

            all_img, all_txt = gather_features(
                image_features, text_features, self.local_loss, self.gather_with_grad, self.rank, self.world_size
            )
            if self.local_loss:
                off = image_features.shape[0] * self.rank
                loss = 0.5 * (
                    infonce_rect_loss(image_features, all_txt, logit_scale, offset=off, reduction="mean")
                    + infonce_rect_loss(text_features, all_img, logit_scale, offset=off, reduction="mean")
                )
            else:
                loss = infonce_loss(all_img, all_txt, logit_scale=logit_scale)
            if logit_bias is not None and torch.is_tensor(logit_bias) and logit_bias.requires_grad:
                loss = loss + 0.0 * logit_bias.reshape(())
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
