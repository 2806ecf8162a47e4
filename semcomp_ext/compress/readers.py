"""Shard readers: one entry point over the formats (npy.py, parquet.py) for the pipeline, with
the input discovery (discovery.py) and the shard records (shard.py) re-exported.

Rows are read in fixed-size blocks, the same row ranges for every modality whatever the format
(parquet batches that stop short at row-group boundaries are re-blocked).
"""

from __future__ import annotations

import numpy as np

from .npy import iter_npy, open_npy, read_header  # noqa: F401 - re-exported
from .parquet import iter_parquet, open_parquet, parquet_source  # noqa: F401 - re-exported
from .shard import DEFAULT_BATCH_ROWS, InlineExecutor, Modality, Shard, require_pyarrow  # noqa: F401 - re-exported


def iter_chunks(shard: Shard, batch: int):
    """Yield consecutive row blocks of exactly `batch` rows (the last may be shorter)."""
    if shard.kind == "npy":
        yield from iter_npy(shard, batch)
        return
    gen = iter_parquet(shard, batch)
    # parquet batches can stop short at row-group boundaries: re-block so every modality
    # yields the same row ranges.
    pending, have = [], 0
    for a in gen:
        pending.append(a)
        have += a.shape[0]
        while have >= batch:
            cat = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield cat[:batch]
            pending, have = ([cat[batch:]] if cat.shape[0] > batch else []), cat.shape[0] - batch
    if have:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


from .discovery import (EMB_EXTS, LAYOUTS, LayoutError, concept_dtype, discover, list_shards,  # noqa: E402,F401
                        natural_key, open_concepts, open_shard, validate)
