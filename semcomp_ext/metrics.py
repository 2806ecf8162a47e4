"""Geometry of multimodal embeddings: modality gap, pair alignment, class separation,
intrinsic dimensionality, and storage accounting."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "modality_gap",
    "modality_gaps",
    "true_pair_cosine",
    "fisher_ratio",
    "explained_variance",
    "ExplainedVariance",
    "compression_ratio",
]


def _check_2d(fn: str, name: str, x) -> torch.Tensor:
    if not torch.is_tensor(x) or x.dim() != 2 or not x.is_floating_point():
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{fn}: {name} must be a 2-D floating tensor (N, D), got {shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: {name} is empty (0 rows)")
    return x


def _check_same(fn: str, a, b) -> None:
    _check_2d(fn, "a", a)
    _check_2d(fn, "b", b)
    if a.shape != b.shape:
        raise ValueError(f"{fn}: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def modality_gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Liang et al. (2022): || mean_i a_i/|a_i| - mean_i b_i/|b_i| ||_2 (fp64 scalar tensor).
    a and b need not be row-aligned, only of equal width; here both must be (N, D)."""
    fn = "modality_gap"
    _check_2d(fn, "a", a)
    _check_2d(fn, "b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{fn}: a and b must have the same dimension D, got {a.shape[1]} and {b.shape[1]}")
    ma = F.normalize(a.double(), dim=1).mean(0)
    mb = F.normalize(b.double(), dim=1).mean(0)
    return torch.linalg.vector_norm(ma - mb)


def modality_gaps(zs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise gap matrix (M, M) of M modalities and the mean over the M(M-1)/2 pairs."""
    m = len(zs)
    if m < 2:
        raise ValueError(f"modality_gaps: need at least 2 modalities, got {m}")
    means = torch.stack([F.normalize(_check_2d("modality_gaps", f"zs[{i}]", z).double(), dim=1).mean(0) for i, z in enumerate(zs)])
    gaps = torch.cdist(means, means)
    iu = torch.triu_indices(m, m, 1)
    return gaps, gaps[iu[0], iu[1]].mean()


def true_pair_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean_i cos(a_i, b_i) over row-aligned pairs (fp64 scalar tensor)."""
    _check_same("true_pair_cosine", a, b)
    return F.cosine_similarity(a.double(), b.double(), dim=1).mean()


def fisher_ratio(zs, labels: torch.Tensor) -> torch.Tensor:
    """Tr(S_B) / Tr(S_W) of the embeddings with classes pooled over modalities.

    zs: one (N, D) tensor or a sequence of M row-aligned (N, D) tensors; labels: (N,) ints.
    S_B = sum_c n_c (mu_c - mu)(mu_c - mu)^T, S_W = sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T.
    Larger is better separated. Uses the centroids kernel for the class means."""
    from .functional import centroids

    fn = "fisher_ratio"
    zs = [zs] if torch.is_tensor(zs) else list(zs)
    for i, z in enumerate(zs):
        _check_2d(fn, f"zs[{i}]", z)
    labels = torch.as_tensor(labels, device=zs[0].device)
    if labels.dim() != 1 or labels.shape[0] != zs[0].shape[0]:
        raise ValueError(f"{fn}: labels must have shape ({zs[0].shape[0]},), got {tuple(labels.shape)}")
    if labels.is_floating_point():
        raise ValueError(f"{fn}: labels must be integers, got {labels.dtype}")
    _, y = torch.unique(labels, return_inverse=True)
    x = torch.cat([z.double() for z in zs])
    y = y.repeat(len(zs))
    num = int(y.max()) + 1
    mu_c, counts = centroids(x, y, num, return_counts=True)
    mu = x.mean(0)
    sb = (counts.double() * ((mu_c - mu) ** 2).sum(1)).sum()
    sw = ((x - mu_c[y]) ** 2).sum()
    return sb / sw


@dataclass
class ExplainedVariance:
    """ratio[k]: variance fraction of principal component k; cumulative: running sum;
    components: {0.9: n90, 0.95: n95, 0.99: n99} components needed for that fraction."""

    ratio: torch.Tensor
    cumulative: torch.Tensor
    components: dict

    def n_components(self, fraction: float) -> int:
        return int(torch.searchsorted(self.cumulative, torch.tensor(fraction, dtype=self.cumulative.dtype)).item()) + 1


def explained_variance(x, fractions=(0.9, 0.95, 0.99)) -> ExplainedVariance:
    """PCA spectrum of (pooled) embeddings: x is (N, D) or a sequence of (N_m, D) tensors."""
    fn = "explained_variance"
    xs = [x] if torch.is_tensor(x) else list(x)
    x = torch.cat([_check_2d(fn, "x", t).double() for t in xs])
    if x.shape[0] < 2:
        raise ValueError(f"{fn}: need at least 2 rows, got {x.shape[0]}")
    xc = x - x.mean(0)
    eig = torch.linalg.eigvalsh(xc.T @ xc / (x.shape[0] - 1)).flip(0).clamp(min=0)
    total = eig.sum()
    ratio = eig / total if total > 0 else torch.zeros_like(eig)
    cum = ratio.cumsum(0)
    ev = ExplainedVariance(ratio, cum, {})
    ev.components = {f: min(ev.n_components(f), x.shape[1]) for f in fractions}
    return ev


def compression_ratio(num_modalities: int, dim: int, keep: int | None = None, in_bytes: int = 4, out_bytes: int | None = None) -> float:
    """Original bytes / compressed bytes: M embeddings of D values of in_bytes each ->
    one centroid of `keep` values of out_bytes each (defaults: keep = D, out_bytes = in_bytes)."""
    keep = dim if keep is None else keep
    out_bytes = in_bytes if out_bytes is None else out_bytes
    for name, v in (("num_modalities", num_modalities), ("dim", dim), ("keep", keep), ("in_bytes", in_bytes), ("out_bytes", out_bytes)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"compression_ratio: {name} must be an int >= 1, got {v!r}")
    if keep > dim:
        raise ValueError(f"compression_ratio: keep ({keep}) cannot exceed dim ({dim})")
    return (num_modalities * dim * in_bytes) / (keep * out_bytes)
