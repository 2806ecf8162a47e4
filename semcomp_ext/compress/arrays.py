"""`compress_arrays`: the compressor on in-memory arrays (the same blocks and arithmetic as the
files' pipeline, so the same codes), and the byte counts of a compression ratio."""

from __future__ import annotations

from dataclasses import dataclass

from .codecs import fit_codec, parse_codec
from .options import NORMALIZE, check_choice, check_int, check_rfs, check_storage
from .plan import default_out_dtype
from .readers import DEFAULT_BATCH_ROWS


@dataclass
class CompressedArrays:
    """What `compress_arrays` returns: the stored form of every kept row and how to read it."""

    codes: object         # np.ndarray (N', codec.code_width(K)) of codec.code_dtype: what `compress` writes
    index: object         # np.ndarray (K,) int64: the RFS columns kept (rfs_index(dim, K, seed))
    codec: object         # the (fitted) codecs.Codec: codec.decode(codes) -> float32 (N', K)
    rows: object          # np.ndarray (N',) int64: input row of each output row (all rows unless skip_invalid)
    dim: int
    in_dtype: str
    num_modalities: int

    def vectors(self):
        """The decoded centroids, float32 (N', K)."""
        return self.codec.decode(self.codes)

    @property
    def compression_ratio(self) -> float:
        """Bytes of the M input embeddings (their dtype) / stored bytes per item: one code plus
        the codebook shared by the rows (a fitted codec's)."""
        return compression_ratio_bytes(self.num_modalities, self.dim, self.in_dtype, self.codec, len(self.index),
                                       rows=len(self.rows))


def codebook_bytes(codec) -> int:
    """Bytes of a fitted codec's parameters (its codebook, stored in the manifest); 0 for the
    codecs that fit nothing (float32, float16, binary)."""
    if not getattr(codec, "needs_fit", False):
        return 0
    import json

    return len(json.dumps(codec.to_manifest()).encode())


def compression_ratio_bytes(num_modalities: int, dim: int, in_dtype: str, codec, keep: int,
                            rows: int | None = None) -> float:
    """Input bytes per item (M embeddings of D values in their real dtype) / stored bytes per
    item (the codec's code of the K kept features, plus, with `rows`, the codebook shared by
    that many items): 2 x 768 fp16 -> 384 fp16 is 4.0."""
    import numpy as np

    stored = codec.bytes_per_vector(keep) + (codebook_bytes(codec) / max(rows, 1) if rows is not None else 0)
    return num_modalities * dim * np.dtype(in_dtype).itemsize / stored


def compress_arrays(arrays, *, drop_rate: float | None = None, keep: int | None = None, seed: int = 0,
                    normalize: str = "none", out_dtype: str | None = None, codec: str | None = None,
                    codec_sample_rows: int = 65536, batch_size: int = DEFAULT_BATCH_ROWS,
                    skip_invalid: bool = False) -> CompressedArrays:
    """Pair centroids + RFS (+ storage codec) of in-memory arrays, exactly as `compress` does
    for files (same blocks, same arithmetic, same codec fit: the codes are the bytes
    `semcomp compress` would write for the same rows saved as .npy).

    arrays: M >= 2 row-aligned (N, D) arrays (a list, or a dict name -> array; numpy or CPU
    tensors), float16 / float32 / float64 (float64 is cast to float32). Arrays of different
    dtypes are promoted as the losses promote them (float16 + float32 -> float32; `in_dtype` is
    the promoted one). Other arguments as the CLI options of the same names; out_dtype defaults
    to the (promoted) input dtype (float32 for float64).
    """
    import numpy as np

    from .. import RandomFeatureSelector
    from .blocks import as_tensor, check_finite, pair_block, promoted_dtype

    if isinstance(arrays, dict):
        names, arrays = list(arrays), list(arrays.values())
    else:
        arrays = list(arrays)
        names = [f"arrays[{i}]" for i in range(len(arrays))]
    if len(arrays) < 2:
        raise ValueError(f"compress_arrays: need at least 2 modalities, got {len(arrays)}")
    xs = []
    for name, a in zip(names, arrays):
        if hasattr(a, "detach"):  # a torch tensor
            a = a.detach().cpu().numpy()
        a = np.asarray(a)
        if a.dtype not in (np.float16, np.float32, np.float64):
            raise TypeError(f"compress_arrays: {name} must be float16, float32 or float64, got {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"compress_arrays: {name} must be 2-D (rows, dim), got shape {a.shape}")
        if a.shape != np.shape(xs[0] if xs else a):
            raise ValueError(f"compress_arrays: {name} has shape {a.shape}, {names[0]} has {xs[0].shape}")
        xs.append(a)
    in_dtype = promoted_dtype(a.dtype for a in xs)  # mixed dtypes: the loss API's promotion, block by block
    n, dim = xs[0].shape
    check_choice("normalize", normalize, NORMALIZE)
    check_int("batch_size", batch_size, 1)
    check_int("codec_sample_rows", codec_sample_rows, 1)
    check_storage(codec, out_dtype)
    check_rfs(drop_rate, keep, dim)
    cdc = parse_codec(codec or out_dtype or default_out_dtype(in_dtype), seed=seed)
    sel = RandomFeatureSelector(dim, keep=keep, seed=seed) if keep is not None else \
        RandomFeatureSelector(dim, drop_rate=drop_rate or 0.0, seed=seed)
    import torch

    index = torch.as_tensor(sel.index, dtype=torch.int64)
    keep_all = sel.keep == dim
    blocks, rows = [], []
    for start in range(0, n, batch_size):
        zs = [as_tensor(np.ascontiguousarray(a[start:start + batch_size]), in_dtype) for a in xs]
        mask = check_finite(zs, names, start, skip_invalid)
        out = pair_block(zs, index, keep_all, normalize)
        r = np.arange(start, start + zs[0].shape[0])
        if mask is not None:
            out, r = out[mask], r[mask.numpy()]
        blocks.append(out.numpy().copy())
        rows.append(r)
    cent = np.concatenate(blocks) if blocks else np.zeros((0, sel.keep), np.float32)
    if cdc.needs_fit:  # as the job fits it: faiss on the usable cores, no lines (quiet)
        fit_codec(cdc, cent[:codec_sample_rows], quiet=True)
    else:
        cdc.dim = sel.keep
    codes = cdc.encode(cent)  # every codec encodes row by row: the same codes as block by block
    return CompressedArrays(codes, np.asarray(sel.index, dtype=np.int64), cdc,
                            np.concatenate(rows) if rows else np.zeros(0, np.int64), dim, in_dtype, len(xs))
