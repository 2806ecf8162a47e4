"""Nearest-neighbour agreement between two representations of the same rows (no labels needed):
how much a search over compressed vectors recovers of a search over everything kept."""

from __future__ import annotations

import torch


def nearest(x: torch.Tensor, qidx: torch.Tensor, k: int = 10, chunk: int = 512) -> torch.Tensor:
    """(Q, k) rows of x nearest (cosine) to each query row x[qidx], the query itself excluded."""
    xn = torch.nn.functional.normalize(x.float(), dim=1)
    out = []
    for i in range(0, len(qidx), chunk):
        q = qidx[i:i + chunk]
        sim = xn[q] @ xn.T
        sim[torch.arange(len(q)), q] = -float("inf")
        out.append(sim.topk(min(k, x.shape[0] - 1), dim=1).indices)
    return torch.cat(out)


def neighbour_recall(x: torch.Tensor, ref: torch.Tensor, qidx: torch.Tensor) -> float:
    """recall@k of nearest-neighbour search in x against exact search in the reference: the
    mean fraction of each query's k reference neighbours (`ref`, from `nearest`) that x's k
    nearest rows recover. Needs no labels."""
    got = nearest(x, qidx, ref.shape[1])
    return float((got.unsqueeze(2) == ref.unsqueeze(1)).any(2).double().mean())
