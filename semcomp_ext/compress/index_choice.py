"""Which faiss index `semcomp index` builds when no --index-factory is given.

As autofaiss does: the storage from the number of vectors and a memory budget, the number of
IVF lists from the number of vectors and a time budget (training on a sample; nprobe is then
chosen on the built index to meet a recall target, see `index`).
- N < 10 000 (autofaiss's quantization threshold) or K <= 4: "Flat" (exact, nothing to train).
- Otherwise "IVF{c},{storage}". storage: the first of Flat (4K bytes a vector), SQfp16 (2K),
  SQ8 (K), PQ{m}x8 whose index fits `max_memory` (8 GiB); SQfp16 first when the folder stores
  float16 (lossless there). c: the largest power of two <= autofaiss's 4·sqrt(N) (at most N/39,
  faiss's minimum of training points per list) whose estimated build time fits the time budget
  (default 10 s + N·K / 1e7 s: 18 s for 200k x 384, 87 s for 1M x 768), at least 16.
  Estimate: k-means (10 iterations over 64·c sampled rows) + assigning every row + the nprobe
  ground truth, as float operations at 30 GFLOP/s per faiss thread, plus 4 ns per stored value
  read. A flat coarse quantizer below 16384 lists (its assignment is one sgemm), HNSW32 above.
  Where even 16 lists exceed the budget, 16 lists.

The estimate assumes faiss's k-means and assignment run at ~30 GFLOP/s a thread (measured
35-45 on the 2-core VM of docs/compress.md), so the choice depends on the thread count:
pass `threads` for a reproducible choice.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .heartbeat import usable_cores

__all__ = ["IndexChoice", "choose_index", "default_index_factory", "default_time_budget", "estimate_seconds",
           "nb_clusters", "storage_for", "check_positive_int", "check_seconds"]

FLAT_MAX = 10_000                                    # autofaiss quantization_threshold
PQ_VALUES = (256, 128, 64, 48, 32, 24, 16, 8, 4)     # autofaiss pq_values
TRAIN_PER_LIST = 64                                  # k-means sample: rows per IVF list
MIN_PER_LIST = 39                                    # faiss's minimum training points per centroid
MIN_LISTS = 16
HNSW_LISTS = 16_384                                  # from here the coarse quantizer is HNSW32
KMEANS_ITERS = 10                                    # faiss's IVF clustering default
FLOPS_PER_THREAD = 30e9                              # faiss sgemm k-means / assignment
VALUE_SECONDS = 4e-9                                 # reading + decoding one stored value
DEFAULT_MAX_MEMORY = 8 << 30
TRAIN_MAX = 65_536                                   # training rows of a non-IVF index that needs training
TUNE_QUERIES, TUNE_K, TUNE_RECALL = 256, 10, 0.95    # nprobe tuning: sample queries, k, recall target


def check_positive_int(name: str, value, allow_zero: bool = False) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                              or value < (0 if allow_zero else 1)):
        raise ValueError(f"{name} must be an int >= {0 if allow_zero else 1}, got {value!r}")


def check_seconds(value, name: str = "time_budget_s") -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
                              or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")


def nb_clusters(n: int) -> int:
    """autofaiss get_optimal_nb_clusters (first choice): the upper bound of the list count."""
    if n < 1_000_000:
        return int(2 ** round(math.log2(4 * math.sqrt(n))))
    return 16_384 if n < 10_000_000 else 65_536


def default_time_budget(n: int, dim: int) -> float:
    """Seconds allowed for building an index of n x dim without --time-budget: 10 s + n·dim / 1e7."""
    return 10.0 + n * dim / 1e7


@dataclass(frozen=True)
class IndexChoice:
    """What `choose_index` picked and why (recorded in index.json)."""

    factory: str
    nlist: int | None              # IVF lists, None for Flat
    storage: str                   # Flat | SQfp16 | SQ8 | PQ{m}x8
    bytes_per_vector: int
    train_rows: int
    estimated_seconds: float
    time_budget_s: float
    max_memory: int
    threads: int

    def to_dict(self) -> dict:
        return asdict(self)


def storage_for(n: int, dim: int, dtype: str, max_memory: int) -> tuple[str, int]:
    """The first storage (most exact first) whose index of n vectors fits max_memory bytes."""
    options = [("Flat", 4 * dim), ("SQfp16", 2 * dim), ("SQ8", dim)]
    if dtype == "float16":  # the stored values are fp16: SQfp16 holds them exactly
        options = options[1:]
    options += [(f"PQ{m}x8", m) for m in PQ_VALUES if m < dim and dim % m == 0]
    for name, nbytes in options:
        if n * nbytes <= max_memory:
            return name, nbytes
    return options[-1]  # nothing fits: the smallest


def estimate_seconds(n: int, dim: int, nlist: int, storage: str, threads: int) -> float:
    """Estimated build time of IVF{nlist},{storage} (the cost model in the module doc)."""
    train = min(n, TRAIN_PER_LIST * nlist)
    flop = 2.0 * dim * (KMEANS_ITERS * train * nlist + n * nlist + TUNE_QUERIES * n)
    if storage.startswith("PQ"):  # 256-centroid k-means per sub-space on <= 65536 rows, then encoding
        flop += 2.0 * dim * 256 * (KMEANS_ITERS * min(n, TRAIN_MAX) + n)
    return flop / (FLOPS_PER_THREAD * threads) + n * dim * VALUE_SECONDS


def choose_index(n: int, dim: int, *, dtype: str = "float32", time_budget_s: float | None = None,
                 max_memory: int | None = None, threads: int | None = None) -> IndexChoice:
    """The faiss factory for n vectors of dim dims stored as `dtype` (rule in the module doc)."""
    check_positive_int("n", n, allow_zero=True)
    check_positive_int("dim", dim)
    check_positive_int("max_memory", max_memory)
    check_positive_int("threads", threads)
    check_seconds(time_budget_s)
    budget = float(time_budget_s) if time_budget_s is not None else default_time_budget(n, dim)
    mem = DEFAULT_MAX_MEMORY if max_memory is None else int(max_memory)
    threads = usable_cores() if threads is None else int(threads)
    if n < FLAT_MAX or dim <= 4:
        return IndexChoice("Flat", None, "Flat", 4 * dim, 0, round(n * dim * VALUE_SECONDS, 3), budget, mem, threads)
    storage, nbytes = storage_for(n, dim, dtype, mem)
    c = min(nb_clusters(n), 2 ** int(math.log2(n // MIN_PER_LIST)))
    while c > MIN_LISTS and estimate_seconds(n, dim, c, storage, threads) > budget:
        c //= 2
    key = f"IVF{c}{'_HNSW32' if c >= HNSW_LISTS else ''},{storage}"
    return IndexChoice(key, c, storage, nbytes, min(n, TRAIN_PER_LIST * c),
                       round(estimate_seconds(n, dim, c, storage, threads), 3), budget, mem, threads)


def default_index_factory(n: int, dim: int, **kwargs) -> str:
    """The faiss factory string `semcomp index` uses for n vectors of dim dims (`choose_index`)."""
    return choose_index(n, dim, **kwargs).factory
