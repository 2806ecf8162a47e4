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

Index choice without --index-factory: `index_choice.choose_index` (autofaiss's approach: storage
from the size and a memory budget, IVF lists from the size and a time budget). An index that
needs training is trained on a uniform sample (64 rows a list for IVF, else <= 65536 rows).
nprobe of an IVF index, unless --nprobe is given: 256 rows of the training sample serve as
queries; their exact top-11 is gathered while the rows are added; nprobe doubles from 1 until
the index's recall@10 on them (each query's own row left out) reaches 0.95, a margin over the
0.9 asked of unseen queries (efSearch = 2·nprobe for an HNSW coarse quantizer).
The build holds the folder's lock (lock.py, as compress does): a second index, or a compress
--overwrite/--resume of the folder, is refused meanwhile with one line naming the holder.
Training and adding print a line every 10 s (heartbeat.Heartbeat) and their own durations.
faiss runs on `threads` OpenMP threads (default: the usable cores, fewer on a busy machine:
heartbeat.default_threads). index.json records the choice, its estimate and budget, nprobe
with the recall it reached, and the time of each step.
faiss is imported lazily (pip install faiss-cpu).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import atomic, fsio
from . import manifest as _manifest
from .heartbeat import Heartbeat, default_threads, faiss_threads, usable_cores
from .index_choice import (TRAIN_MAX, TRAIN_PER_LIST, TUNE_K, TUNE_QUERIES, TUNE_RECALL, IndexChoice,
                           check_positive_int, check_seconds, choose_index, default_index_factory,
                           default_time_budget)
from .lock import OutputLock, stale_note
from .open import CompressedSet, open_compressed
from .options import OptionError

__all__ = ["IndexChoice", "SearchResult", "build_index", "choose_index", "default_index_factory",
           "default_time_budget", "merge_topk", "recall_at_k", "search", "tune_nprobe"]

INDEX_DIR = _manifest.INDEX_DIR
INDEX_FILE, IDS_FILE, INFO_FILE = "index.faiss", "ids.npy", "index.json"
BATCH_ROWS = 65536
EXACT_BLOCK_SCORES = 1 << 24                         # exact search: at most ~16M scores per block


def _faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("semcomp index/search with a faiss index need faiss: pip install faiss-cpu") from exc
    return faiss


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


def _training_sample(cs: CompressedSet, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, vectors): `size` rows drawn uniformly without replacement, sorted, streamed
    (memory: the sample; only the drawn rows are decoded)."""
    n = len(cs)
    if size >= n:
        return np.arange(n, dtype=np.int64), np.ascontiguousarray(cs.vectors(), dtype=np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    out = []
    for b in cs.iter_batches(BATCH_ROWS, decode=False, metadata=False):
        lo, hi = np.searchsorted(rows, [b.start, b.start + len(b)])
        if hi > lo:
            out.append(cs.codec.decode(b.vectors[rows[lo:hi] - b.start]))
    return rows, np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def merge_topk(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, rows: np.ndarray, k: int):
    """The k largest of (best scores, best rows) and (scores (Q, m), rows (m,) or (Q, m)),
    unordered. The new block is cut to its own k first: no copy of the whole block."""
    rows = np.broadcast_to(rows, scores.shape)
    if scores.shape[1] > k:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores, rows = np.take_along_axis(scores, part, 1), np.take_along_axis(rows, part, 1)
    s = np.concatenate([best[0], scores], axis=1)
    r = np.concatenate([best[1], rows], axis=1)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s, r = np.take_along_axis(s, part, 1), np.take_along_axis(r, part, 1)
    return s, r


def _empty_topk(q: int) -> tuple[np.ndarray, np.ndarray]:
    return np.full((q, 0), -np.inf, dtype=np.float32), np.zeros((q, 0), dtype=np.int64)


def recall_at_k(got: np.ndarray, truth: np.ndarray, k: int, self_rows: np.ndarray | None = None) -> float:
    """Mean |got's first k ∩ truth's first k| / k over the queries (rows best first, -1 = no
    hit); with self_rows, each query's own row is left out of both before the cut."""
    hits = 0.0
    me = [None] * len(got) if self_rows is None else self_rows
    for g, t, m in zip(got, truth, me):
        t = [x for x in t if x != m][:k]
        g = [x for x in g if x != m and x >= 0][:k]
        hits += len(set(g) & set(t)) / max(1, len(t))
    return hits / max(1, len(got))


def tune_nprobe(index, queries: np.ndarray, query_rows: np.ndarray, truth: np.ndarray, *,
                k: int = TUNE_K, target: float = TUNE_RECALL) -> tuple[int, float, list]:
    """The smallest nprobe in 1, 2, 4, ... nlist whose recall@k on `queries` (database rows
    `query_rows`, exact neighbours `truth` (Q, >= k+1) best first) reaches `target`, each
    query's own row left out: (nprobe, its recall, [[nprobe, recall], ...])."""
    nlist = _ivf(index).nlist
    curve, p = [], 1
    while True:
        _set_nprobe(index, p)
        _, got = index.search(queries, k + 1)
        r = recall_at_k(got, truth, k, query_rows)
        curve.append([p, round(r, 4)])
        if r >= target or p >= nlist:
            return p, r, curve
        p = min(2 * p, nlist)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"semcomp index: {msg}", file=sys.stderr, flush=True)


def _new_index(key: str, dim: int):
    faiss = _faiss()
    try:
        return faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise OptionError("index_factory", f": faiss cannot build {key!r} for dim {dim}: {reason}") from exc


def _train(index, key: str, cs: CompressedSet, seed: int, quiet: bool):
    """Train on a uniform sample (IVF: 64 rows a list, else <= 65536): (rows, vectors, seconds)
    of the sample, or Nones when the index needs no training."""
    if index.is_trained:
        return None, None, 0.0
    n, ivf = len(cs), _ivf(index)
    size = min(n, TRAIN_PER_LIST * ivf.nlist if ivf is not None else TRAIN_MAX)
    if ivf is not None and size < ivf.nlist:
        raise OptionError("index_factory", f": {key!r} has {ivf.nlist} IVF lists, more than the {n} vectors to train them")
    with Heartbeat(f"index: sampling {size:,} of {n:,} vectors", quiet=quiet):
        rows, sample = _training_sample(cs, size, seed)
    if ivf is not None:  # no faiss warning below 39 rows a list (an explicit factory on a small folder)
        ivf.cp.min_points_per_centroid = 1
    with Heartbeat(f"index: training {key} on {len(sample):,} x {cs.K}", quiet=quiet) as hb:
        index.train(sample)
    return rows, sample, hb.seconds


def _add(index, cs: CompressedSet, tune_q: np.ndarray | None, quiet: bool):
    """Add every row in order (faiss labels = row numbers); with tuning queries, their exact
    top-(TUNE_K + 1) gathered on the way. (truth rows or None, seconds)."""
    n, added = len(cs), [0]
    best = _empty_topk(len(tune_q)) if tune_q is not None else None
    with Heartbeat(f"index: adding {n:,} vectors", quiet=quiet, status=lambda: f"{added[0]:,} added") as hb:
        for b in cs.iter_batches(BATCH_ROWS, metadata=False):
            v = np.ascontiguousarray(b.vectors, dtype=np.float32)
            index.add(v)
            if best is not None:  # faiss's exact kNN of the block (sgemm + heaps), then merged
                sc, rw = _faiss().knn(tune_q, v, min(TUNE_K + 1, len(v)), metric=_faiss().METRIC_INNER_PRODUCT)
                best = merge_topk(best, sc, rw + b.start, TUNE_K + 1)
            added[0] += len(b)
    truth = None
    if best is not None:
        order = np.argsort(-best[0], axis=1, kind="stable")
        truth = np.take_along_axis(best[1], order, 1)
    return truth, hb.seconds


def build_index(folder, *, index_factory: str | None = None, nprobe: int | None = None, seed: int = 0,
                quiet: bool = True, storage_options: dict | None = None, time_budget_s: float | None = None,
                max_memory: int | None = None, threads: int | None = None, target_recall: float = TUNE_RECALL) -> dict:
    """Build and save FOLDER/index/ (see the module doc; FOLDER a path or a URL, with fsspec
    `storage_options`); returns the contents of index.json. index_factory: a faiss
    index_factory string instead of `choose_index`'s (time_budget_s, max_memory bytes);
    nprobe: instead of the tuned one (target_recall); threads: faiss's OpenMP threads."""
    _faiss()  # no faiss: the ImportError before any work
    check_positive_int("nprobe", nprobe)
    check_positive_int("max_memory", max_memory)
    check_positive_int("threads", threads)
    check_seconds(time_budget_s)
    if isinstance(target_recall, bool) or not isinstance(target_recall, (int, float)) or not 0 < target_recall <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}")
    if index_factory is not None and (not isinstance(index_factory, str) or not index_factory.strip()):
        raise OptionError("index_factory", f"must be a faiss index_factory string, got {index_factory!r}")
    folder = fsio.existing_folder(folder, "index", storage_options)
    # one writer per folder, as compress: held from before the folder is read until index.json
    # is written, so a compress --overwrite/--resume or a second index is refused meanwhile
    lock = OutputLock(folder, command="semcomp index").acquire()
    try:
        note = stale_note(lock)
        if note:
            _say(quiet, f"note: {folder}: {note}")
        return _build_locked(open_compressed(folder), index_factory=index_factory, nprobe=nprobe, seed=seed,
                             quiet=quiet, time_budget_s=time_budget_s, max_memory=max_memory, threads=threads,
                             target_recall=target_recall)
    finally:
        lock.release_soon()


def _build_locked(cs: CompressedSet, *, index_factory, nprobe, seed, quiet, time_budget_s, max_memory, threads,
                  target_recall) -> dict:
    """build_index's work, with the folder's lock held."""
    folder = cs.path
    n, dim = len(cs), cs.K
    if n == 0:
        raise ValueError(f"index: {folder!r} holds no rows")
    # the choice assumes every usable core (the same factory whatever the load); the build runs
    # on fewer threads when the machine is busy (heartbeat.default_threads)
    run_threads = default_threads() if threads is None else threads
    choice = None
    if index_factory is None:
        choice = choose_index(n, dim, dtype=cs.codec.code_dtype, time_budget_s=time_budget_s,
                              max_memory=max_memory, threads=threads or usable_cores())
        key = choice.factory
        _say(quiet, f"{key} for {n:,} x {dim} ({choice.storage} storage, {choice.bytes_per_vector * n / 1e9:.2f} GB; "
                    f"estimated {choice.estimated_seconds:.0f} s of a {choice.time_budget_s:.0f} s budget on "
                    f"{choice.threads} threads; building on {run_threads})")
    else:
        key = index_factory.strip()
    index = _new_index(key, dim)
    ivf = _ivf(index)
    if nprobe is not None and ivf is None:
        raise OptionError("nprobe", f": index {key!r} is not an IVF index, got nprobe={nprobe}")
    t0 = time.perf_counter()
    tuning = None
    with faiss_threads(run_threads):
        rows, sample, train_s = _train(index, key, cs, seed, quiet)
        tune_rows = tune_q = None
        if ivf is not None and nprobe is None:  # tuning queries: database rows from the training sample
            pick = np.sort(np.random.default_rng(seed + 1).choice(len(rows), min(TUNE_QUERIES, len(rows)), replace=False))
            tune_rows, tune_q = rows[pick], np.ascontiguousarray(sample[pick])
        del sample
        truth, add_s = _add(index, cs, tune_q, quiet)
        if truth is not None:
            t1 = time.perf_counter()
            nprobe, recall, curve = tune_nprobe(index, tune_q, tune_rows, truth, target=target_recall)
            tuning = {"queries": len(tune_q), "k": TUNE_K, "target_recall": target_recall, "recall": round(recall, 4),
                      "curve": curve, "seconds": round(time.perf_counter() - t1, 3)}
            _say(quiet, f"nprobe {nprobe} of {ivf.nlist} lists: recall@{TUNE_K} {recall:.3f} on {len(tune_q)} sample "
                        f"rows (target {target_recall})")
    build_s = time.perf_counter() - t0

    out = _index_dir(folder)
    if not fsio.is_url(out):  # never written through a symlink out of the folder
        _manifest.refuse_symlinks(folder, (_manifest.INDEX_DIR,))
    fsio.makedirs(out)
    info_path = fsio.join(out, INFO_FILE)
    fsio.rm(info_path)  # invalidate the old index first: a crash below leaves none
    rec_index = _write_index(fsio.join(out, INDEX_FILE), index)
    rec_ids = atomic.write_npy_atomic(fsio.join(out, IDS_FILE),
                                      (np.asarray(b.ids, cs.id_dtype) for b in cs.iter_shards(decode=False, metadata=False)),
                                      (n,), cs.id_dtype)
    rec_ids.pop("rows")
    info = {
        "factory": key, "factory_source": "explicit" if choice is None else "auto", "metric": "inner_product",
        "ntotal": int(index.ntotal), "dim": dim, "nprobe": nprobe, "nprobe_tuning": tuning,
        "train_rows": 0 if rows is None else len(rows), "seed": seed, "threads": run_threads,
        "build_seconds": round(build_s, 3), "train_seconds": round(train_s, 3), "add_seconds": round(add_s, 3),
        "choice": None if choice is None else choice.to_dict(),
        "manifest_sha256": atomic.sha256_file(_manifest.manifest_path(folder)),
        "files": {INDEX_FILE: rec_index, IDS_FILE: rec_ids},
    }
    atomic.write_json_atomic(info_path, info)
    _say(quiet, f"built in {build_s:.1f} s (training {train_s:.1f} s, adding {add_s:.1f} s)")
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
    rec = info["files"][INDEX_FILE]
    algo = next((a for a in atomic.CHECKSUMS if a in rec), None)

    def check(digest: str | None) -> None:
        if algo is not None and digest != rec[algo]:
            raise ValueError(f"damaged index: {path} does not match the {algo} in {info_path}; rerun `semcomp index`")

    if not remote:
        # checksum before faiss reads it: a damaged local file is one line, not a faiss abort
        check(_file_digest(path, algo) if algo else None)
        return _read_index(path), info
    import tempfile

    # downloaded whole to a local temp file (hashed on the way), read by faiss, deleted
    with tempfile.TemporaryDirectory(prefix="semcomp-index-") as tmp:
        local = os.path.join(tmp, INDEX_FILE)
        h = atomic.new_hasher(algo) if algo else None
        with fsio.open(path, "rb") as fin, open(local, "wb") as f:
            while chunk := fin.read(1 << 24):
                if h is not None:
                    h.update(chunk)
                f.write(chunk)
        check(h.hexdigest() if h is not None else None)
        return _read_index(local), info


def _file_digest(path: str, algo: str) -> str:
    h = atomic.new_hasher(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _read_index(path: str):
    try:
        return _faiss().read_index(path)
    except RuntimeError as exc:  # a file that passed its checksum but faiss cannot read
        raise ValueError(f"damaged index: faiss cannot read {path}: {str(exc).strip().splitlines()[-1]}; "
                         "rerun `semcomp index`") from exc


def _write_index(path: str, index) -> dict:
    """index.faiss written atomically, streamed from faiss through the checksum (no copy of
    the serialised index in memory): {"bytes", <checksum>}."""
    faiss = _faiss()
    with atomic.atomic_file(path) as f:
        w = atomic.HashingWriter(f)
        faiss.write_index(index, faiss.PyCallbackIOWriter(w.write))
    return w.record()


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
    best = _empty_topk(q.shape[0])
    block = max(1024, min(BATCH_ROWS, EXACT_BLOCK_SCORES // max(1, q.shape[0])))  # bounds the score matrix
    for b in cs.iter_batches(block, metadata=False):
        best = merge_topk(best, q @ b.vectors.T, np.arange(b.start, b.start + len(b)), k)
    order = np.argsort(-best[0], axis=1, kind="stable")
    return np.take_along_axis(best[0], order, 1), np.take_along_axis(best[1], order, 1)


def search(folder, queries, k: int = 10, *, nprobe: int | None = None, exact: bool = False,
           storage_options: dict | None = None) -> SearchResult:
    """k nearest compressed rows (inner product) of each full-dimensional query (Q, D) or (D,),
    with their ids, scores and metadata. Uses FOLDER/index/ when present (`semcomp index`),
    else (or with exact=True) an exact streamed search. FOLDER may be a URL (fsspec
    `storage_options`); a URL without an index is an error unless exact=True."""
    check_positive_int("k", k)
    check_positive_int("nprobe", nprobe)
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
    ids = np.zeros(rows.shape, dtype=cs.id_dtype)  # the ids' own dtype: uint64 ids stay exact
    ids[found] = cs.ids_at(rows[found])
    meta = None
    if cs.has_metadata:
        flat = cs.metadata_at(rows[found]).to_pylist()
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
