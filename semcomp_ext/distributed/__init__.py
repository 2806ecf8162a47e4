"""Distributed contrastive losses over ``torch.distributed`` (open_clip semantics, design §2.3).

- :func:`distributed_infonce`: the mean over modality pairs of the symmetric InfoNCE across
  ranks, in the all-gather form (``impl="gather"``, exactly open_clip's ClipLoss for two
  modalities) or the ring form (``impl="ring"``: key blocks travel rank to rank, O(n·D) memory).
- :func:`gather_features`: open_clip's feature gather.
- :mod:`.launch`: a spawn-based launcher with timeouts (tests and benchmarks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .gather import check_ready, exchange_shapes, gather_features, gather_infonce
from .ring import ring_infonce

__all__ = ["distributed_infonce", "exchange_shapes", "gather_features", "IMPLS"]

IMPLS = ("gather", "ring")


def distributed_infonce(
    zs: Sequence[torch.Tensor],
    logit_scale: torch.Tensor,
    pairs: Sequence[tuple[int, int]],
    *,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    impl: str = "gather",
    world_size: int | None = None,
    group=None,
    names: Sequence[str] | None = None,
    fn: str = "distributed_infonce",
    check_shapes: bool = True,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Mean over ``pairs`` of the symmetric InfoNCE of row-aligned local features zs[m] (n, D)
    across all ranks of ``group`` (global batch W·n).

    local_loss=False: every rank returns the global loss; True: each rank's own rows against all
    columns (labels n·rank + i). gather_with_grad: gradients reach the features of every rank
    (open_clip). check_shapes: first all-gather (n, D, dtype) of every tensor so a rank with a
    different batch size, D or dtype gets a ValueError on every rank instead of a hang.
    """
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
    rank, ws = check_ready(fn, world_size, group)
    names = list(names) if names is not None else [f"zs[{m}]" for m in range(len(zs))]
    if check_shapes:
        n = exchange_shapes(fn, zs, names, group)
    else:
        n = zs[0].shape[0]
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, n=n, group=group, chunk_size=chunk_size)
    if impl == "ring":
        return ring_infonce(zs, logit_scale, pairs, **kw)
    return gather_infonce(zs, logit_scale, pairs, rank=rank, world_size=ws, **kw)
