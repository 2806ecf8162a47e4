"""Parquet shards (embedding-reader style: an `embedding` list column, or integer concept ids):
the footer and schema checked before any work starts, rows streamed in record batches. An
empty part (0 rows, as Spark writes them) has no dimension of its own: the other shards give it."""

from __future__ import annotations

import numpy as np

from . import fsio
from .shard import Shard, require_pyarrow

def open_parquet(path: str, column: str, want_2d: bool = True) -> Shard:
    pq = require_pyarrow("reading parquet shards")
    import pyarrow as pa

    try:
        size, mtime_ns = fsio.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing shard: {path}") from None
    with parquet_source(path, block_size=fsio.HEAD_BLOCK) as src:  # the footer and schema only
        return _read_footer(path, src, column, want_2d, size, mtime_ns)


def parquet_source(path: str, block_size: int | None = None):
    """What pyarrow opens: the local path itself, or an fsspec file for a URL."""
    from contextlib import nullcontext

    return fsio.open(path, "rb", block_size=block_size) if fsio.is_url(path) else nullcontext(path)


def _read_footer(path, src, column, want_2d, size, mtime_ns) -> Shard:
    pq = require_pyarrow("reading parquet shards")
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(src)
        schema = pf.schema_arrow
    except Exception as exc:
        raise ValueError(f"truncated or corrupt parquet {path}: {exc}") from exc
    if column not in schema.names:
        raise ValueError(f"{path}: no column {column!r} (columns: {schema.names})")
    typ = schema.field(column).type
    rows = pf.metadata.num_rows
    dim, dtype = 0, ""
    if want_2d:
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
            raise ValueError(f"{path}: column {column!r} must be a list of floats, got {typ}")
        vt = typ.value_type
        dtype = {pa.float32(): "float32", pa.float16(): "float16", pa.float64(): "float64"}.get(vt)
        if dtype is None:
            raise ValueError(f"{path}: column {column!r} must hold float32, float16 or float64, got {vt}")
        if pa.types.is_fixed_size_list(typ):
            dim = typ.list_size
        elif rows:
            try:
                first = next(pf.iter_batches(batch_size=1, columns=[column]))
            except Exception as exc:
                raise ValueError(f"truncated or corrupt parquet {path}: {exc}") from exc
            dim = len(first.column(0)[0])
    elif not pa.types.is_integer(typ):
        raise ValueError(f"{path}: concept column {column!r} must be integers, got {typ}")
    else:
        dtype = np.dtype(typ.to_pandas_dtype()).str
    return Shard(path, "parquet", rows, dim, dtype, column=column, size=size, mtime_ns=mtime_ns)


def iter_parquet(shard: Shard, batch: int):
    pq = require_pyarrow("reading parquet shards")
    import pyarrow.compute as pc

    try:
        with parquet_source(shard.path) as src:
            pf = pq.ParquetFile(src)
            for rb in pf.iter_batches(batch_size=batch, columns=[shard.column]):
                col = rb.column(0)
                if shard.dim == 0:
                    if col.null_count:
                        raise ValueError(f"{shard.path}: null concept id in column {shard.column!r}")
                    yield col.to_numpy()  # the column's own integer dtype (uint64 stays uint64)
                    continue
                if col.null_count:
                    raise ValueError(f"{shard.path}: null embedding in column {shard.column!r}")
                flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
                if flat.size != len(col) * shard.dim:
                    raise ValueError(f"{shard.path}: embeddings of differing lengths (expected dim {shard.dim})")
                yield flat.reshape(len(col), shard.dim)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"truncated or corrupt parquet {shard.path}: {exc}") from exc
