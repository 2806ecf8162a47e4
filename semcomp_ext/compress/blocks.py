"""The per-block maths of the compressor, as public functions of tensors and arrays: the
finite-row checks, the centroid + RFS of one block (the normalising path; the plain mean is the
fused `pair_mean` op), the per-concept partial sums, and the exact int64 keys of concept ids.
The CPU pipeline, the CUDA backend and `compress_arrays` all call these, so they agree."""

from __future__ import annotations

import numpy as np
import torch

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


def check_finite(zs, paths, start: int, skip: bool) -> torch.Tensor | None:
    """Boolean keep-mask of rows whose values are all finite in every modality, or None when
    all are. A row sum is non-finite iff the row has a NaN/Inf (or overflows: rechecked)."""
    bad = None
    for z, path in zip(zs, paths):
        s = z.sum(1, dtype=torch.float32)
        fin = torch.isfinite(s)
        if bool(fin.all()):
            continue
        rows = (~fin).nonzero().flatten()
        rows = rows[~torch.isfinite(z[rows].float()).all(1)]
        if rows.numel() == 0:
            continue
        if not skip:
            raise nonfinite_error(path, start + int(rows[0]), rows.numel())
        if bad is None:
            bad = torch.zeros(z.shape[0], dtype=torch.bool)
        bad[rows] = True
    return None if bad is None else ~bad


def promoted_dtype(dtypes) -> str:
    """The one dtype that input embeddings of several floating dtypes are promoted to, by the
    loss API's rule (`semcomp_ext.validation.promote`: float16 + float32 -> float32, anything +
    float64 -> float64), never an autocast dtype. One dtype is returned unchanged."""
    from ..validation import promote

    names = sorted({np.dtype(d).name for d in dtypes})
    if len(names) == 1:
        return names[0]
    with torch.autocast("cpu", enabled=False):
        return str(promote("compress", [torch.empty(0, dtype=getattr(torch, n)) for n in names])[0].dtype).split(".")[-1]


def as_tensor(a: np.ndarray, in_dtype: str | None = None) -> torch.Tensor:
    """A block as a tensor in its compute dtype: float64 inputs are computed in float32 (fp32
    accumulation, as for fp16/fp32); a block whose dtype is not the plan's (promoted) input
    dtype `in_dtype` is cast to float32 (float16 -> float32 is exact: the same values as inputs
    given in float32)."""
    if a.dtype == np.float64 or (in_dtype is not None and a.dtype.name != in_dtype):
        return torch.from_numpy(a.astype(np.float32))
    return torch.from_numpy(a if a.flags.writeable else a.copy())


def finite_rows(finite: torch.Tensor, zs, paths, start: int, skip: bool) -> torch.Tensor | None:
    """check_finite's result from the per-row flags of pair_mean: the keep-mask, or None when
    every row is finite; the same error names the first modality with a bad value."""
    if bool(finite.all()):
        return None
    if not skip:
        row = int((~finite).nonzero()[0])
        path = next(p for z, p in zip(zs, paths) if not bool(torch.isfinite(z[row]).all()))
        raise nonfinite_error(path, start + row, int((~finite).sum()))
    return finite


def nonfinite_error(path: str, row: int, count: int) -> ValueError:
    """The error of a NaN/Inf row when --skip-invalid is not given (one wording for every path)."""
    return ValueError(f"non-finite values (NaN/Inf) in {path} at row {row} ({count} such rows in this block); "
                      "rerun with --skip-invalid --resume to drop them (keeping the shards already written)")


def pair_block(zs, index, keep_all: bool, normalize: str) -> torch.Tensor:
    """Centroid of M row-aligned blocks with normalisation, RFS fused into the read: each
    modality is gathered to the kept columns first (select_features), so the mean touches K,
    not D, columns. (Without normalisation, the pipeline uses the fused pair_mean op.)"""
    from .. import pair_centroids, select_features

    parts = []
    for z in zs:
        g = z if keep_all else select_features(z, index)
        g = g.float()
        if normalize in ("input", "both"):
            # normalise by the norm of the full D-dim embedding, not of the kept columns
            g = g / torch.linalg.vector_norm(z.float(), dim=1, keepdim=True).clamp_min(1e-12)
        parts.append(g)
    return pair_centroids(parts, normalize="output" if normalize in ("output", "both") else False)


_SIGN = np.uint64(1 << 63)


def encode_ids(a: np.ndarray) -> np.ndarray:
    """Concept ids of any integer dtype -> int64 keys, exactly and order-preserving: uint64 ids
    have their top bit flipped (a bijection onto int64), every other dtype is widened."""
    if a.dtype.kind == "u" and a.dtype.itemsize == 8:
        return (a.astype(np.uint64) ^ _SIGN).view(np.int64)
    return a.astype(np.int64)


def decode_ids(keys: np.ndarray, dtype) -> np.ndarray:
    """Inverse of encode_ids: the keys back in the input's id dtype."""
    dtype = np.dtype(dtype)
    if dtype.kind == "u" and dtype.itemsize == 8:
        return (keys.view(np.uint64) ^ _SIGN).astype(dtype)
    return keys.astype(dtype)


def partition_of(ids: np.ndarray, parts: int) -> np.ndarray:
    """Multiplicative hash of int64 ids -> partition; spreads consecutive ids evenly."""
    h = (ids.astype(np.uint64) * _HASH_MUL) >> np.uint64(32)
    return (h % np.uint64(parts)).astype(np.int64)


def segment_sums(x: torch.Tensor, ids: torch.Tensor, features=None, normalize=False):
    """(unique ids, per-id sums, counts) of the rows of x, through the centroids kernel
    (sorted unique ids -> contiguous groups; sum = mean * count)."""
    from .. import centroids

    uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
    means, counts = centroids(x, inv, int(uniq.numel()), return_counts=True, features=features, normalize=normalize)
    return uniq, means.float() * counts.unsqueeze(1).float(), counts.to(torch.int64)
