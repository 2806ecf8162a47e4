"""`compress()`: validate inputs, plan, run tasks on an engine, keep the manifest current."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

from . import atomic, manifest
from .pipeline import Plan, concept_map_task, concept_reduce_task, pair_task
from .readers import DEFAULT_BATCH_ROWS, discover, open_concepts, validate

_OURS = ("centroids", "metadata", "concepts", ".spill", manifest.MANIFEST)
_SPILL_TARGET = 256 << 20  # bytes of worst-case spill per partition: bounds reduce memory


@dataclass
class CompressOptions:
    inputs: list
    out: str
    metadata: str | None = None
    concepts: str | None = None
    concept_column: str = "concept"
    embedding_column: str = "embedding"
    drop_rate: float | None = None
    keep: int | None = None
    seed: int = 0
    normalize: str = "none"
    out_dtype: str = "float32"
    batch_size: int = DEFAULT_BATCH_ROWS
    partitions: int = 0
    skip_invalid: bool = False
    engine: str = "local"
    ray_address: str | None = None
    resume: bool = False
    overwrite: bool = False
    quiet: bool = False


def _prepare_out(opts: CompressOptions) -> dict | None:
    """Apply the empty / --resume / --overwrite rules; return the old manifest on resume."""
    out = opts.out
    if opts.resume and opts.overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    if os.path.isdir(out) and os.listdir(out):
        if opts.resume:
            if not os.path.exists(manifest.manifest_path(out)):
                raise FileExistsError(f"--resume: {out} has no {manifest.MANIFEST}; nothing to resume")
            atomic.remove_tmp_files(out)
            return manifest.load(out)
        if not opts.overwrite:
            raise FileExistsError(f"output folder {out} is not empty; pass --resume to continue or --overwrite to replace it")
        foreign = [n for n in os.listdir(out) if n not in _OURS]
        if foreign:
            # refuse to delete files we did not write (a mistyped --out must not wipe a folder)
            raise FileExistsError(f"--overwrite: {out} holds files semcomp did not write ({foreign[:3]}); remove them yourself")
        for n in _OURS:
            atomic.rmtree_if_exists(os.path.join(out, n))
    os.makedirs(out, exist_ok=True)
    return None


def _progress(total: int, unit: str, quiet: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, unit_scale=True, desc=desc, disable=quiet or not sys.stderr.isatty())


def build_plan(opts: CompressOptions) -> Plan:
    from .. import RandomFeatureSelector, __version__

    if opts.out_dtype not in ("float32", "float16"):
        raise ValueError(f"--out-dtype must be float32 or float16, got {opts.out_dtype!r}")
    if opts.normalize not in ("none", "input", "output", "both"):
        raise ValueError(f"--normalize must be none, input, output or both, got {opts.normalize!r}")
    if opts.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {opts.batch_size}")
    mods, meta_dir = discover(opts.inputs, opts.metadata, opts.embedding_column)
    dim, in_dtype, meta = validate(mods, meta_dir, opts.embedding_column)
    if opts.drop_rate is not None and opts.keep is not None:
        raise ValueError("give --drop-rate or --keep, not both")
    sel = RandomFeatureSelector(dim, keep=opts.keep, seed=opts.seed) if opts.keep is not None else \
        RandomFeatureSelector(dim, drop_rate=opts.drop_rate or 0.0, seed=opts.seed)
    concepts = None
    parts = 0
    if opts.concepts:
        concepts = [c.describe() | {"kind": c.kind, "offset": c.offset, "column": c.column, "size": c.size}
                    for c in open_concepts(opts.concepts, opts.concept_column, mods[0].shards)]
        for c in concepts:
            c.pop("bytes")
        rows = sum(s.rows for s in mods[0].shards)
        parts = opts.partitions or max(1, math.ceil(rows * sel.keep * 4 / _SPILL_TARGET))
        meta = None  # one row per concept: per-row metadata does not carry over
    params = {
        "mode": "concepts" if concepts else "pairs",
        "modalities": [m.name for m in mods],
        "dim": dim, "in_dtype": in_dtype, "keep": sel.keep, "drop_rate": sel.drop_rate, "seed": opts.seed,
        "normalize": opts.normalize, "out_dtype": opts.out_dtype, "skip_invalid": opts.skip_invalid,
        # the block size fixes the floating-point summation order of concept sums
        "batch_size": opts.batch_size, "partitions": parts, "embedding_column": opts.embedding_column,
        "concept_column": opts.concept_column if concepts else None,
    }
    shard_dicts = lambda m: [s.describe() | {"kind": s.kind, "offset": s.offset, "column": s.column, "size": s.size}
                             for s in m.shards]
    mods_d = []
    for m in mods:
        ds = shard_dicts(m)
        for d in ds:
            d.pop("bytes")
        mods_d.append({"name": m.name, "folder": m.folder, "shards": ds})
    plan = Plan(os.path.abspath(opts.out), mods_d, dim, in_dtype, sel.index.tolist(), params, meta, concepts, parts)
    plan.extra = {"rfs": sel.to_dict(), "version": __version__}
    return plan


def _sources(plan: Plan) -> list:
    src = [{"modality": m["name"], "path": s["path"], "rows": s["rows"], "bytes": s["size"]}
           for m in plan.mods for s in m["shards"]]
    for c in plan.concepts or []:
        src.append({"modality": "concepts", "path": c["path"], "rows": c["rows"], "bytes": c["size"]})
    for p in plan.metadata or []:
        src.append({"modality": "metadata", "path": p, "rows": None, "bytes": os.path.getsize(p)})
    return src


def compress(opts: CompressOptions) -> dict:
    """Run (or resume) a compression job; returns the final manifest."""
    plan = build_plan(opts)  # validates every input before touching the output folder
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
        if diff:
            raise ValueError(f"--resume: parameters differ from the interrupted run: {diff}")
        if old.get("sources") != m["sources"]:
            raise ValueError("--resume: the input shards changed since the interrupted run (paths, rows or sizes)")
        # keep only records whose files are still intact
        m["shards"] = [s for s in old.get("shards", []) if all(manifest.file_ok(opts.out, s[k])
                                                                for k in ("centroids", "metadata", "concepts") if k in s)]
        m["maps"] = [r for r in old.get("maps", []) if all(os.path.exists(os.path.join(
            opts.out, ".spill", f"s{r['index']:05d}", f"p{q:05d}.npz")) for q in range(plan.partitions))]
    manifest.save(opts.out, m)

    if opts.engine == "local":
        from .engines import run_local as runner
    elif opts.engine == "ray":
        from .engines import require_ray, run_ray

        require_ray()
        runner = lambda fn, p, items, cb: run_ray(fn, p, items, cb, opts.ray_address)  # noqa: E731
    else:
        raise ValueError(f"--engine must be local or ray, got {opts.engine!r}")

    in_bytes = sum(s["size"] for mm in plan.mods for s in mm["shards"])
    bar = _progress(in_bytes, "B", opts.quiet, "compress")

    def done(key):
        def cb(rec):
            m[key] = sorted(m[key] + [rec], key=lambda r: r["index"])
            manifest.save(opts.out, m)  # atomic: a kill leaves the last consistent state
            if key != "shards" or not plan.concepts:
                bar.update(sum(mm["shards"][rec["index"]]["size"] for mm in plan.mods))
        return cb

    try:
        if plan.concepts:
            todo = [i for i in range(n_in) if i not in {r["index"] for r in m["maps"]}]
            bar.update(in_bytes - sum(plan.mods[0]["shards"][i]["size"] * len(plan.mods) for i in todo))
            runner(concept_map_task, plan, todo, done("maps"))
            todo = [q for q in range(plan.partitions) if q not in {r["index"] for r in m["shards"]}]
            runner(concept_reduce_task, plan, todo, done("shards"))
        else:
            todo = [i for i in range(n_in) if i not in {r["index"] for r in m["shards"]}]
            bar.update(in_bytes - sum(mm["shards"][i]["size"] for mm in plan.mods for i in todo))
            runner(pair_task, plan, todo, done("shards"))
    finally:
        bar.close()
    m["rows_in"] = sum(s["rows"] for s in plan.mods[0]["shards"])
    m["rows_out"] = sum(s["rows"] for s in m["shards"])
    src = m["maps"] if plan.concepts else m["shards"]
    m["invalid_rows_skipped"] = sum(r["invalid_rows"] for r in src)
    if plan.concepts:
        m["num_concepts"] = m["rows_out"]
        atomic.rmtree_if_exists(os.path.join(opts.out, ".spill"))
    m["status"] = "complete"
    manifest.save(opts.out, m)
    return m
