"""Intervals that combine the three sources of noise in a reproduction: training seeds, RFS
seeds and the sampling of test items.

Every accuracy in a reproduction is a mean of per-item scores x[s, r, i] (1 if test item i is
classified correctly by the model trained with seed s, stored with RFS seed r; r has one value
for forms without RFS). The interval of the grand mean is a crossed, hierarchical percentile
bootstrap: each replicate draws training seeds, RFS seeds and test items with replacement, each
level independently, the SAME test items for every seed (they share one test split) and the same
draws for every quantity compared within a replicate (so differences are paired). A replicate's
statistic is computed from item weights (multinomial counts), never by copying the data:

    stat_b = Σ_s Σ_r Σ_i  ws[b, s] · wr[b, r] · wi[b, i] · x[s, r, i]  /  (S · R · N)

Resampling the seeds and the items at once counts item noise within seeds again at the seed
level, so the interval is slightly conservative (wider than the exact one); with few seeds
(S < 5) the percentile interval is too narrow by about sqrt((S-1)/S) — the report says how many
seeds each interval rests on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Resampler", "summary", "mean_interval", "spearman"]


@dataclass
class Resampler:
    """Fixed bootstrap draws for one dataset: B replicates over S seeds, R RFS seeds, N items.
    Use one Resampler for every statistic of a dataset so that comparisons are paired."""

    n_seeds: int
    n_rfs: int
    n_items: int
    reps: int = 2000
    seed: int = 0

    def __post_init__(self):
        for name in ("n_seeds", "n_rfs", "n_items", "reps"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"Resampler: {name} must be a positive integer, got {v!r}")
        rng = np.random.default_rng(self.seed)
        B = self.reps
        self.w_seed = rng.multinomial(self.n_seeds, [1 / self.n_seeds] * self.n_seeds, size=B).astype(np.float64)
        self.w_rfs = rng.multinomial(self.n_rfs, [1 / self.n_rfs] * self.n_rfs, size=B).astype(np.float64)
        self.w_item = rng.multinomial(self.n_items, [1 / self.n_items] * self.n_items, size=B).astype(np.float64)

    def item_means(self, x) -> np.ndarray:
        """x (S, R', N) -> (B, S, R') item-resampled means of each (seed, rfs seed) cell."""
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 3 or x.shape[0] != self.n_seeds or x.shape[2] != self.n_items:
            raise ValueError(f"Resampler: x must have shape ({self.n_seeds}, R, {self.n_items}), got {x.shape}")
        s, r, n = x.shape
        return (x.reshape(s * r, n) @ self.w_item.T / n).T.reshape(-1, s, r)

    def combine(self, m) -> np.ndarray:
        """(B, S, R') per-cell replicate statistics -> (B,) replicate grand means, seeds drawn
        by w_seed and (when R' = n_rfs > 1) RFS seeds by w_rfs."""
        m = np.asarray(m, dtype=np.float64)
        ws = self.w_seed / self.n_seeds
        if m.shape[2] == 1:
            return np.einsum("bs,bs->b", ws, m[:, :, 0])
        r = m.shape[2]
        return np.einsum("bs,br,bsr->b", ws, self.rfs_weights(r) / r, m)

    def rfs_weights(self, r: int) -> np.ndarray:
        """(B, r) RFS-seed draws: w_rfs for the full set, else (a subset of the seeds, e.g. the
        codec rows) a fixed draw of its own."""
        if r == self.n_rfs:
            return self.w_rfs
        cache = self.__dict__.setdefault("_w_rfs_other", {})
        if r not in cache:
            rng = np.random.default_rng([self.seed, r])
            cache[r] = rng.multinomial(r, [1 / r] * r, size=self.reps).astype(np.float64)
        return cache[r]

    def replicates(self, x) -> np.ndarray:
        """(B,) bootstrap replicates of the grand mean of x (S, R', N)."""
        return self.combine(self.item_means(x))


def _pad(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x[:, None, :] if x.ndim == 2 else x


def summary(point: float, reps, *, level: float = 0.95, n_seeds: int, n_rfs: int = 1, n_items: int) -> dict:
    """{"mean", "lo", "hi", "level", "n_seeds", "n_rfs", "n_test"}: the point estimate and the
    percentile interval of the replicates at `level`."""
    if not 0 < level < 1:
        raise ValueError(f"summary: level must be in (0, 1), got {level}")
    reps = np.asarray(reps, dtype=np.float64)
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(point), "lo": float(lo), "hi": float(hi), "level": level, "n_seeds": int(n_seeds),
            "n_rfs": int(n_rfs), "n_test": int(n_items)}


def mean_interval(rs: Resampler, x, level: float = 0.95) -> dict:
    """Point estimate (plain mean) and interval of per-item scores x: (S, N) or (S, R, N)."""
    x = _pad(x)
    return summary(float(x.mean()), rs.replicates(x), level=level, n_seeds=x.shape[0], n_rfs=x.shape[1], n_items=x.shape[2])


def spearman(xs, ys) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is constant."""
    def ranks(v):
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for u in np.unique(v):  # average ranks over ties
            m = v == u
            r[m] = r[m].mean()
        return r

    if len(xs) < 2:
        return 0.0
    rx, ry = ranks(xs), ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / den) if den > 0 else 0.0
