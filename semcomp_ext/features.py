"""Random feature selection (RFS): a seeded, machine-independent choice of kept columns."""

from __future__ import annotations

import torch

__all__ = ["RandomFeatureSelector", "rfs_index"]

_MASK64 = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    """One step of SplitMix64: (new state, 64-bit output). Fully specified integer arithmetic,
    so the stream is identical on every machine and every library version."""
    state = (state + 0x9E3779B97F4A7C15) & _MASK64
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return state, z ^ (z >> 31)


def rfs_index(dim: int, keep: int, seed: int = 0) -> torch.Tensor:
    """Sorted int64 tensor of `keep` distinct column ids drawn uniformly from range(dim).

    Algorithm (a contract: the same (dim, keep, seed) gives the same index everywhere): a
    partial Fisher-Yates shuffle of range(dim) driven by SplitMix64 seeded with `seed`; step t
    swaps position t with t + (u mod (dim - t)) for the next output u; the first `keep`
    positions, sorted, are the index. (The modulo bias is below 2^-40 for dim < 2^24.)
    """
    if not 0 < keep <= dim:
        raise ValueError(f"rfs_index: keep must be in [1, dim={dim}], got {keep}")
    perm = list(range(dim))
    state = seed & _MASK64
    for t in range(keep):
        state, u = _splitmix64(state)
        j = t + u % (dim - t)
        perm[t], perm[j] = perm[j], perm[t]
    return torch.tensor(sorted(perm[:keep]), dtype=torch.int64)


class RandomFeatureSelector:
    """Keep a random, seeded subset of the D coordinates of embeddings.

    Give exactly one of drop_rate (fraction of the D features dropped, in [0, 1)) or keep
    (number kept, 1..dim). keep = max(1, round(dim * (1 - drop_rate))).

        sel = RandomFeatureSelector(512, drop_rate=0.95, seed=0)   # keeps 26 columns
        small = sel(x)                                              # x[:, sel.index]
    """

    def __init__(self, dim: int, *, drop_rate: float | None = None, keep: int | None = None, seed: int = 0):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"RandomFeatureSelector: dim must be an int >= 1, got {dim!r}")
        if (drop_rate is None) == (keep is None):
            raise ValueError("RandomFeatureSelector: give exactly one of drop_rate or keep")
        if drop_rate is not None:
            if not (isinstance(drop_rate, (int, float)) and 0 <= drop_rate < 1):
                raise ValueError(f"RandomFeatureSelector: drop_rate must be in [0, 1), got {drop_rate!r}")
            keep = max(1, int(round(dim * (1 - drop_rate))))
        if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= dim:
            raise ValueError(f"RandomFeatureSelector: keep must be an int in [1, {dim}], got {keep!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"RandomFeatureSelector: seed must be an int, got {seed!r}")
        self.dim, self.keep, self.seed = dim, keep, seed
        self.index = rfs_index(dim, keep, seed)

    @property
    def drop_rate(self) -> float:
        return 1.0 - self.keep / self.dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from .functional import select_features

        if torch.is_tensor(x) and x.dim() == 2 and x.shape[1] != self.dim:
            raise ValueError(f"RandomFeatureSelector: x has {x.shape[1]} features, the selector was made for dim={self.dim}")
        return select_features(x, self.index)

    def to_dict(self) -> dict:
        """JSON-ready description (saved next to compressed output)."""
        return {"dim": self.dim, "keep": self.keep, "seed": self.seed, "index": self.index.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "RandomFeatureSelector":
        sel = cls(int(d["dim"]), keep=int(d["keep"]), seed=int(d["seed"]))
        if "index" in d and sel.index.tolist() != list(d["index"]):
            raise ValueError("RandomFeatureSelector.from_dict: stored index does not match (dim, keep, seed)")
        return sel

    def __repr__(self) -> str:
        return f"RandomFeatureSelector(dim={self.dim}, keep={self.keep}, drop_rate={self.drop_rate:.3g}, seed={self.seed})"
