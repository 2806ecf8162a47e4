"""Shard readers for the layouts users already have, validated before any work starts.

Layouts:
- clip-retrieval: ROOT/{img_emb,text_emb,...}/<name>_NNNN.npy, ROOT/metadata/metadata_NNNN.parquet;
  shard i of every modality holds the same rows.
- embedding-reader style: one folder per modality of `.npy` shards, or parquet shards with an
  `embedding` list column.

Rows are read in fixed-size blocks. A local `.npy` block is a private memory map of just its
rows (no copy out of the page cache; the map is dropped when the consumer lets go of the block,
so resident memory stays bounded by the block size whatever the shard size), advised as
sequential so that a cold file is read ahead in large windows. URL shards are read with `readinto` into two reusable buffers, one block ahead.
"""

from __future__ import annotations

import math
import os
import posixpath
import re
from dataclasses import dataclass, field

import numpy as np

from . import fsio

EMB_EXTS = (".npy", ".parquet")



# Rows per streamed block. Resident memory is a few blocks per worker (the mapped input rows of
# every modality, the output block, the one being written), so smaller blocks keep the peak RSS
# down while the per-block Python overhead stays negligible: measured on the 2-core development
# machine (fp32, D=512, 2 GiB, two workers), 2048 / 4096 / 8192 rows took the same CPU time
# (0.9-1.2 s, within the noise) with peak RSS of about 290 / 320 / 380 MB.
DEFAULT_BATCH_ROWS = 4096

def require_pyarrow(what: str):
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(f"{what} needs pyarrow: pip install 'semcomp-ext[compress]'") from exc
    return pq


@dataclass
class Shard:
    path: str
    kind: str            # "npy" | "parquet"
    rows: int
    dim: int = 0         # 0 for 1-D shards (concept ids)
    dtype: str = "float32"
    offset: int = 0      # npy: byte offset of the data
    column: str = ""     # parquet: the column read
    size: int = 0
    mtime_ns: int = 0    # with path and size, identifies the input on --resume

    def describe(self) -> dict:
        return {"path": self.path, "rows": self.rows, "dim": self.dim, "dtype": self.dtype, "bytes": self.size}


@dataclass
class Modality:
    name: str
    folder: str                       # the modality's folder, or its file
    shards: list = field(default_factory=list)
    files: list | None = None         # explicit shard files (None: every shard in `folder`)


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


# the header np.save writes (format 1.0), parsed without ast.literal_eval (~0.2 ms a file: the
# bulk of opening a small shard); anything else goes through numpy's own reader
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[A-Za-z]\d*)', 'fortran_order': (False|True), "
                         rb"'shape': \(((?:\d+, ?)*\d*)\), \} *\n")


def _npy_header(f) -> tuple:
    """(shape, fortran_order, dtype, data offset) of the .npy open as `f`."""
    head = f.read(10)
    if head[:8] == b"\x93NUMPY\x01\x00" and len(head) == 10:
        text = f.read(int.from_bytes(head[8:10], "little"))
        m = _NPY_HEADER.fullmatch(text)
        if m:
            shape = tuple(int(x) for x in m.group(3).split(b",") if x.strip())
            return shape, m.group(2) == b"True", np.dtype(m.group(1).decode()), f.tell()
    f.seek(0)
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return shape, fortran, dtype, f.tell()


def open_npy(path: str, want_2d: bool = True) -> Shard:
    """Parse the header and check the file holds exactly the data it announces (a truncated
    or padded file is reported here, before any output is written)."""
    try:
        size, mtime_ns = fsio.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing shard: {path}") from None
    try:
        with fsio.open(path, "rb", block_size=fsio.HEAD_BLOCK) as f:  # the header only, not the shard
            shape, fortran, dtype, offset = _npy_header(f)
    except Exception as exc:  # numpy raises ValueError/EOFError/SyntaxError on garbage
        raise ValueError(f"corrupt .npy {path}: {exc}") from exc
    if fortran:
        raise ValueError(f"{path}: Fortran-ordered arrays are not supported; save C-ordered")
    if not want_2d and not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{path}: concept ids must be integers, got dtype {dtype}"
                         + (" (strings: map them to integer ids first)" if dtype.kind in "US" else ""))
    if dtype not in (np.float32, np.float16, np.float64) and want_2d:
        raise ValueError(f"{path}: embeddings must be float32, float16 or float64, got {dtype}")
    if want_2d and len(shape) != 2:
        raise ValueError(f"{path}: embeddings must be 2-D (rows, dim), got shape {shape}")
    if not want_2d and len(shape) != 1:
        raise ValueError(f"{path}: concept ids must be 1-D, got shape {shape}")
    # Python integers: a shape whose product overflows int64 is a size mismatch, not a wrap-around
    expect = offset + math.prod(int(n) for n in shape) * dtype.itemsize
    if size != expect:
        raise ValueError(f"truncated or corrupt .npy {path}: header says {shape} {dtype} "
                         f"({expect} bytes), file has {size} bytes")
    # ids keep their exact dtype string ('<u8', '>i4'): byte order included, rebuildable by np.dtype
    return Shard(path, "npy", int(shape[0]), int(shape[1]) if want_2d else 0, dtype.name if want_2d else dtype.str,
                 offset, size=size, mtime_ns=mtime_ns)


def open_parquet(path: str, column: str, want_2d: bool = True) -> Shard:
    pq = require_pyarrow("reading parquet shards")
    import pyarrow as pa

    try:
        size, mtime_ns = fsio.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"missing shard: {path}") from None
    with _parquet_source(path, block_size=fsio.HEAD_BLOCK) as src:  # the footer and schema only
        return _open_parquet(path, src, column, want_2d, size, mtime_ns)


def _parquet_source(path: str, block_size: int | None = None):
    """What pyarrow opens: the local path itself, or an fsspec file for a URL."""
    from contextlib import nullcontext

    return fsio.open(path, "rb", block_size=block_size) if fsio.is_url(path) else nullcontext(path)


def _open_parquet(path, src, column, want_2d, size, mtime_ns) -> Shard:
    pq = require_pyarrow("reading parquet shards")
    import pyarrow as pa

    try:
        pf = pq.ParquetFile(src)
        schema = pf.schema_arrow
    except Exception as exc:
        raise ValueError(f"truncated or corrupt parquet {path}: {exc}") from exc
    if column not in schema.names:
        raise ValueError(f"{path}: no column {column!r} (columns: {schema.names})")
    typ = schema.field(column).type
    rows = pf.metadata.num_rows
    dim, dtype = 0, ""
    if want_2d:
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)):
            raise ValueError(f"{path}: column {column!r} must be a list of floats, got {typ}")
        vt = typ.value_type
        dtype = {pa.float32(): "float32", pa.float16(): "float16", pa.float64(): "float64"}.get(vt)
        if dtype is None:
            raise ValueError(f"{path}: column {column!r} must hold float32, float16 or float64, got {vt}")
        if pa.types.is_fixed_size_list(typ):
            dim = typ.list_size
        elif rows:
            try:
                first = next(pf.iter_batches(batch_size=1, columns=[column]))
            except Exception as exc:
                raise ValueError(f"truncated or corrupt parquet {path}: {exc}") from exc
            dim = len(first.column(0)[0])
    elif not pa.types.is_integer(typ):
        raise ValueError(f"{path}: concept column {column!r} must be integers, got {typ}")
    else:
        dtype = np.dtype(typ.to_pandas_dtype()).str
    return Shard(path, "parquet", rows, dim, dtype, column=column, size=size, mtime_ns=mtime_ns)


def open_shard(path: str, column: str = "embedding", want_2d: bool = True) -> Shard:
    return open_npy(path, want_2d) if path.endswith(".npy") else open_parquet(path, column, want_2d)


class InlineExecutor:
    """Stand-in for ThreadPoolExecutor(1) that runs each call when it is submitted: for work
    of one block, where there is nothing to overlap and a thread start-up would dominate."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def shutdown(self, wait: bool = True) -> None:
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future

        fut = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:  # noqa: BLE001 - re-raised by fut.result(), like a thread's
            fut.set_exception(exc)
        return fut


def _iter_npy(shard: Shard, batch: int):
    """Blocks read by a helper thread one block ahead (readinto releases the GIL), into two
    alternating buffers: I/O overlaps compute, memory stays 2 blocks. A shard of one block is
    read inline (no thread, one buffer of its size): small shards cost no thread start-up."""
    from concurrent.futures import ThreadPoolExecutor

    width = max(shard.dim, 1)
    dtype = np.dtype(shard.dtype)
    starts = list(range(0, shard.rows, batch))
    cap = min(batch, shard.rows)
    bufs = [np.empty((cap, width) if shard.dim else (cap,), dtype=dtype) for _ in range(min(2, len(starts)))]
    row_bytes = width * dtype.itemsize
    with fsio.open_unbuffered(shard.path) as f:
        def read(k):
            start = starts[k]
            n = min(batch, shard.rows - start)
            view = bufs[k % 2][:n]
            got = f.readinto(memoryview(view).cast("B"))
            if got != n * row_bytes:  # the file shrank since it was validated
                raise ValueError(f"truncated .npy {shard.path}: short read at row {start}")
            return view

        f.seek(shard.offset)
        if not starts:
            return
        # Not `with pool:` — its exit joins the thread. A consumer that stops early leaves this
        # generator to be closed by the garbage collector, which may run inside threading's own
        # bookkeeping (holding its lock); a join there deadlocks. So: wait only for the read in
        # flight (it must finish before the file closes) and let the idle thread exit unjoined.
        pool = ThreadPoolExecutor(1) if len(starts) > 1 else InlineExecutor()
        nxt = None
        try:
            nxt = pool.submit(read, 0)
            for k in range(len(starts)):
                view = nxt.result()
                # the consumer is done with buffer (k+1)%2 once it asks for block k: safe to refill
                nxt = pool.submit(read, k + 1) if k + 1 < len(starts) else None
                yield view  # reused after the next request: consumers must not keep it
        finally:
            if nxt is not None:
                nxt.exception()  # waits for the read without raising its error again
            pool.shutdown(wait=False)


def _iter_parquet(shard: Shard, batch: int):
    pq = require_pyarrow("reading parquet shards")
    import pyarrow.compute as pc

    try:
        with _parquet_source(shard.path) as src:
            pf = pq.ParquetFile(src)
            for rb in pf.iter_batches(batch_size=batch, columns=[shard.column]):
                col = rb.column(0)
                if shard.dim == 0:
                    if col.null_count:
                        raise ValueError(f"{shard.path}: null concept id in column {shard.column!r}")
                    yield col.to_numpy()  # the column's own integer dtype (uint64 stays uint64)
                    continue
                if col.null_count:
                    raise ValueError(f"{shard.path}: null embedding in column {shard.column!r}")
                flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
                if flat.size != len(col) * shard.dim:
                    raise ValueError(f"{shard.path}: embeddings of differing lengths (expected dim {shard.dim})")
                yield flat.reshape(len(col), shard.dim)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"truncated or corrupt parquet {shard.path}: {exc}") from exc


def _iter_npy_mapped(shard: Shard, batch: int):
    """Blocks of a local .npy as private (copy-on-write) maps of their rows: no copy, no thread.
    Each block is a fresh map, unmapped once the consumer drops it (a consumer may keep a
    block: it stays valid). The file's size is rechecked before each block, so a file that
    shrank since it was validated is an error, not a fault."""
    import mmap

    width = max(shard.dim, 1)
    dtype = np.dtype(shard.dtype)
    row_bytes = width * dtype.itemsize
    tail = (shard.dim,) if shard.dim else ()
    end = shard.offset + shard.rows * row_bytes
    fd = os.open(shard.path, os.O_RDONLY)
    try:
        for start in range(0, shard.rows, batch):
            n = min(batch, shard.rows - start)
            lo = shard.offset + start * row_bytes
            hi = lo + n * row_bytes
            if os.fstat(fd).st_size < hi:
                raise ValueError(f"truncated .npy {shard.path}: short read at row {start}")
            base = lo - lo % mmap.ALLOCATIONGRANULARITY
            mm = mmap.mmap(fd, hi - base, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                # read once, front to back: a fault on a page not in memory reads ahead a large
                # window (a cold file streams), and the unmap skips marking every page accessed.
                # (An explicit POSIX_FADV_WILLNEED per block cost 10% of the job's CPU time on
                # cached files: the kernel walks every page of the range.)
                mm.madvise(mmap.MADV_SEQUENTIAL)
            view = np.frombuffer(mm, dtype=dtype, count=n * width, offset=lo - base).reshape((n,) + tail)
            del mm  # the block holds the map
            yield view
            del view  # the consumer may keep it; this frame does not (the map goes when they let go)
    finally:
        os.close(fd)


def iter_chunks(shard: Shard, batch: int):
    """Yield consecutive row blocks of exactly `batch` rows (the last may be shorter)."""
    if shard.kind == "npy" and not fsio.is_url(shard.path):
        yield from _iter_npy_mapped(shard, batch)
        return
    gen = _iter_npy(shard, batch) if shard.kind == "npy" else _iter_parquet(shard, batch)
    if shard.kind == "npy":
        yield from gen
        return
    # parquet batches can stop short at row-group boundaries: re-block so every modality
    # yields the same row ranges.
    pending, have = [], 0
    for a in gen:
        pending.append(a)
        have += a.shape[0]
        while have >= batch:
            cat = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield cat[:batch]
            pending, have = ([cat[batch:]] if cat.shape[0] > batch else []), cat.shape[0] - batch
    if have:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


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
    """--modality NAME=PATH (PATH: a file or a folder of shards)."""
    mods = []
    for spec in specs:
        name, sep, path = spec.partition("=") if isinstance(spec, str) else (spec[0], "=", spec[1])
        if not sep or not name or not path:
            raise ValueError(f"--modality must be NAME=PATH, got {spec!r}")
        path = fsio.local(path)
        if not fsio.exists(path):
            raise FileNotFoundError(f"--modality {name}: no such file or folder: {path}")
        if any(m.name == name for m in mods):
            raise ValueError(f"--modality {name} given twice")
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
    modalities, one dimension. Returns (dim, dtype, metadata shard paths or None)."""
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
    if len(dtypes) > 1:
        raise ValueError(f"mixed input dtypes {sorted(dtypes)}; convert the shards to one dtype")
    meta = None
    if metadata:
        pq = require_pyarrow("metadata pass-through")
        meta = [fsio.abspath(metadata)] if fsio.isfile(metadata) else list_shards(metadata, (".parquet",))
        if len(meta) != len(ref.shards):
            raise ValueError(f"metadata shard count {len(meta)} in {metadata} != embedding shard count {len(ref.shards)}")
        for p, s in zip(meta, ref.shards):
            try:
                with _parquet_source(p) as src:
                    n = pq.ParquetFile(src).metadata.num_rows
            except Exception as exc:
                raise ValueError(f"truncated or corrupt parquet {p}: {exc}") from exc
            if n != s.rows:
                raise ValueError(f"row counts differ: metadata {p} has {n} rows, {s.path} has {s.rows}")
    return dim, dtypes.pop(), meta


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
