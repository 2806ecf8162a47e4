"""Pure-PyTorch references for every op: the ground truth of the tests and benchmarks, and the
fallback on devices without a native kernel. They build the full N x N logits (O(N^2) memory)
and compute in the dtype of their inputs: pass fp64 tensors for ground truth, or the same
low-precision tensors to measure what plain PyTorch achieves in that dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "infonce_rows_reference",
    "infonce_reference",
    "infonce_rect_reference",
    "centroids_reference",
    "select_features_reference",
    "sigmoid_loss_reference",
]


def _as_scale(logit_scale, like: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(logit_scale):
        logit_scale = torch.tensor(float(logit_scale))
    return logit_scale.to(device=like.device, dtype=like.dtype).reshape(())


def infonce_rows_reference(a: torch.Tensor, b: torch.Tensor, logit_scale) -> torch.Tensor:
    """Per-row symmetric InfoNCE loss l_i = ((r_i - S_ii) + (c_i - S_ii)) / 2, shape (N,)."""
    s = _as_scale(logit_scale, a)
    logits = s * (a @ b.T)
    labels = torch.arange(a.shape[0], device=a.device)
    row = F.cross_entropy(logits, labels, reduction="none")
    col = F.cross_entropy(logits.T, labels, reduction="none")
    return 0.5 * (row + col)


def infonce_reference(a, b, logit_scale, reduction: str = "mean", symmetric: bool = True):
    """Symmetric (or a->b one-directional) InfoNCE with reduction mean / sum / none."""
    rows = infonce_rows_reference(a, b, logit_scale) if symmetric else infonce_rect_reference(a, b, logit_scale)
    return {"mean": rows.mean, "sum": rows.sum, "none": lambda: rows}[reduction]()


def infonce_rect_reference(q: torch.Tensor, k: torch.Tensor, logit_scale, offset: int = 0) -> torch.Tensor:
    """One-directional InfoNCE, positives at k[i + offset]: per-row loss (Nq,)."""
    s = _as_scale(logit_scale, q)
    logits = s * (q @ k.T)
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels, reduction="none")


def infonce_lse_reference(q: torch.Tensor, k: torch.Tensor, logit_scale, offset: int = 0,
                          symmetric: bool = False) -> tuple[torch.Tensor, ...]:
    """The fused ops' forward outputs in fp64: per-row loss and row log-sum-exps r (and for the
    symmetric form, offset 0, the column log-sum-exps c): (loss, r) or (loss, r, c), where
    loss_i = r_i - S_i,i+offset, or (r_i + c_i)/2 - S_ii when symmetric."""
    S = _as_scale(logit_scale, q.double()) * (q.double() @ k.double().T)
    r = torch.logsumexp(S, 1)
    idx = torch.arange(q.shape[0], device=q.device)
    diag = S[idx, idx + offset]
    if symmetric:
        c = torch.logsumexp(S, 0)
        return 0.5 * (r + c) - diag, r, c
    return r - diag, r


def centroids_reference(x: torch.Tensor, ids: torch.Tensor, num_groups: int, features=None):
    """Segment mean via index_add_: returns (means (G, K), counts (G,) int64)."""
    if features is not None:
        x = x[:, features]
    ids = ids.long()
    sums = torch.zeros(num_groups, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, ids, x)
    counts = torch.bincount(ids, minlength=num_groups)
    return sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype), counts


def select_features_reference(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Column gather x[:, index]."""
    return x.index_select(1, index.long())


def sigmoid_loss_reference(a, b, logit_scale, logit_bias=None, *, negative_only=False, reduction="mean"):
    """Sigmoid (SigLIP) loss through the full Na x Nb logit matrix (semcomp_ext.sigmoid_loss's
    formula and reductions)."""
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
