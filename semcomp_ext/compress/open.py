"""`open_compressed(path)`: read a `semcomp compress` output folder back.

The stored vectors (codes) are memory-mapped (`.npy` shards), decoded to float32 by the
folder's codec (`codecs.codec_from_manifest`) one shard or batch at a time, and streamed
shard by shard (`iter_shards`) or in blocks of a fixed row count (`iter_batches`);
`vectors()` / `ids()` / `metadata()` load the whole set.
pyarrow is imported only when metadata is read.

A URL (`s3://bucket/out`, any fsspec URL) is opened the same way: sizes are checked against
one listing when it is opened, and each shard is downloaded whole to a local cache folder
(deleted with the set) the first time it is read, then memory-mapped from there.

    cs = semcomp_ext.open_compressed("out")
    cs.K, cs.D, cs.rfs_index, cs.normalize, cs.codec.name, len(cs)
    for b in cs.iter_batches(65536):          # b.ids, b.vectors (n, K) float32, b.metadata
        ...
    q = cs.prepare_queries(full_dim_queries)  # the compression's normalisation + RFS, (Q, K)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from . import fsio
from . import manifest as _manifest
from .codecs import codec_from_manifest

__all__ = ["Batch", "CompressedFolderError", "CompressedSet", "open_compressed"]


class CompressedFolderError(ValueError):
    """A folder that cannot be read as finished `semcomp compress` output: the job did not
    finish, or a shard is missing, truncated or does not match the manifest."""


@dataclass
class Batch:
    """Consecutive rows of a compressed set."""

    start: int                # global row number of the first row
    ids: np.ndarray           # (n,) concept ids in their own dtype (concepts mode) or int64 row numbers (pairs)
    vectors: np.ndarray       # (n, K) float32 decoded vectors, or the stored codes (decode=False)
    metadata: object = None   # pyarrow.Table with the n rows' metadata, or None
    shard: int | None = None  # the output shard (iter_shards only)

    def __len__(self) -> int:
        return len(self.ids)


class CompressedSet:
    """A finished compressed folder. Use `open_compressed(path)` to get one."""

    def __init__(self, path: str, m: dict, codec):
        self.path = path
        self.manifest = m
        self.codec = codec
        p, rfs = m["parameters"], m["rfs"]
        self.mode = p["mode"]                       # "pairs" | "concepts"
        self.normalize = p["normalize"]             # "none" | "input" | "output" | "both"
        self.D, self.K, self.seed = int(rfs["dim"]), int(rfs["keep"]), int(rfs["seed"])
        self.rfs_index = np.asarray(rfs["index"], dtype=np.int64)
        # ids come back in the dtype they were given in (uint64 concept ids >= 2**63 stay exact)
        self.id_dtype = np.dtype(p.get("concept_dtype") or np.int64) if self.mode == "concepts" else np.dtype(np.int64)
        self.shards = sorted(m["shards"], key=lambda s: s["index"])
        rows = np.array([s["rows"] for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(rows)])  # shard i = rows starts[i]:starts[i+1]
        self.has_metadata = bool(self.shards) and all("metadata" in s for s in self.shards)
        self.remote = fsio.is_url(path)
        self._sizes = fsio.sizes_under(path) if self.remote else None
        self._cache = None

    # ---- whole set -------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __repr__(self) -> str:
        return (f"CompressedSet({self.path!r}, rows={len(self)}, D={self.D}, K={self.K}, mode={self.mode}, "
                f"normalize={self.normalize}, codec={self.codec.name}, shards={len(self.shards)})")

    def vectors(self, decode: bool = True) -> np.ndarray:
        """All rows: (N, K) float32, or the stored codes (decode=False: a single shard's
        codes are returned as the read-only memory map itself); in memory otherwise."""
        parts = [self.shard_vectors(i, decode) for i in range(len(self.shards))]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.zeros((0, self.K), np.float32)

    def ids(self) -> np.ndarray:
        """(N,) id of every row: the concept id (concepts mode, in the ids' own integer dtype:
        `id_dtype`) or the int64 output row number (pairs mode; it equals the input row number
        unless --skip-invalid dropped rows)."""
        return np.concatenate([self.shard_ids(i) for i in range(len(self.shards))]).astype(self.id_dtype, copy=False) \
            if self.shards else np.zeros(0, self.id_dtype)

    def metadata(self):
        """pyarrow.Table of every row's metadata (pairs mode with metadata), else None."""
        if not self.has_metadata:
            return None
        import pyarrow as pa

        return pa.concat_tables([self.shard_metadata(i) for i in range(len(self.shards))])

    # ---- one shard -------------------------------------------------------------------------

    def _check_size(self, rec: dict) -> None:
        """The file the manifest records exists with the recorded size."""
        if self.remote:
            size = self._sizes.get(rec["file"])
        else:
            escape = _manifest.local_escape(self.path, rec["file"])
            if escape:
                raise CompressedFolderError(f"unsafe shard in {self.path}: {escape}")
            path = os.path.join(self.path, rec["file"])
            size = os.path.getsize(path) if os.path.exists(path) else None
        if size is None:
            raise CompressedFolderError(f"missing shard {rec['file']} in {self.path}")
        if size != rec["bytes"]:
            raise CompressedFolderError(f"corrupt shard {rec['file']}: {size} bytes, the manifest "
                                        f"says {rec['bytes']} (truncated or overwritten; `semcomp verify` checks every file)")

    def _file(self, rec: dict) -> str:
        """Local path of a file the manifest records, after checking it exists with the recorded
        size (a URL's file is downloaded to the cache folder first)."""
        self._check_size(rec)
        if not self.remote:
            return os.path.join(self.path, rec["file"])
        if self._cache is None:
            import shutil
            import tempfile
            import weakref

            self._cache = tempfile.mkdtemp(prefix="semcomp-open-")
            weakref.finalize(self, shutil.rmtree, self._cache, True)
        local = os.path.join(self._cache, rec["file"])
        if not os.path.exists(local):
            from .atomic import atomic_file

            with fsio.open(fsio.join(self.path, rec["file"]), "rb") as fin, atomic_file(local) as f:
                while chunk := fin.read(1 << 24):
                    f.write(chunk)
            if os.path.getsize(local) != rec["bytes"]:
                raise CompressedFolderError(f"corrupt shard {rec['file']}: changed while it was read")
        return local

    def _mmap(self, rec: dict) -> np.ndarray:
        """Memory-map a recorded .npy file read-only."""
        path = self._file(rec)
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:  # numpy raises ValueError/EOFError/OSError on a damaged header
            raise CompressedFolderError(f"corrupt shard {rec['file']}: {exc}") from exc

    def codes(self, i: int) -> np.ndarray:
        """The stored codes of shard i, memory-mapped read-only (shape checked)."""
        sh = self.shards[i]
        a = self._mmap(sh["centroids"])
        shape = self.codec.code_shape(sh["rows"], self.K)
        if a.shape != shape or a.dtype.name != self.codec.code_dtype:
            raise CompressedFolderError(f"corrupt shard {sh['centroids']['file']}: {a.dtype} {a.shape}, codec "
                                        f"{self.codec.name!r} of the manifest stores {self.codec.code_dtype} {shape}")
        return a

    def shard_vectors(self, i: int, decode: bool = True) -> np.ndarray:
        return self._decode(self.codes(i)) if decode else self.codes(i)

    def shard_ids(self, i: int) -> np.ndarray:
        sh = self.shards[i]
        if "concepts" in sh:
            ids = self._mmap(sh["concepts"])
            if ids.shape != (sh["rows"],):
                raise CompressedFolderError(f"corrupt shard {sh['concepts']['file']}: shape {ids.shape}, "
                                            f"the manifest says ({sh['rows']},)")
            return ids
        return np.arange(self.starts[i], self.starts[i + 1], dtype=np.int64)

    def shard_metadata(self, i: int):
        sh = self.shards[i]
        if "metadata" not in sh:
            return None
        from .readers import require_pyarrow

        pq = require_pyarrow("reading metadata")
        path = self._file(sh["metadata"])
        try:
            table = pq.read_table(path, memory_map=True)
        except Exception as exc:
            raise CompressedFolderError(f"corrupt shard {sh['metadata']['file']}: {exc}") from exc
        if table.num_rows != sh["rows"]:
            raise CompressedFolderError(f"corrupt shard {sh['metadata']['file']}: {table.num_rows} rows, "
                                        f"the manifest says {sh['rows']}")
        return table

    def _decode(self, codes) -> np.ndarray:
        v = self.codec.decode(codes)
        if v.ndim != 2 or v.shape[1] != self.K or v.dtype != np.float32:
            raise CompressedFolderError(f"codec {self.codec.name!r} decoded {v.shape} {v.dtype}, expected (n, {self.K}) float32")
        return v

    # ---- streaming -------------------------------------------------------------------------

    def iter_shards(self, decode: bool = True, metadata: bool = True):
        """Yield one Batch per output shard (memory: one shard)."""
        for i in range(len(self.shards)):
            yield Batch(int(self.starts[i]), self.shard_ids(i), self.shard_vectors(i, decode),
                        self.shard_metadata(i) if metadata else None, shard=i)

    def iter_batches(self, rows: int, decode: bool = True, metadata: bool = True):
        """Yield Batches of exactly `rows` consecutive rows (the last may be shorter), across
        shard boundaries; codes are decoded one batch at a time."""
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"iter_batches: rows must be an int >= 1, got {rows!r}")
        pending, have, start = [], 0, 0
        for i in range(len(self.shards)):
            n = int(self.starts[i + 1] - self.starts[i])
            if n == 0:
                continue
            piece = (self.shard_ids(i), self.codes(i), self.shard_metadata(i) if metadata else None)
            pos = 0
            while pos < n:
                take = min(rows - have, n - pos)
                pending.append(tuple(x[pos:pos + take] if x is not None else None for x in piece))
                have, pos = have + take, pos + take
                if have == rows:
                    yield self._batch(start, pending, decode)
                    pending, have, start = [], 0, start + rows
        if pending:
            yield self._batch(start, pending, decode)

    def _batch(self, start: int, pieces: list, decode: bool) -> Batch:
        ids, codes, meta = zip(*pieces)
        cat = (lambda xs: xs[0]) if len(pieces) == 1 else np.concatenate
        codes = cat(codes)
        table = None
        if meta[0] is not None:
            import pyarrow as pa

            table = meta[0] if len(meta) == 1 else pa.concat_tables(meta)
        return Batch(start, np.asarray(cat(ids), dtype=self.id_dtype), self._decode(codes) if decode else codes, table)

    # ---- row lookup ------------------------------------------------------------------------

    def _locate(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            bad = rows[(rows < 0) | (rows >= len(self))][0]
            raise IndexError(f"rows: row {int(bad)} out of range for a set of {len(self)} rows")
        return np.searchsorted(self.starts, rows, side="right") - 1

    def ids_at(self, rows) -> np.ndarray:
        """Ids of the given global row numbers (any shape)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.mode != "concepts":
            self._locate(rows)
            return rows.copy()
        shard = self._locate(rows)
        out = np.empty(rows.shape, dtype=self.id_dtype)
        for i in np.unique(shard):
            sel = shard == i
            out[sel] = self.shard_ids(i)[rows[sel] - self.starts[i]]
        return out

    def metadata_at(self, rows):
        """pyarrow.Table of the metadata of the given global row numbers (one table row per
        number, in the order given; repeats allowed), or None without metadata: the same
        form as `metadata()`. Only the shards holding those rows are read."""
        if not self.has_metadata:
            return None
        import pyarrow as pa

        rows = np.asarray(rows, dtype=np.int64).ravel()
        shard = self._locate(rows)
        if len(rows) == 0:
            return self.shard_metadata(0).slice(0, 0)
        order = np.argsort(shard, kind="stable")  # rows grouped by shard, each group in the given order
        parts = [self.shard_metadata(int(i)).take(rows[order[shard[order] == i]] - self.starts[i])
                 for i in np.unique(shard)]
        grouped = pa.concat_tables(parts)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return grouped.take(inverse)

    # ---- queries ---------------------------------------------------------------------------

    def prepare_queries(self, queries) -> np.ndarray:
        """Apply the compression's normalisation and RFS to full-dimensional query embeddings
        (Q, D) or (D,): L2-normalise on all D dims (normalize input/both), keep the RFS
        columns, L2-normalise the K kept dims (output/both). Returns (Q, K) float32."""
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.D:
            raise ValueError(f"queries: expected full-dimensional embeddings of shape (Q, {self.D}) "
                             f"(D of {self.path}), got shape {np.asarray(queries).shape}")
        if not np.issubdtype(q.dtype, np.floating):
            raise ValueError(f"queries: expected a floating-point array, got dtype {q.dtype}")
        q = q.astype(np.float32)
        finite = np.isfinite(q).all(1)
        if not finite.all():
            raise ValueError(f"queries: non-finite values (NaN/Inf) in query row {int(np.nonzero(~finite)[0][0])}")
        if self.normalize in ("input", "both"):
            q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        q = q[:, self.rfs_index]
        if self.normalize in ("output", "both"):
            q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(q)


def open_compressed(path, *, verify: bool = False, storage_options: dict | None = None) -> CompressedSet:
    """Open the output folder of `semcomp compress` (a path, or a URL: `s3://bucket/out`;
    `storage_options`: fsspec options for it, e.g. credentials and endpoint_url).

    Checks that the folder and its manifest exist, that the job finished (status complete)
    and that every shard file has the size the manifest records and a readable header of
    the recorded row count. `verify=True` also re-hashes every file (`semcomp verify`).
    Raises FileNotFoundError (no folder / no manifest) or CompressedFolderError (a
    ValueError: unfinished job, missing or corrupt shard)."""
    path = fsio.existing_folder(path, "open_compressed", storage_options)
    if not fsio.exists(_manifest.manifest_path(path)):
        raise FileNotFoundError(f"open_compressed: {path!r} has no {_manifest.MANIFEST}; "
                                "is it the output folder of `semcomp compress`?")
    try:
        m = _manifest.load(path)
    except _manifest.ManifestError as exc:
        raise CompressedFolderError(f"open_compressed: {exc}") from None
    if m.get("status") != "complete":
        try:  # the shards committed so far: the manifest's and the journal's
            done = len(_manifest.load_state(path).get("shards", []))
        except ValueError:
            done = len(m.get("shards", []))
        raise CompressedFolderError(f"open_compressed: the job writing {path!r} did not finish (status "
                                    f"{m.get('status')!r}, {done} of {m.get('num_shards')} shards written); "
                                    "finish it with `semcomp compress ... --resume`")
    if verify:
        problems = _manifest.verify(path)
        if problems:
            raise CompressedFolderError(f"open_compressed: {path!r} fails verification: " + "; ".join(problems))
    try:
        codec = codec_from_manifest(m, path)
    except (KeyError, ValueError) as exc:
        raise CompressedFolderError(f"open_compressed: {path!r}: unreadable codec entry in the manifest: {exc}") from exc
    cs = CompressedSet(path, m, codec)
    if cs.remote:  # sizes against the listing; headers are checked as each shard is read
        for sh in cs.shards:
            for key in ("centroids", "concepts", "metadata"):
                if key in sh:
                    cs._check_size(sh[key])
        return cs
    for i in range(len(cs.shards)):  # cheap checks: sizes and headers, no hashing
        cs.codes(i)
        cs.shard_ids(i)
        if "metadata" in cs.shards[i]:
            cs._file(cs.shards[i]["metadata"])
    return cs

