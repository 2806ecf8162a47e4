"""`compress()`: validate inputs, plan, run tasks on an engine, keep the manifest current."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import atomic, fsio, manifest
from .codecs import parse_codec
from .lock import LOCK, OutputLock, stale_note
from .options import NORMALIZE, CompressOptions, check_choice, check_int, check_rfs, check_storage
from .progress import Progress
from .readers import DEFAULT_BATCH_ROWS, concept_dtype, discover, open_concepts, validate

if TYPE_CHECKING:  # the pipeline imports torch: only when a job runs (fast `--help`)
    from .pipeline import Plan

_WRITTEN = ("centroids", "metadata", "concepts", ".spill", manifest.INDEX_DIR)  # folders a job writes into
_OURS = _WRITTEN + (manifest.MANIFEST, manifest.JOURNAL)
_SPILL_TARGET = 256 << 20  # bytes of worst-case spill per partition: bounds reduce memory


def _prepare_out(opts: CompressOptions) -> dict | None:
    """Apply the empty / --resume / --overwrite rules; return the old manifest on resume."""
    out = opts.out
    if fsio.is_url(out):
        fsio.refresh(out)
        names = fsio.listdir(out) if fsio.isdir(out) else []
    else:
        names = os.listdir(out) if os.path.isdir(out) else []
    names = [n for n in names if n != LOCK]  # this job's own lock
    if names:
        if opts.resume:
            if not fsio.exists(manifest.manifest_path(out)):
                raise FileExistsError(f"--resume: {out} has no {manifest.MANIFEST}; nothing to resume")
            atomic.remove_tmp_files(out)
            return manifest.load_state(out)
        if not opts.overwrite:
            raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue or --overwrite to replace it")
        foreign = [n for n in names if n not in _OURS]
        if foreign:
            # refuse to delete files we did not write (a mistyped --out must not wipe a folder)
            raise FileExistsError(f"--overwrite: {out} holds files semcomp did not write ({foreign[:3]}); remove them yourself")
        for n in _OURS:
            atomic.rmtree_if_exists(fsio.join(out, n))
    fsio.makedirs(out)
    return None


def default_workers() -> int:
    """The cores this process may run on (affinity / cgroup cpusets), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_out_dtype(in_dtype: str) -> str:
    """The output dtype when none is given: the input's (float64, which no codec stores, -> float32)."""
    return in_dtype if in_dtype in ("float32", "float16") else "float32"


def build_plan(opts: CompressOptions) -> Plan:
    from .. import RandomFeatureSelector, __version__
    from .pipeline import Plan

    opts.validated()  # (again: a caller may have changed a field)
    mods, meta_dir = discover(opts.inputs, opts.metadata, opts.embedding_column, getattr(opts, "modalities", None))
    dim, in_dtype, meta = validate(mods, meta_dir, opts.embedding_column)
    codec = parse_codec(opts.codec or opts.out_dtype or default_out_dtype(in_dtype), seed=opts.seed)
    check_rfs(opts.drop_rate, opts.keep, dim)
    sel = RandomFeatureSelector(dim, keep=opts.keep, seed=opts.seed) if opts.keep is not None else \
        RandomFeatureSelector(dim, drop_rate=opts.drop_rate or 0.0, seed=opts.seed)
    concepts = None
    parts = 0
    id_dtype = None
    if opts.concepts:
        cshards = open_concepts(opts.concepts, opts.concept_column, mods[0].shards)
        id_dtype = concept_dtype(cshards).name  # ids are written back in this dtype, unaltered
        concepts = [c.describe() | {"kind": c.kind, "offset": c.offset, "column": c.column, "size": c.size,
                                    "mtime_ns": c.mtime_ns} for c in cshards]
        for c in concepts:
            c.pop("bytes")
        rows = sum(s.rows for s in mods[0].shards)
        parts = opts.partitions or max(1, math.ceil(rows * sel.keep * 4 / _SPILL_TARGET))
        meta = None  # one row per concept: per-row metadata does not carry over
    params = {
        "mode": "concepts" if concepts else "pairs",
        "modalities": [m.name for m in mods],
        "dim": dim, "in_dtype": in_dtype, "keep": sel.keep, "drop_rate": sel.drop_rate, "seed": opts.seed,
        "normalize": opts.normalize, "out_dtype": codec.code_dtype, "codec": codec.name,
        "codec_sample_rows": opts.codec_sample_rows if codec.needs_fit else None, "skip_invalid": opts.skip_invalid,
        # the block size fixes the floating-point summation order of concept sums
        "batch_size": opts.batch_size, "partitions": parts, "embedding_column": opts.embedding_column,
        "concept_column": opts.concept_column if concepts else None, "concept_dtype": id_dtype,
    }
    shard_dicts = lambda m: [s.describe() | {"kind": s.kind, "offset": s.offset, "column": s.column, "size": s.size,
                                             "mtime_ns": s.mtime_ns} for s in m.shards]
    mods_d = []
    for m in mods:
        ds = shard_dicts(m)
        for d in ds:
            d.pop("bytes")
        mods_d.append({"name": m.name, "folder": m.folder, "shards": ds})
    plan = Plan(fsio.abspath(opts.out), mods_d, dim, in_dtype, sel.index.tolist(), params, meta, concepts, parts)
    plan.extra = {"rfs": sel.to_dict(), "version": __version__}
    plan.storage_options = dict(opts.storage_options or {})
    return plan


def _codec_entry(plan: Plan, old: dict | None) -> dict:
    """The manifest entry of the storage codec. On --resume it is the interrupted run's (same
    parameters, already fitted), so resumed shards are encoded exactly like the first ones;
    otherwise a codec that needs fitting is fitted now, before any shard is written, on the
    first codec_sample_rows rows of centroid + RFS output (pairs-mode rows, in either mode)."""
    if old is not None and "codec" in old:
        return old["codec"]
    p = plan.params
    codec = parse_codec(p["codec"], seed=p["seed"])
    if codec.needs_fit:
        from .pipeline import codec_sample

        codec.fit(codec_sample(plan, p["codec_sample_rows"]))
    else:
        codec.dim = p["keep"]
    return codec.to_manifest()


def _sources(plan: Plan) -> list:
    """Every input, identified by path, size and mtime (a --resume on changed inputs is refused)."""
    src = [{"modality": m["name"], "path": s["path"], "rows": s["rows"], "bytes": s["size"], "mtime_ns": s["mtime_ns"]}
           for m in plan.mods for s in m["shards"]]
    for c in plan.concepts or []:
        src.append({"modality": "concepts", "path": c["path"], "rows": c["rows"], "bytes": c["size"],
                    "mtime_ns": c["mtime_ns"]})
    for p in plan.metadata or []:
        size, mtime_ns = fsio.stat(p)
        src.append({"modality": "metadata", "path": p, "rows": None, "bytes": size, "mtime_ns": mtime_ns})
    return src


def _files_present(out: str, rec: dict, sizes: dict | None = None) -> bool:
    """A journal record is trusted if its files exist with the recorded sizes (a stat, no
    hashing: `semcomp verify` re-hashes). `sizes`: relative path -> size from one listing of
    a URL output."""
    for key in ("centroids", "metadata", "concepts"):
        f = rec.get(key)
        if f:
            if sizes is not None:
                if sizes.get(f["file"]) != f["bytes"]:
                    return False
                continue
            try:
                if os.path.getsize(os.path.join(out, f["file"])) != f["bytes"]:
                    return False
            except OSError:
                return False
    return True


def compress(opts: CompressOptions) -> dict:
    """Run (or resume) a compression job; returns the final manifest."""
    import gc

    # The objects that exist before the job (torch's import alone makes ~170k) are set aside
    # from the cyclic garbage collector for its duration: each full collection walked all of
    # them, 0.1 s apiece, several times a job. Objects the job creates are collected as usual;
    # a process that froze objects itself is left as it is.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        return _compress(opts)
    finally:
        if freeze:
            gc.unfreeze()


def _compress(opts: CompressOptions) -> dict:
    import dataclasses

    opts.validated()
    fsio.configure(opts.storage_options)
    opts = dataclasses.replace(opts, out=fsio.local(opts.out))
    from .device import resolve_device

    device = resolve_device(getattr(opts, "device", "cpu"), opts.engine)  # before any input is opened
    plan = build_plan(opts)  # validates every input before touching the output folder
    if device.type != "cpu":  # outside plan.params: the bytes and the manifest do not depend on it
        plan.extra["device"] = str(device)
    if plan.in_dtype == "float64" and not opts.quiet:
        print(f"semcomp compress: note: the inputs are float64; they are cast to float32 block by block "
              f"(accumulation is float32) and stored as {plan.params['codec']}", file=sys.stderr)
    lock = OutputLock(opts.out).acquire()  # before the folder is looked at: one job at a time
    try:
        note = stale_note(lock)
        if note and not opts.quiet:
            print(f"semcomp compress: note: {opts.out}: {note}", file=sys.stderr)
        if not fsio.is_url(opts.out):
            manifest.refuse_symlinks(opts.out, _WRITTEN)
        return _run_job(opts, plan)
    finally:
        lock.release_soon()


def _run_job(opts: CompressOptions, plan: Plan) -> dict:
    old = _prepare_out(opts)
    n_in = len(plan.mods[0]["shards"])
    m = {
        "format": manifest.FORMAT, "library_version": plan.extra["version"], "status": "in_progress",
        "parameters": plan.params, "rfs": plan.extra["rfs"], "sources": _sources(plan),
        "num_shards": plan.partitions if plan.concepts else n_in, "shards": [], "maps": [],
    }
    if old is not None:
        diff = sorted(k for k in set(m["parameters"]) | set(old.get("parameters", {}))
                      if m["parameters"].get(k) != old.get("parameters", {}).get(k))
        po = old.get("parameters", {})
        if "batch_size" in diff and m["parameters"]["mode"] == "pairs":
            # pairs mode: each output row depends on its input row only, never on the blocking,
            # so the files are the same whatever --batch-size; the first run's value is kept
            m["parameters"] = dict(plan.params, batch_size=po.get("batch_size"))  # the job itself uses the new one
            diff.remove("batch_size")
        if "skip_invalid" in diff and plan.params["skip_invalid"] and not po.get("skip_invalid"):
            # a run without --skip-invalid stops at the first NaN/Inf, so every shard it committed
            # has no invalid row and is exactly what --skip-invalid writes: resume with it
            m["parameters"]["skip_invalid"] = True
            diff.remove("skip_invalid")
        if diff:
            raise ValueError(f"--resume: parameters differ from the interrupted run: {diff}")
        if old.get("sources") != m["sources"]:
            raise ValueError("--resume: the input files changed since the interrupted run (paths, rows, sizes or mtimes)")
        # trust the committed records whose files are still there (sizes only; verify re-hashes)
        sizes = fsio.sizes_under(opts.out) if fsio.is_url(opts.out) else None
        spilled = (lambda rel: rel in sizes) if sizes is not None else \
            (lambda rel: os.path.exists(os.path.join(opts.out, rel)))
        m["shards"] = [s for s in old.get("shards", []) if _files_present(opts.out, s, sizes)]
        m["maps"] = [r for r in old.get("maps", []) if all(spilled(os.path.join(
            ".spill", f"s{r['index']:05d}", f"p{q:05d}.npz")) for q in range(plan.partitions))]
    m["codec"] = plan.extra["codec"] = _codec_entry(plan, old)
    manifest.save(opts.out, m)  # in_progress, the records resumed from folded in
    manifest.remove_journal(opts.out)  # ... so the journal restarts empty

    if opts.engine == "local":
        from .engines import run_local

        workers = default_workers() if opts.workers is None else opts.workers
        runner = lambda fn, p, items, cb: run_local(fn, p, items, cb, workers)  # noqa: E731
    elif opts.engine == "ray":
        from .engines import require_ray, run_ray

        require_ray()
        runner = lambda fn, p, items, cb: run_ray(fn, p, items, cb, opts.ray_address, opts.workers)  # noqa: E731

    from .pipeline import concept_map_task, concept_reduce_task, pair_task

    in_bytes = [sum(mm["shards"][i]["size"] for mm in plan.mods) for i in range(n_in)]
    in_rows = [s["rows"] for s in plan.mods[0]["shards"]]
    bar = Progress(sum(in_bytes), n_in + (plan.partitions if plan.concepts else 0), opts.quiet)
    journal = manifest.Journal(opts.out)

    def done(key):
        def cb(rec):
            journal.append(key, rec)  # O(1) durable commit; folded into manifest.json at the end
            m[key].append(rec)
            reduce = key == "shards" and plan.concepts
            bar.update(0 if reduce else in_bytes[rec["index"]], rows=0 if reduce else in_rows[rec["index"]])
        return cb

    try:
        phases = [(concept_map_task, "maps", n_in), (concept_reduce_task, "shards", plan.partitions)] \
            if plan.concepts else [(pair_task, "shards", n_in)]
        for fn, key, n in phases:
            finished = {r["index"] for r in m[key]}
            todo = [i for i in range(n) if i not in finished]
            if key == "maps" or not plan.concepts:
                bar.skip(sum(in_bytes[i] for i in finished), len(finished), sum(in_rows[i] for i in finished))
            else:
                bar.update(0, len(finished))
            runner(fn, plan, todo, done(key))
    finally:
        journal.close()
        bar.close()
    for key in ("shards", "maps"):
        m[key].sort(key=lambda r: r["index"])
    m["rows_in"] = sum(s["rows"] for s in plan.mods[0]["shards"])
    m["rows_out"] = sum(s["rows"] for s in m["shards"])
    src = m["maps"] if plan.concepts else m["shards"]
    m["invalid_rows_skipped"] = sum(r["invalid_rows"] for r in src)
    if plan.concepts:
        m["num_concepts"] = m["rows_out"]
        atomic.rmtree_if_exists(fsio.join(opts.out, ".spill"))
    m["status"] = "complete"
    manifest.save(opts.out, m)
    manifest.remove_journal(opts.out)  # folded in: the complete manifest is durable
    return m


# ---- in-memory arrays ------------------------------------------------------------------


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
    tensors), float16 / float32 / float64 (float64 is cast to float32). Other arguments as the
    CLI options of the same names; out_dtype defaults to the input dtype (float32 for float64).
    """
    import numpy as np

    from .. import RandomFeatureSelector
    from .blocks import as_tensor, check_finite, pair_block

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
    dtypes = {a.dtype.name for a in xs}
    in_dtype = dtypes.pop() if len(dtypes) == 1 else "float32"
    if len(xs) and len({a.dtype for a in xs}) > 1:
        xs = [a.astype(np.float32) for a in xs]
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
        zs = [as_tensor(np.ascontiguousarray(a[start:start + batch_size])) for a in xs]
        mask = check_finite(zs, names, start, skip_invalid)
        out = pair_block(zs, index, keep_all, normalize)
        r = np.arange(start, start + zs[0].shape[0])
        if mask is not None:
            out, r = out[mask], r[mask.numpy()]
        blocks.append(out.numpy().copy())
        rows.append(r)
    cent = np.concatenate(blocks) if blocks else np.zeros((0, sel.keep), np.float32)
    if cdc.needs_fit:
        cdc.fit(cent[:codec_sample_rows])
    else:
        cdc.dim = sel.keep
    codes = cdc.encode(cent)  # every codec encodes row by row: the same codes as block by block
    return CompressedArrays(codes, np.asarray(sel.index, dtype=np.int64), cdc,
                            np.concatenate(rows) if rows else np.zeros(0, np.int64), dim, in_dtype, len(xs))
