"""A seeded synthetic multimodal embedding set with a controllable modality gap.

Concepts belong to classes; each concept has a latent code (class prototype + concept
variation). Each modality m sees the latent code through its own slightly different linear map,
adds its own noise, and is shifted by a modality offset of norm `gap / 2` in opposite
directions (so the offset between modality means is `gap` before normalisation). Rows are
L2-normalised, as contrastive encoders' outputs are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MultimodalSet:
    zs: list  # M tensors (N, D), row-aligned: row i of every modality is concept i
    labels: torch.Tensor  # (N,) class of each concept
    train: torch.Tensor  # bool mask (N,): fixed train/test split


def make_multimodal(
    *,
    num_classes: int = 10,
    per_class: int = 300,
    dim: int = 256,
    latent: int = 24,
    modalities: int = 2,
    gap: float = 0.5,
    concept_spread: float = 1.2,
    noise: float = 1.0,
    train_fraction: float = 0.7,
    seed: int = 0,
) -> MultimodalSet:
    if modalities < 2:
        raise ValueError(f"make_multimodal: modalities must be >= 2, got {modalities}")
    if gap < 0:
        raise ValueError(f"make_multimodal: gap must be >= 0, got {gap}")
    g = torch.Generator().manual_seed(seed)
    n = num_classes * per_class
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    protos = torch.randn(num_classes, latent, generator=g)
    codes = protos[labels] + concept_spread * torch.randn(n, latent, generator=g)
    base = torch.linalg.qr(torch.randn(dim, latent, generator=g)).Q  # (dim, latent), orthonormal
    direction = F.normalize(torch.randn(dim, generator=g), dim=0)
    zs = []
    for m in range(modalities):
        proj = base + 0.15 * torch.randn(dim, latent, generator=g)
        sign = 1.0 if m % 2 == 0 else -1.0
        signal = codes @ proj.T / latent**0.5
        emb = signal + noise * torch.randn(n, dim, generator=g) / dim**0.5 * 2
        emb = F.normalize(emb, dim=1) + sign * (gap / 2) * direction
        zs.append(F.normalize(emb, dim=1))
    perm = torch.randperm(n, generator=g)
    train = torch.zeros(n, dtype=torch.bool)
    train[perm[: int(train_fraction * n)]] = True
    return MultimodalSet(zs, labels, train)
