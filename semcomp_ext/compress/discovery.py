"""From what the user names (files, folders, a clip-retrieval root, NAME=PATH modalities) to
validated modalities of aligned shards: the layouts in LAYOUTS, checked before any work starts
(every shard opened, counts, rows, dimension and dtype compared)."""

from __future__ import annotations

import os
import posixpath
import re

import numpy as np

from . import fsio
from .npy import open_npy
from .options import OptionError, OptionPathError
from .parquet import open_parquet, parquet_source
from .shard import Modality, Shard, require_pyarrow

EMB_EXTS = (".npy", ".parquet")


def open_shard(path: str, column: str = "embedding", want_2d: bool = True) -> Shard:
    return open_npy(path, want_2d) if path.endswith(".npy") else open_parquet(path, column, want_2d)


# What `compress` / `gap` / `eval` accept, printed when the inputs match none of it.
LAYOUTS = """expected one of these input layouts:
  IMG.npy TEXT.npy [AUDIO.npy ...]     one file per modality (.npy or .parquet), at least 2
  --modality img=PATH --modality text=PATH
                                       named modalities, each a file or a folder of shards
  DIR                                  a folder of files NAME_emb.npy (or NAME_emb_0.npy, NAME_emb_1.npy, ...
                                       shards): img_emb.npy + text_emb.npy are modalities img and text
  ROOT                                 clip-retrieval: ROOT/img_emb/*.npy, ROOT/text_emb/*.npy
                                       [, ROOT/metadata/*.parquet]
  DIR1 DIR2 [...]                      one folder of .npy/.parquet shards per modality"""


class LayoutError(ValueError):
    """Inputs that match no known layout; the message lists the layouts."""

    def __init__(self, problem: str):
        super().__init__(f"{problem}\n{LAYOUTS}")


def natural_key(name: str) -> list:
    """Sort key that orders the numbers in file names numerically (img_emb_2 < img_emb_10)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def list_shards(folder: str, exts=EMB_EXTS) -> list[str]:
    folder = fsio.local(folder)
    if not fsio.isdir(folder):
        raise FileNotFoundError(f"missing input folder: {folder}")
    # numeric order of the shard numbers: img_emb_10.npy is shard 10, not shard 2
    files = sorted((f for f in fsio.listdir(folder) if f.endswith(exts) and not f.startswith(".")), key=natural_key)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(exts)} shards in {folder}")
    # absolute paths: the manifest's source list must compare equal on --resume from any cwd
    return [fsio.abspath(fsio.join(folder, f)) for f in files]


_EMB_FILE = re.compile(r"^(?P<name>.+?)_emb(?:[_-]?\d+)?$")


def _file_groups(paths: list, sort: bool = False) -> list:
    """Modalities from files: NAME_emb.npy / NAME_emb_N.npy are shards of modality NAME (in
    numeric order); any other file is a modality of its own, named by its stem."""
    groups: dict = {}
    for p in paths:
        stem = os.path.splitext(os.path.basename(p))[0]
        m = _EMB_FILE.match(stem)
        groups.setdefault(m.group("name") if m else stem, []).append(fsio.abspath(p))
    mods = []
    for name, files in sorted(groups.items(), key=lambda kv: natural_key(kv[0])) if sort else groups.items():
        files = sorted(files, key=lambda f: natural_key(os.path.basename(f)))
        mods.append(Modality(name, files[0] if len(files) == 1 else posixpath.dirname(files[0]) if fsio.is_url(files[0])
                             else os.path.dirname(files[0]), files=files))
    return mods


def _named(specs: list) -> list:
    """modalities: NAME=PATH specs (PATH: a file or a folder of shards)."""
    mods = []
    for spec in specs:
        name, sep, path = spec.partition("=") if isinstance(spec, str) else (spec[0], "=", spec[1])
        if not sep or not name or not path:
            raise OptionError("modalities", f"must be NAME=PATH, got {spec!r}")
        path = fsio.local(path)
        if not fsio.exists(path):
            raise OptionPathError("modalities", f": {name}: no such file or folder: {path}")
        if any(m.name == name for m in mods):
            raise OptionError("modalities", f": {name} given twice")
        mods.append(Modality(name, path, files=None if fsio.isdir(path) else [fsio.abspath(path)]))
    return mods


def _dedupe(mods: list) -> list:
    seen: dict = {}
    for m in mods:
        n = seen[m.name] = seen.get(m.name, 0) + 1
        if n > 1:
            m.name = f"{m.name}_{n}"
    return mods


def discover(inputs: list, metadata: str | None = None, column: str = "embedding", modalities: list | None = None):
    """Resolve CLI inputs to modalities (+ metadata folder), for the layouts in LAYOUTS:
    files (one per modality, or NAME_emb_N shards), --modality NAME=PATH, a folder of
    NAME_emb files, a clip-retrieval root (`*_emb` folders), or one folder per modality."""
    inputs = [fsio.local(p) for p in inputs or []]
    metadata = fsio.local(metadata)
    if modalities:
        if inputs:
            raise ValueError("give the inputs as positional paths or as --modality NAME=PATH, not both")
        return _named(modalities), metadata
    if not inputs:
        raise LayoutError("no inputs given")
    for p in inputs:
        if not fsio.exists(p):
            what = "clip-retrieval root" if len(inputs) == 1 else "input"
            raise FileNotFoundError(f"{what} does not exist: {p}")
    files = [p for p in inputs if not fsio.isdir(p)]
    if files:
        for p in files:
            if not p.endswith(EMB_EXTS):
                raise LayoutError(f"not a .npy or .parquet file: {p}")
        if len(files) == len(inputs):
            mods = _file_groups(files)
            if len(mods) < 2:
                raise LayoutError(f"need at least 2 modalities, got 1 ({mods[0].name}: {len(files)} file(s))")
            return mods, metadata
        # files and folders mixed: each path is one modality
        return _dedupe([Modality(_base(p), p, files=None if fsio.isdir(p) else [fsio.abspath(p)]) for p in inputs]), metadata
    if len(inputs) == 1:
        root = inputs[0]
        names = fsio.listdir(root)
        subs = sorted(d for d in names if d.endswith("_emb") and fsio.isdir(fsio.join(root, d)))
        if subs:
            mods = [Modality(d[: -len("_emb")], fsio.join(root, d)) for d in subs]
            meta = metadata or (fsio.join(root, "metadata") if "metadata" in names and fsio.isdir(fsio.join(root, "metadata"))
                                else None)
            return mods, meta
        emb_files = [fsio.join(root, f) for f in names if f.endswith(EMB_EXTS) and not f.startswith(".")
                     and _EMB_FILE.match(os.path.splitext(f)[0]) and fsio.isfile(fsio.join(root, f))]
        if emb_files:
            mods = _file_groups(emb_files, sort=True)  # a folder: modalities by name, as clip-retrieval
            if len(mods) < 2:
                raise LayoutError(f"{root} holds files of one modality only ({mods[0].name}_emb...); need at least 2 modalities")
            return mods, metadata
        raise LayoutError(f"{root} holds no *_emb folders (clip-retrieval) and no NAME_emb.npy files; "
                          "for one folder per modality give at least 2 folders")
    mods = [Modality(_base(p), p) for p in inputs]
    return _dedupe(mods), metadata


def _base(path: str) -> str:
    """Last component of a path or URL (a trailing slash ignored)."""
    return posixpath.basename(path.rstrip("/")) if fsio.is_url(path) else os.path.basename(os.path.normpath(path))


def validate(mods: list, metadata: str | None, column: str = "embedding"):
    """Open every shard; check M >= 2, equal shard counts, equal rows per shard across
    modalities, one dimension. Returns (dim, dtype, metadata shard paths or None); the dtype of
    shards of several float dtypes is the promoted one (blocks.promoted_dtype)."""
    if len(mods) < 2:
        raise LayoutError(f"need at least 2 modalities, got {len(mods)}: {[m.folder for m in mods]}")
    for m in mods:
        m.shards = [open_shard(p, column) for p in (m.files if m.files is not None else list_shards(m.folder))]
    ref = mods[0]
    for m in mods[1:]:
        if len(m.shards) != len(ref.shards):
            raise ValueError(f"shard counts differ: {ref.folder} has {len(ref.shards)}, {m.folder} has {len(m.shards)}")
        for a, b in zip(ref.shards, m.shards):
            if a.rows != b.rows:
                raise ValueError(f"row counts differ between modalities: {a.path} has {a.rows} rows, {b.path} has {b.rows}")
    # an empty parquet part (0 rows, as Spark writes them) of a list column has no dimension
    sized = [s for m in mods for s in m.shards if not (s.kind == "parquet" and s.rows == 0 and s.dim == 0)]
    first = sized[0] if sized else ref.shards[0]
    dim = first.dim
    for m in mods:
        for s in m.shards:
            if s.kind == "parquet" and s.rows == 0 and s.dim == 0:
                s.dim = dim
    dims = {(s.path, s.dim) for m in mods for s in m.shards}
    for path, d in dims:
        if d != dim:
            raise ValueError(f"dimension mismatch: {path} has dim {d}, {first.path} has dim {dim}")
    dtypes = {s.dtype for m in mods for s in m.shards}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    if dtype is None:  # mixed float dtypes: promoted as the loss API does (float16 + float32 -> float32)
        from .blocks import promoted_dtype

        dtype = promoted_dtype(dtypes)
    meta = None
    if metadata:
        pq = require_pyarrow("metadata pass-through")
        meta = [fsio.abspath(metadata)] if fsio.isfile(metadata) else list_shards(metadata, (".parquet",))
        if len(meta) != len(ref.shards):
            raise ValueError(f"metadata shard count {len(meta)} in {metadata} != embedding shard count {len(ref.shards)}")
        for p, s in zip(meta, ref.shards):
            try:
                with parquet_source(p) as src:
                    n = pq.ParquetFile(src).metadata.num_rows
            except Exception as exc:
                raise ValueError(f"truncated or corrupt parquet {p}: {exc}") from exc
            if n != s.rows:
                raise ValueError(f"row counts differ: metadata {p} has {n} rows, {s.path} has {s.rows}")
    return dim, dtype, meta


def open_concepts(path: str, column: str, ref_shards: list) -> list:
    """Concept-id shards aligned with the embedding shards (a folder of .npy / .parquet)."""
    path = fsio.local(path)
    files = list_shards(path) if fsio.isdir(path) else [path]
    shards = [open_shard(p, column, want_2d=False) for p in files]
    if len(shards) != len(ref_shards):
        raise ValueError(f"concept shard count {len(shards)} in {path} != embedding shard count {len(ref_shards)}")
    for c, s in zip(shards, ref_shards):
        if c.rows != s.rows:
            raise ValueError(f"row counts differ: concept ids {c.path} has {c.rows} rows, {s.path} has {s.rows}")
    return shards


def concept_dtype(shards: list) -> np.dtype:
    """The one integer dtype that holds every concept-id shard's ids exactly (native order)."""
    dt = np.result_type(*(np.dtype(s.dtype) for s in shards)) if shards else np.dtype(np.int64)
    if not np.issubdtype(dt, np.integer):  # uint64 mixed with signed ids: no common integer type
        kinds = sorted({np.dtype(s.dtype).name for s in shards})
        raise ValueError(f"concept id shards mix integer dtypes {kinds} that no one integer dtype holds; "
                         "convert them to one dtype")
    return dt.newbyteorder("=")
