"""Feature gathering across ranks with open_clip's semantics (torch.distributed)."""

from __future__ import annotations

import torch


def _check_ready(world_size: int) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"ClipLoss: world_size={world_size} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    if dist.get_world_size() != world_size:
        raise ValueError(f"ClipLoss: world_size={world_size} but the process group has {dist.get_world_size()} ranks")


def gather_features(image_features, text_features, local_loss=False, gather_with_grad=False, rank=0, world_size=1):
    """All-gather both feature tensors along dim 0, like open_clip.loss.gather_features.

    gather_with_grad: the all-gather itself carries gradients (every rank's loss reaches every
    rank's features). Otherwise the gather is detached and, unless local_loss, this rank's
    slice is re-inserted so its own features still receive gradients."""
    import torch.distributed as dist

    _check_ready(world_size)
    if gather_with_grad:
        import torch.distributed.nn

        return (
            torch.cat(torch.distributed.nn.all_gather(image_features), dim=0),
            torch.cat(torch.distributed.nn.all_gather(text_features), dim=0),
        )
    gi = [torch.zeros_like(image_features) for _ in range(world_size)]
    gt = [torch.zeros_like(text_features) for _ in range(world_size)]
    dist.all_gather(gi, image_features)
    dist.all_gather(gt, text_features)
    if not local_loss:
        gi[rank] = image_features
        gt[rank] = text_features
    return torch.cat(gi, dim=0), torch.cat(gt, dim=0)
