"""All-gather form of the distributed contrastive loss, with open_clip's semantics (design §2.3).

Every rank gathers the features of all ranks (N = W·n rows), then either computes the global
symmetric loss (``local_loss=False``) or only its own n rows against all N columns, in both
directions, with the fused rectangular kernel and positives at ``n·rank + i`` (``local_loss=True``).
Gradients follow open_clip exactly: ``gather_with_grad`` gathers with autograd (the backward of
the all-gather sums every rank's gradient for a block into its owner), otherwise the gather is
detached and, for the global loss only, this rank's slice is re-inserted so its own features
still receive gradients.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from ..functional import infonce_loss, infonce_rect_loss

__all__ = ["check_ready", "exchange_shapes", "gather_features", "gather_one", "gather_infonce"]

# dtypes are exchanged as small integers
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_ready(fn: str, world_size: int | None = None, group=None) -> tuple[int, int]:
    """(rank, world_size) of the process group; a clear error when there is none or it differs."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"{fn}: world_size={world_size} needs an initialised torch.distributed process group "
            "(torch.distributed.init_process_group)"
        )
    ws = dist.get_world_size(group)
    if world_size is not None and ws != world_size:
        raise ValueError(f"{fn}: world_size={world_size} but the process group has {ws} ranks")
    return dist.get_rank(group), ws


def _encode(z) -> list[int]:
    if not torch.is_tensor(z):
        return [-1, -1, -1, -1]
    code = _DTYPES.index(z.dtype) if z.dtype in _DTYPES else len(_DTYPES)
    return [z.dim(), z.shape[0] if z.dim() >= 1 else -1, z.shape[1] if z.dim() >= 2 else -1, code]


def exchange_shapes(fn: str, zs: Sequence, names: Sequence[str], group=None) -> int:
    """All-gather (ndim, rows, D, dtype) of every tensor on every rank, then check that all are
    (n, D) matrices of one float dtype with the same n and D everywhere. Every rank sees the same
    table, so every rank raises the same ValueError instead of some ranks hanging in a collective
    whose sizes do not match. Returns n. The exchange is 4·M int64 per rank."""
    import torch.distributed as dist

    dev = next((z.device for z in zs if torch.is_tensor(z)), torch.device("cpu"))
    if dist.get_backend(group) == "gloo":
        dev = torch.device("cpu")
    mine = torch.tensor([v for z in zs for v in _encode(z)], dtype=torch.int64, device=dev)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    rows = [t.view(len(zs), 4).tolist() for t in table]

    def show(r: list[int]) -> str:
        if r[0] == -1:
            return "not a tensor"
        dt = _DTYPES[r[3]] if r[3] < len(_DTYPES) else "other dtype"
        return f"{r[0]}-D ({r[1]}, {r[2]}) {dt}" if r[0] == 2 else f"{r[0]}-D {dt}"

    ref = rows[0][0]
    bad = [
        (rk, m)
        for rk, per in enumerate(rows)
        for m, r in enumerate(per)
        if r[0] != 2 or r[3] >= len(_DTYPES) or r[1] != ref[1] or r[2] != ref[2] or r[3] != ref[3] or r[1] == 0
    ]
    if bad:
        listing = "; ".join(f"rank {rk}: " + ", ".join(f"{names[m]} {show(r)}" for m, r in enumerate(per)) for rk, per in enumerate(rows))
        rk, m = bad[0]
        raise ValueError(
            f"{fn}: every rank must pass (n, D) float features with the same n (equal local batches), "
            f"D and dtype; first mismatch: rank {rk} {names[m]} is {show(rows[rk][m])} vs rank 0 {names[0]} "
            f"{show(ref)}. All ranks: {listing}"
        )
    return ref[1]


def gather_one(x: torch.Tensor, local_loss: bool, gather_with_grad: bool, rank: int, world_size: int, group=None):
    """open_clip's gather of one feature tensor: (W·n, D)."""
    import torch.distributed as dist

    if gather_with_grad:
        from torch.distributed import nn as dist_nn

        with warnings.catch_warnings():  # open_clip's choice; deprecated (FutureWarning) in new torch
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(dist_nn.all_gather(x, group=group or dist.group.WORLD), dim=0)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.detach().contiguous(), group=group)
    if not local_loss:
        parts[rank] = x  # re-inserted: this rank's features keep their gradient
    return torch.cat(parts, dim=0)


def gather_features(image_features, text_features, local_loss=False, gather_with_grad=False, rank=0, world_size=1, group=None):
    """All-gather both feature tensors along dim 0, like ``open_clip.loss.gather_features``."""
    check_ready("gather_features", world_size, group)
    return (
        gather_one(image_features, local_loss, gather_with_grad, rank, world_size, group),
        gather_one(text_features, local_loss, gather_with_grad, rank, world_size, group),
    )


def gather_infonce(zs, scale, pairs, *, local_loss, gather_with_grad, rank, world_size, n, group=None, chunk_size=0):
    """Mean over modality pairs (i, j) of the distributed symmetric InfoNCE on gathered features.

    local_loss: for each pair, ½ (mean_i rect(z_i local, Z_j all) + mean_i rect(z_j local, Z_i all))
    with positives at n·rank + i; otherwise the global loss on the gathered (W·n, D) tensors."""
    used = sorted({m for p in pairs for m in p})
    gathered = {m: gather_one(zs[m], local_loss, gather_with_grad, rank, world_size, group) for m in used}
    losses = []
    for i, j in pairs:
        if local_loss:
            off = n * rank
            li = infonce_rect_loss(zs[i], gathered[j], scale, offset=off, reduction="mean", chunk_size=chunk_size)
            lj = infonce_rect_loss(zs[j], gathered[i], scale, offset=off, reduction="mean", chunk_size=chunk_size)
            losses.append(0.5 * (li + lj))
        else:
            losses.append(infonce_loss(gathered[i], gathered[j], logit_scale=scale, chunk_size=chunk_size))
    return losses[0] if len(losses) == 1 else torch.stack(losses).mean()
