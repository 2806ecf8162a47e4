"""`semcomp index` / `semcomp search`: nearest-neighbour search over a compressed folder.

`build_index(folder)` streams the decoded vectors of `open_compressed(folder)` into a faiss
index (inner product) and saves it in FOLDER/index/ atomically: `index.faiss` (faiss row
labels 0..N-1 = row numbers of the compressed set), `ids.npy` (row -> id), and last
`index.json` (factory, nprobe, sizes and sha256 of both files, sha256 of the manifest it was
built from), which marks a complete index. FOLDER may be a URL (`s3://bucket/out`, any fsspec
URL; `storage_options` as for `open_compressed`): each file of the index is then written to a
local temp file and uploaded whole (an object exists complete or not at all), index.json last.

`search(folder, queries, k)` takes full-dimensional query embeddings (Q, D), applies the
compression's normalisation and RFS (`CompressedSet.prepare_queries`) and searches the saved
index, or, when the folder has none (or exact=True), runs an exact streamed inner-product
search over the shards (numpy; faiss is not needed). On a URL the saved index is downloaded
(and checked against the sizes and sha256 of index.json); a URL folder without an index is an
error unless exact=True, since an exact search downloads every shard.

Index choice without --index-factory (`default_index_factory`), after autofaiss's
`get_optimal_index_keys_v2` / `get_optimal_quantization` without a memory budget:
N < 10 000 (autofaiss's quantization threshold: too few vectors to train PQ codebooks), or
K <= 4 -> "Flat" (exact); otherwise "RR{y},IVF{c},PQ{m}x8" with m the largest of
256, 128, 64, 48, 32, 24, 16, 8, 4 below K, y = (min(K // m, 6) + 1) * m, c = the power of two
nearest 4·sqrt(N) for N < 1M, 16384 below 10M, 65536 beyond (coarse quantizer IVF{c}_HNSW32
when c >= 1000). autofaiss's OPQ{m}_{y} rotation is replaced by a random rotation RR{y} (free
to train, inner products kept): OPQ training took minutes for 20 000 vectors on 2 CPU cores.
Training uses min(N, 100·c) rows sampled uniformly (min(N, 65536) for other trained
indexes); nprobe = max(1, c // 16) (and efSearch = 2·nprobe for an HNSW coarse quantizer)
unless --nprobe is given.
faiss is imported lazily (pip install faiss-cpu).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import atomic, fsio
from . import manifest as _manifest
from .open import CompressedSet, open_compressed

__all__ = ["SearchResult", "build_index", "default_index_factory", "default_nprobe", "search"]

INDEX_DIR = _manifest.INDEX_DIR
INDEX_FILE, IDS_FILE, INFO_FILE = "index.faiss", "ids.npy", "index.json"
FLAT_MAX = 10_000                                    # autofaiss quantization_threshold
PQ_VALUES = (256, 128, 64, 48, 32, 24, 16, 8, 4)     # autofaiss pq_values
POINTS_PER_CLUSTER = 100                             # autofaiss get_optimal_train_size
TRAIN_MAX = 65_536                                   # training rows of a non-IVF index that needs training
BATCH_ROWS = 65536
EXACT_BLOCK_SCORES = 1 << 24                         # exact search: at most ~16M scores per block


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("semcomp index/search with a faiss index need faiss: pip install faiss-cpu") from exc
    return faiss


def nb_clusters(n: int) -> int:
    """autofaiss get_optimal_nb_clusters (first choice)."""
    if n < 1_000_000:
        return int(2 ** round(math.log2(4 * math.sqrt(n))))
    return 16_384 if n < 10_000_000 else 65_536


def default_index_factory(n: int, dim: int) -> str:
    """The faiss factory string used for n vectors of dim dims (rule in the module doc)."""
    pq = next((m for m in PQ_VALUES if m < dim), None)
    if n < FLAT_MAX or pq is None:
        return "Flat"
    c = nb_clusters(n)
    y = (min(dim // pq, 6) + 1) * pq
    return f"RR{y},IVF{c}{'_HNSW32' if c >= 1000 else ''},PQ{pq}x8"


def default_nprobe(index) -> int | None:
    """max(1, nlist // 16) for an IVF index, None for others."""
    ivf = _ivf(index)
    return None if ivf is None else max(1, ivf.nlist // 16)


def _ivf(index):
    try:
        return _faiss().extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None


def _set_nprobe(index, nprobe: int) -> None:
    faiss = _faiss()
    ivf = _ivf(index)
    if ivf is None:
        return
    ps = faiss.ParameterSpace()
    ps.set_index_parameter(index, "nprobe", int(nprobe))
    if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
        ps.set_index_parameter(index, "quantizer_efSearch", 2 * int(nprobe))


def _index_dir(folder: str) -> str:
    return fsio.join(folder, INDEX_DIR)


def _check_positive(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _training_sample(cs: CompressedSet, size: int, seed: int) -> np.ndarray:
    """`size` rows drawn uniformly without replacement, streamed (memory: the sample)."""
    n = len(cs)
    if size >= n:
        return np.ascontiguousarray(cs.vectors(), dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out = []
    for b in cs.iter_batches(BATCH_ROWS, metadata=False):
        lo, hi = np.searchsorted(rows, [b.start, b.start + len(b)])
        if hi > lo:
            out.append(b.vectors[rows[lo:hi] - b.start])
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def build_index(folder, *, index_factory: str | None = None, nprobe: int | None = None, seed: int = 0,
                quiet: bool = True, storage_options: dict | None = None) -> dict:
    """Build and save FOLDER/index/ (see the module doc; FOLDER a path or a URL, with fsspec
    `storage_options`); returns the contents of index.json."""
    faiss = _faiss()
    _check_positive("nprobe", nprobe)
    cs = open_compressed(folder, storage_options=storage_options)
    folder = cs.path
    n, dim = len(cs), cs.K
    if n == 0:
        raise ValueError(f"index: {folder!r} holds no rows")
    key = index_factory or default_index_factory(n, dim)
    try:
        index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ValueError(f"--index-factory: faiss cannot build {key!r} for dim {dim}: {reason}") from exc
    ivf = _ivf(index)
    if nprobe is not None and ivf is None:
        raise ValueError(f"--nprobe: index {key!r} is not an IVF index, got nprobe={nprobe}")
    t0 = time.perf_counter()
    train_rows = 0
    if not index.is_trained:
        size = min(n, POINTS_PER_CLUSTER * ivf.nlist if ivf is not None else TRAIN_MAX)
        sample = _training_sample(cs, size, seed)
        train_rows = len(sample)
        if ivf is not None and train_rows < ivf.nlist:
            raise ValueError(f"--index-factory: {key!r} has {ivf.nlist} IVF lists, more than the {n} vectors to train them")
        if not quiet:
            print(f"index: training {key} on {train_rows} of {n} vectors", file=sys.stderr, flush=True)
        index.train(sample)
        del sample
    for b in cs.iter_batches(BATCH_ROWS, metadata=False):
        index.add(np.ascontiguousarray(b.vectors, dtype=np.float32))
    nprobe = nprobe or default_nprobe(index)
    build_s = time.perf_counter() - t0

    out = _index_dir(folder)
    fsio.makedirs(out)
    info_path = fsio.join(out, INFO_FILE)
    fsio.rm(info_path)  # invalidate the old index first: a crash below leaves none
    rec_index = atomic.write_bytes_atomic(fsio.join(out, INDEX_FILE), faiss.serialize_index(index).tobytes())
    rec_ids = atomic.write_npy_atomic(fsio.join(out, IDS_FILE),
                                      (np.asarray(b.ids, np.int64) for b in cs.iter_shards(decode=False, metadata=False)),
                                      (n,), np.int64)
    rec_ids.pop("rows")
    info = {
        "factory": key, "metric": "inner_product", "ntotal": int(index.ntotal), "dim": dim, "nprobe": nprobe,
        "train_rows": train_rows, "seed": seed, "build_seconds": round(build_s, 3),
        "manifest_sha256": atomic.sha256_file(_manifest.manifest_path(folder)),
        "files": {INDEX_FILE: rec_index, IDS_FILE: rec_ids},
    }
    atomic.write_json_atomic(info_path, info)
    return info


def load_index(folder: str):
    """(faiss index, index.json dict) of FOLDER/index/ (a path, or a URL: the index is
    downloaded), or None when there is no index. A stale index (the manifest changed since)
    or a damaged one is an error."""
    folder = fsio.local(os.fspath(folder))
    remote = fsio.is_url(folder)
    if remote:
        folder = folder.rstrip("/")
    d = _index_dir(folder)
    info_path = fsio.join(d, INFO_FILE)
    if remote:
        fsio.refresh(d)
    if not fsio.exists(info_path):
        return None
    with fsio.open(info_path, "rb") as f:
        info = json.load(f)
    if atomic.sha256_file(_manifest.manifest_path(folder)) != info["manifest_sha256"]:
        raise ValueError(f"the index in {d} is stale: {folder}/manifest.json changed since it "
                         "was built; rerun `semcomp index`")
    sizes = fsio.sizes_under(d) if remote else None
    for name, rec in info["files"].items():
        path = fsio.join(d, name)
        if remote:
            size = sizes.get(name)
        else:
            size = os.path.getsize(path) if os.path.exists(path) else None
        if size != rec["bytes"]:
            raise ValueError(f"damaged index: {path} is missing or not {rec['bytes']} bytes; rerun `semcomp index`")
    path = fsio.join(d, INDEX_FILE)
    if not remote:
        return _faiss().read_index(path), info
    import hashlib
    import tempfile

    # downloaded whole to a local temp file (hashed on the way), read by faiss, deleted
    want = info["files"][INDEX_FILE].get("sha256")
    with tempfile.TemporaryDirectory(prefix="semcomp-index-") as tmp:
        local = os.path.join(tmp, INDEX_FILE)
        sha = hashlib.sha256()
        with fsio.open(path, "rb") as fin, open(local, "wb") as f:
            while chunk := fin.read(1 << 24):
                sha.update(chunk)
                f.write(chunk)
        if want is not None and sha.hexdigest() != want:
            raise ValueError(f"damaged index: {path} does not match the sha256 in {info_path}; rerun `semcomp index`")
        return _faiss().read_index(local), info


@dataclass
class SearchResult:
    """k nearest rows per query (row -1 / id -1 / score -inf where fewer than k were found)."""

    rows: np.ndarray       # (Q, k) int64 row numbers of the compressed set
    ids: np.ndarray        # (Q, k) int64 ids (concept ids, or row numbers in pairs mode)
    scores: np.ndarray     # (Q, k) float32 inner products in the compressed space
    metadata: list | None  # Q lists of k metadata dicts (None for a missing hit), or None
    method: str            # the faiss factory string, or "exact"

    def to_records(self) -> list:
        """JSON-ready: one list per query of {"rank", "id", "row", "score", "metadata"?}."""
        out = []
        for q in range(self.rows.shape[0]):
            hits = []
            for r in range(self.rows.shape[1]):
                if self.rows[q, r] < 0:
                    continue
                h = {"rank": r + 1, "id": int(self.ids[q, r]), "row": int(self.rows[q, r]), "score": float(self.scores[q, r])}
                if self.metadata is not None:
                    h["metadata"] = self.metadata[q][r]
                hits.append(h)
            out.append(hits)
        return out


def exact_search(cs: CompressedSet, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product of prepared queries q (Q, K) over every row, streamed
    shard block by shard block: (scores (Q, k), rows (Q, k)), best first."""
    best_s = np.full((q.shape[0], 0), -np.inf, dtype=np.float32)
    best_r = np.zeros((q.shape[0], 0), dtype=np.int64)
    block = max(1024, min(BATCH_ROWS, EXACT_BLOCK_SCORES // max(1, q.shape[0])))  # bounds the score matrix
    for b in cs.iter_batches(block, metadata=False):
        s = np.concatenate([best_s, q @ b.vectors.T], axis=1)
        r = np.concatenate([best_r, np.broadcast_to(np.arange(b.start, b.start + len(b)), (q.shape[0], len(b)))], axis=1)
        if s.shape[1] > k:
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, r = np.take_along_axis(s, part, 1), np.take_along_axis(r, part, 1)
        best_s, best_r = s, r
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)


def search(folder, queries, k: int = 10, *, nprobe: int | None = None, exact: bool = False,
           storage_options: dict | None = None) -> SearchResult:
    """k nearest compressed rows (inner product) of each full-dimensional query (Q, D) or (D,),
    with their ids, scores and metadata. Uses FOLDER/index/ when present (`semcomp index`),
    else (or with exact=True) an exact streamed search. FOLDER may be a URL (fsspec
    `storage_options`); a URL without an index is an error unless exact=True."""
    _check_positive("k", k)
    _check_positive("nprobe", nprobe)
    cs = open_compressed(folder, storage_options=storage_options)
    folder = cs.path
    q = cs.prepare_queries(queries)
    k_eff = min(k, len(cs))
    loaded = None if exact else load_index(folder)
    if loaded is None and not exact and cs.remote and k_eff:
        raise FileNotFoundError(f"no index in {_index_dir(folder)}; build it with `semcomp index {folder}`, "
                                "or search with --exact (exact=True: downloads every shard)")
    if k_eff == 0:
        scores, rows, method = np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64), "exact"
    elif loaded is None:
        scores, rows = exact_search(cs, q, k_eff)
        method = "exact"
    else:
        index, info = loaded
        if index.ntotal != len(cs) or index.d != cs.K:
            raise ValueError(f"the index in {_index_dir(folder)} holds {index.ntotal} x {index.d}, the folder "
                             f"{len(cs)} x {cs.K}; rerun `semcomp index`")
        if nprobe is not None or info.get("nprobe"):
            if _ivf(index) is None:
                raise ValueError(f"nprobe: index {info['factory']!r} is not an IVF index, got nprobe={nprobe}")
            _set_nprobe(index, nprobe or info["nprobe"])
        scores, rows = index.search(q, k_eff)
        scores[rows < 0] = -np.inf
        method = info["factory"]
    rows = rows.astype(np.int64)
    found = rows >= 0
    ids = np.full(rows.shape, -1, dtype=np.int64)
    ids[found] = cs.ids_at(rows[found])
    meta = None
    if cs.has_metadata:
        flat = cs.metadata_at(rows[found])
        meta = [[None] * rows.shape[1] for _ in range(rows.shape[0])]
        for (qi, ri), rec in zip(zip(*np.nonzero(found)), flat):
            meta[qi][ri] = rec
    return SearchResult(rows, ids, scores.astype(np.float32), meta, method)


def format_table(res: SearchResult) -> str:
    """A plain-text table: query, rank, id, score, then the metadata columns."""
    cols = []
    if res.metadata is not None:
        for hits in res.metadata:
            for h in hits:
                for c in (h or {}):
                    if c not in cols:
                        cols.append(c)
    header = ["query", "rank", "id", "score", *cols]
    lines = [header]
    for qi, hits in enumerate(res.to_records()):
        for h in hits:
            m = h.get("metadata") or {}
            lines.append([str(qi), str(h["rank"]), str(h["id"]), f"{h['score']:.6g}", *(str(m.get(c, "")) for c in cols)])
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in lines)
