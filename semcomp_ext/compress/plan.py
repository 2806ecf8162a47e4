"""The plan of a compression job: every input opened and validated, the RFS drawn, the
parameters fixed (what the manifest records and a --resume must match). Plain data, so it
pickles to Ray workers; built before the output folder is touched."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import fsio
from .codecs import parse_codec
from .options import CompressOptions, check_rfs
from .readers import concept_dtype, discover, open_concepts, validate

SPILL_TARGET = 256 << 20  # bytes of worst-case spill per partition: bounds reduce memory


@dataclass
class Plan:
    """Everything a task needs; plain data so it pickles to Ray workers."""

    out: str
    mods: list                  # [{"name", "shards": [Shard dicts]}]
    dim: int
    in_dtype: str
    index: list                 # RFS column ids
    params: dict
    metadata: list | None = None
    concepts: list | None = None  # concept-id Shard dicts per input shard
    partitions: int = 0
    # where the blocks are computed, fixed when the plan is built: None = the CPU backend; a
    # torch device ("cuda:0", or "cpu" to run the pipelined backend on the host) = device.py's
    # backend on it. Outside params: the bytes and the manifest do not depend on it.
    device: str | None = None
    extra: dict = field(default_factory=dict)
    # fsspec options of URL inputs / outputs (credentials): to the workers, never to the manifest
    storage_options: dict = field(default_factory=dict, repr=False)


def default_out_dtype(in_dtype: str) -> str:
    """The output dtype when none is given: the input's (float64, which no codec stores, -> float32)."""
    return in_dtype if in_dtype in ("float32", "float16") else "float32"


def build_plan(opts: CompressOptions, device: str | None = None) -> Plan:
    """Every input opened and checked, the RFS drawn, the parameters fixed; `device`: the
    block backend's device (Plan.device; None = the CPU backend)."""
    from .. import RandomFeatureSelector, __version__

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
        parts = opts.partitions or max(1, math.ceil(rows * sel.keep * 4 / SPILL_TARGET))
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
    plan = Plan(fsio.abspath(opts.out), mods_d, dim, in_dtype, sel.index.tolist(), params, meta, concepts, parts,
                device=device)
    plan.extra = {"rfs": sel.to_dict(), "version": __version__}
    plan.storage_options = dict(opts.storage_options or {})
    return plan


def sources(plan: Plan) -> list:
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
