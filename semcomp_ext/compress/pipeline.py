"""The compression pipeline: plan -> independent shard tasks -> manifest.

Every task is a pure function of (plan, task index) that writes its output files atomically
and returns a JSON-ready record. The local and the Ray engine call the same task functions,
so their outputs are byte-identical; `--resume` only re-runs tasks without a verified record.

Pairs mode (default): output shard i = pair centroids of input shard i (one row per row).
Concepts mode: map tasks reduce each input shard to per-concept partial sums and spill them,
hash-partitioned, to OUT/.spill; reduce task p merges partition p from every shard. Memory is
bounded by the chunk size (map) and the partition size (reduce), not by the concept count.
"""

from __future__ import annotations

import contextlib

import os
import time
from dataclasses import asdict

import numpy as np
import torch

from . import atomic, fsio
from .backends import backend_for
from .blocks import decode_ids, encode_ids, partition_of  # noqa: F401 - encode_ids: part of this module's API
from .plan import Plan

# A test hook: sleep this many seconds after each finished task (kill -9 / resume tests).
_SLEEP_ENV = "SEMCOMP_TEST_SLEEP_PER_SHARD"


def _shard_obj(d: dict):
    from .readers import Shard

    return Shard(**d)


def _write_streamed(path: str, blocks, rows_max: int, keep: int, dtype, threaded: bool = True) -> dict:
    """Stream blocks into an atomic .npy. The header is written for rows_max rows; if rows were
    dropped the header is rewritten in place, padded to the same length, and the file rehashed.
    Writing and hashing run on a helper thread (both release the GIL) so they overlap the
    next block's compute; at most 2 blocks are in flight, which bounds memory. `threaded=False`
    (a single block: nothing to overlap) writes inline and saves the thread start-up."""
    from concurrent.futures import ThreadPoolExecutor

    from .readers import InlineExecutor

    dtype = np.dtype(dtype)
    # A large shard's data starts on a page boundary (a 4096-byte header, whatever the
    # destination, so the bytes never depend on it); a large local file goes to the disk
    # directly (atomic.DirectWriter), blocks that are whole aligned pages without a copy. Small
    # files, and the local temp files of URL uploads, go through the page cache.
    large = rows_max * keep * dtype.itemsize >= _DIRECT_MIN_BYTES
    header = atomic.npy_header((rows_max, keep), dtype, align=atomic.DirectWriter.ALIGN if large else None)
    direct = large and threaded and _DIRECT_WRITES and not fsio.is_url(path)
    with atomic.atomic_file(path) as f, (ThreadPoolExecutor(1) if threaded else InlineExecutor()) as pool:
        w = atomic.DirectWriter(f) if direct else atomic.HashingWriter(f)
        w.write(header)
        rows, pending = 0, None
        for b in blocks:
            b = np.ascontiguousarray(b)
            if pending is not None:
                pending.result()
            pending = pool.submit(w.write, b)
            rows += b.shape[0]
        if pending is not None:
            pending.result()
        if direct:
            w.finish()
        if rows != rows_max:
            h = atomic.npy_header((rows, keep), dtype)
            # pad the dict with spaces before the final newline so the data offset is unchanged
            h = h[:-1] + b" " * (len(header) - len(h)) + b"\n"
            h = h[:8] + np.uint16(len(h) - 10).tobytes() + h[10:]
            f.flush()
            f.seek(0)
            f.write(h)
            f.flush()
            f.seek(0)
            w.hasher = atomic.new_hasher(w.algo)
            while chunk := f.read(1 << 22):
                w.hasher.update(chunk)
    return {"file": _rel(path), "rows": rows, **w.record()}


_DIRECT_MIN_BYTES = 4 << 20  # output files this large: 4096-byte header, written with O_DIRECT
_DIRECT_WRITES = True  # False: large files through the page cache too (same bytes; tests compare)


def _rel(path: str) -> str:
    """FOLDER/NAME of an output file, relative to the output root (what the manifest records)."""
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def _release_free_heap() -> None:
    """Return freed heap memory to the OS after each shard (glibc only). Blocks of a few MB
    are served from the heap, whose free space otherwise fragments and slowly grows the
    resident set with the number of shards processed."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


def _shard_done() -> None:
    _release_free_heap()
    _maybe_sleep()


def _maybe_sleep():
    s = os.environ.get(_SLEEP_ENV)
    if s:
        time.sleep(float(s))


def _filter_metadata(src: str, dst: str, keep_rows: np.ndarray | None) -> dict:
    if keep_rows is None:
        rec = atomic.copy_atomic(src, dst)
    else:
        import pyarrow.parquet as pq

        if fsio.is_url(src):
            with fsio.open(src, "rb") as fin:
                table = pq.read_table(fin).take(keep_rows)
        else:
            table = pq.read_table(src).take(keep_rows)
        with atomic.atomic_file(dst) as f:
            pq.write_table(table, f)
            rec = atomic.hash_back(f)
    rec["file"] = os.path.join("metadata", os.path.basename(dst))
    return rec


_CODECS: dict = {}


def plan_codec(plan: Plan):
    """The plan's (fitted) storage codec, rebuilt from its manifest entry once per process."""
    from .codecs import codec_from_manifest

    entry = plan.extra["codec"]
    key = repr(sorted(entry.items()))
    codec = _CODECS.get(key)
    if codec is None:  # worker threads may build it twice: harmless, and never a KeyError
        codec = codec_from_manifest(entry)
        _CODECS.clear()
        _CODECS[key] = codec
    return codec


def codec_sample(plan: Plan, rows: int) -> np.ndarray:
    """The first `rows` output rows of pairs mode (centroid + RFS of the first input shards,
    float32, non-finite rows dropped): the deterministic sample a codec is fitted on."""
    got, n = [], 0
    for i in range(len(plan.mods[0]["shards"])):
        shards = [_shard_obj(m["shards"][i]) for m in plan.mods]
        with contextlib.closing(_pair_blocks(plan, shards)) as blocks:  # closed on the early return
            for _, mask, out in blocks:
                out = out if mask is None else out[mask]
                got.append(out[: rows - n].numpy().copy())
                n += got[-1].shape[0]
                if n >= rows:
                    return np.concatenate(got)
    return np.concatenate(got) if got else np.zeros((0, len(plan.index)), np.float32)


def _pair_blocks(plan: Plan, shards):
    """(first row, finite-row mask or None, centroid + RFS block) for each block of rows of
    one input shard per modality, from the plan's backend."""
    return backend_for(plan).pair_blocks(plan, shards)


def pair_task(plan: Plan, i: int) -> dict:
    """Output shard i from input shard i of every modality."""
    fsio.configure(plan.storage_options)
    shards = [_shard_obj(m["shards"][i]) for m in plan.mods]
    paths = [s.path for s in shards]
    p = plan.params
    codec = plan_codec(plan)
    kept_rows = []
    invalid = 0

    def blocks():
        nonlocal invalid
        for start, mask, out in _pair_blocks(plan, shards):
            if mask is not None:
                out = out[mask]
                invalid += int((~mask).sum())
                kept_rows.append(np.nonzero(mask.numpy())[0] + start)
            else:
                kept_rows.append(None)
            yield codec.encode(out.numpy())

    name = f"centroids_{i:05d}.npy"
    rec = _write_streamed(os.path.join(plan.out, "centroids", name), blocks(), shards[0].rows,
                          codec.code_width(len(plan.index)), codec.code_dtype, threaded=shards[0].rows > p["batch_size"])
    shard_rec = {"index": i, "rows": rec["rows"], "invalid_rows": invalid, "sources": paths, "centroids": rec}
    if plan.metadata:
        src = plan.metadata[i]
        rows = _kept_row_ids(kept_rows, shards[0].rows, p["batch_size"]) if invalid else None
        shard_rec["metadata"] = _filter_metadata(src, os.path.join(plan.out, "metadata", f"metadata_{i:05d}.parquet"), rows)
    _shard_done()
    return shard_rec


def _kept_row_ids(kept_rows, total: int, batch: int) -> np.ndarray:
    out = []
    for b, r in enumerate(kept_rows):
        out.append(np.arange(b * batch, min((b + 1) * batch, total)) if r is None else r)
    return np.concatenate(out) if out else np.arange(0)


# ---- concepts mode ------------------------------------------------------------------------


def concept_map_task(plan: Plan, i: int) -> dict:
    """Per-concept partial sums (over all modalities, kept columns) of input shard i, spilled
    as OUT/.spill/s{i}/p{p}.npz for each partition p."""
    fsio.configure(plan.storage_options)
    shards = [_shard_obj(m["shards"][i]) for m in plan.mods]
    cshard = _shard_obj(plan.concepts[i])
    paths = [s.path for s in shards]
    u_all, s_all, c_all, invalid = backend_for(plan).concept_partials(plan, shards, cshard)
    spill = os.path.join(plan.out, ".spill", f"s{i:05d}")
    keep = len(plan.index)
    if u_all:
        u, s, c = torch.cat(u_all), torch.cat(s_all), torch.cat(c_all)
        if len(u_all) > 1:  # merge the blocks' partials: sums of sums, counts of counts
            u2, inv = torch.unique(u, sorted=True, return_inverse=True)
            s = torch.zeros(u2.numel(), keep, dtype=torch.float32).index_add_(0, inv, s)
            c = torch.zeros(u2.numel(), dtype=torch.int64).index_add_(0, inv, c)
            u = u2
        u, s, c = u.numpy(), s.numpy(), c.numpy()
    else:
        u, s, c = np.zeros(0, np.int64), np.zeros((0, keep), np.float32), np.zeros(0, np.int64)
    part = partition_of(u, plan.partitions)
    for q in range(plan.partitions):
        sel = part == q
        with atomic.atomic_file(os.path.join(spill, f"p{q:05d}.npz")) as f:
            np.savez(f, ids=u[sel], sums=s[sel], counts=c[sel])
    _shard_done()
    return {"index": i, "rows": shards[0].rows, "invalid_rows": invalid, "sources": paths + [cshard.path]}


def concept_reduce_task(plan: Plan, q: int) -> dict:
    """Merge partition q of every shard's spill into output shard q (concepts sorted by id)."""
    fsio.configure(plan.storage_options)
    ids, sums, counts = [], [], []
    for i in range(len(plan.mods[0]["shards"])):
        path = fsio.join(plan.out, ".spill", f"s{i:05d}", f"p{q:05d}.npz")
        if fsio.is_url(path):
            import io

            with fsio.open(path, "rb") as f:
                path = io.BytesIO(f.read())  # a partition's spill of one shard: small
        with np.load(path) as z:
            ids.append(z["ids"]), sums.append(z["sums"]), counts.append(z["counts"])
    u = torch.from_numpy(np.concatenate(ids))
    s = torch.from_numpy(np.concatenate(sums))
    c = torch.from_numpy(np.concatenate(counts))
    u2, inv = torch.unique(u, sorted=True, return_inverse=True)
    tot = torch.zeros(u2.numel(), s.shape[1], dtype=torch.float32).index_add_(0, inv, s)
    cnt = torch.zeros(u2.numel(), dtype=torch.int64).index_add_(0, inv, c)
    means = tot / cnt.clamp_min(1).unsqueeze(1).float()
    if plan.params["normalize"] in ("output", "both"):
        means = torch.nn.functional.normalize(means, dim=1)
    codec = plan_codec(plan)
    rec = _write_streamed(os.path.join(plan.out, "centroids", f"centroids_{q:05d}.npy"),
                          [codec.encode(means.numpy())], int(u2.numel()), codec.code_width(s.shape[1]), codec.code_dtype,
                          threaded=False)
    cpath = os.path.join(plan.out, "concepts", f"concepts_{q:05d}.npy")
    id_dtype = np.dtype(plan.params["concept_dtype"])
    crec = atomic.write_npy_atomic(cpath, [decode_ids(u2.numpy(), id_dtype)], (int(u2.numel()),), id_dtype)
    crec["file"] = os.path.join("concepts", f"concepts_{q:05d}.npy")
    crec.pop("rows", None)
    _shard_done()
    return {"index": q, "rows": rec["rows"], "centroids": rec, "concepts": crec,
            "observations": int(cnt.sum())}


def plan_to_dict(plan: Plan) -> dict:
    return asdict(plan)
