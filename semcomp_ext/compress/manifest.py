"""manifest.json of a compressed folder: what was done, from what, and checksums to verify it.

manifest.json is written with "status": "in_progress" when a job starts and only at the very
end, with every shard folded in, with "status": "complete" — a folder whose manifest is not
complete is never mistaken for finished output. In between, each finished task is committed
in O(1) by appending one JSON line (its record, hashes included) to `manifest.journal`,
flushed and fsynced; `--resume` reads the manifest plus the journal to know which tasks are
done. A kill can tear only the journal's last line, which is then ignored.

On an object store (OUT a URL) nothing can be appended to: the journal is then a prefix,
`manifest.journal/`, holding one small object per committed task (`shards-000012.json`,
`maps-000003.json`: the same JSON as a journal line), each uploaded whole (atomic). It is read
by listing the prefix and removed the same way.
"""

from __future__ import annotations

import json
import os

from . import fsio
from .atomic import file_checksum, fsync_dir, record_checksum, write_bytes_atomic, write_json_atomic

FORMAT = "semcomp-compress/1"
MANIFEST = "manifest.json"
JOURNAL = "manifest.journal"
INDEX_DIR = "index"  # written by `semcomp index` (compress --overwrite may replace it)


# the folders of the files a manifest or journal may name (relative to the output folder)
DATA_DIRS = ("centroids", "metadata", "concepts")


class ManifestError(ValueError):
    """A manifest or journal that is not what `semcomp compress` writes (one line: the file,
    the entry and what is wrong with it)."""


def manifest_path(out: str) -> str:
    return fsio.join(out, MANIFEST)


def confined_path(rel) -> str | None:
    """Why a file name read from a manifest or journal is not safe, or None when it is: it must
    be a relative, normalised path of one of our data folders (no '..', no absolute path, no
    backslash), e.g. 'centroids/centroids_00003.npy'."""
    if not isinstance(rel, str) or not rel:
        return f"file name {rel!r} is not a non-empty string"
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or ":" in parts[0] or any(p in ("", ".", "..") for p in parts) \
            or len(parts) != 2 or parts[0] not in DATA_DIRS or "\x00" in rel:
        return f"file name {rel!r} is not a path inside the folder's {'/'.join(DATA_DIRS)} folders"
    return None


def local_escape(out: str, rel: str) -> str | None:
    """Why OUT/rel (a local path) is not inside OUT once symlinks are resolved, or None."""
    root = os.path.realpath(out)
    real = os.path.realpath(os.path.join(out, rel))
    if os.path.commonpath([root, real]) != root:
        return f"{rel} leads outside the folder (to {real}) through a symlink"
    return None


def refuse_symlinks(out: str, names) -> None:
    """ValueError when OUT/name, or anything below it, is a symlink (a local output folder):
    the job writes there and must never write through a link out of the folder."""
    for name in names:
        top = os.path.join(out, name)
        if os.path.islink(top):
            raise ValueError(f"{top} is a symlink (to {os.path.realpath(top)}); semcomp does not write through "
                             "symlinks out of its output folder: remove it")
        if not os.path.isdir(top):
            continue
        for root, dirs, files in os.walk(top):
            for n in dirs + files:
                p = os.path.join(root, n)
                if os.path.islink(p):
                    raise ValueError(f"{p} is a symlink (to {os.path.realpath(p)}); semcomp does not write "
                                     "through symlinks out of its output folder: remove it")


def _check_file_record(where: str, key: str, f) -> None:
    if not isinstance(f, dict):
        raise ManifestError(f"{where}: {key!r} is not a file record")
    why = confined_path(f.get("file"))
    if why:
        raise ManifestError(f"{where}: {key}: {why}")
    if isinstance(f.get("bytes"), bool) or not isinstance(f.get("bytes"), int) or f["bytes"] < 0:
        raise ManifestError(f"{where}: {key}: 'bytes' is not a size")
    if not any(isinstance(f.get(a), str) for a in ("xxh3_128", "sha256")):
        raise ManifestError(f"{where}: {key}: no checksum (xxh3_128 or sha256)")


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_record(where: str, key: str, rec) -> None:
    """A task record of the manifest ("shards" / "maps") or the journal has the fields the
    readers use, with confined file names; ManifestError otherwise."""
    if not isinstance(rec, dict):
        raise ManifestError(f"{where}: a {key} record is not a JSON object")
    if not _int(rec.get("index")) or not _int(rec.get("rows")):
        raise ManifestError(f"{where}: a {key} record has no valid 'index' and 'rows'")
    where = f"{where}: {key}[{rec['index']}]"
    if key == "maps":
        if not _int(rec.get("invalid_rows", 0)):
            raise ManifestError(f"{where}: 'invalid_rows' is not a count")
        return
    if key != "shards":
        raise ManifestError(f"{where}: unknown record kind {key!r}")
    if "centroids" not in rec:
        raise ManifestError(f"{where}: no 'centroids' file record")
    for k in ("centroids", "metadata", "concepts"):
        if k in rec:
            _check_file_record(where, k, rec[k])


def check_manifest(path: str, m) -> None:
    """The structure every reader relies on; one ManifestError line naming what is wrong."""
    if not isinstance(m, dict):
        raise ManifestError(f"corrupt manifest {path}: not a JSON object")
    if m.get("format") != FORMAT:
        raise ManifestError(f"{path}: unknown manifest format {m.get('format')!r} (expected {FORMAT})")
    p, rfs = m.get("parameters"), m.get("rfs")
    if not isinstance(p, dict) or not isinstance(rfs, dict):
        raise ManifestError(f"corrupt manifest {path}: no 'parameters' / 'rfs' objects")
    for k in ("dim", "keep", "seed"):
        if isinstance(rfs.get(k), bool) or not isinstance(rfs.get(k), int):
            raise ManifestError(f"corrupt manifest {path}: rfs.{k} is not an integer")
    if not isinstance(rfs.get("index"), list) or not all(_int(i) for i in rfs["index"]):
        raise ManifestError(f"corrupt manifest {path}: rfs.index is not a list of column numbers")
    if p.get("mode") not in ("pairs", "concepts") or not isinstance(p.get("modalities"), list):
        raise ManifestError(f"corrupt manifest {path}: parameters.mode / parameters.modalities missing")
    for key in ("shards", "maps"):
        recs = m.get(key, [])
        if not isinstance(recs, list):
            raise ManifestError(f"corrupt manifest {path}: {key!r} is not a list")
        for rec in recs:
            check_record(path, key, rec)
    if not _int(m.get("num_shards", 0)):
        raise ManifestError(f"corrupt manifest {path}: 'num_shards' is not a count")
    for k in ("rows_in", "rows_out"):
        if k in m and not _int(m[k]):
            raise ManifestError(f"corrupt manifest {path}: {k!r} is not a count")
    if not isinstance(m.get("sources", []), list):
        raise ManifestError(f"corrupt manifest {path}: 'sources' is not a list")


def load(out: str) -> dict:
    path = manifest_path(out)
    fsio.refresh(out)  # another process (a killed or a running job) may have written there
    if not fsio.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {out}")
    try:
        with fsio.open(path, "rb") as f:
            m = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"corrupt manifest {path}: {exc}") from None
    check_manifest(path, m)
    return m


def save(out: str, m: dict) -> None:
    write_json_atomic(manifest_path(out), m)


def load_state(out: str) -> dict:
    """manifest.json with the journal's committed tasks folded into "shards" / "maps" (one
    record per index, the last committed wins, sorted by index): the state a resume starts from.
    (A resume saves this folded state as manifest.json and then starts a fresh journal.)"""
    m = load(out)
    for key, rec in read_journal(out):
        m.setdefault(key, []).append(rec)
    for key in ("shards", "maps"):
        if key in m:
            m[key] = sorted({r["index"]: r for r in m[key]}.values(), key=lambda r: r["index"])
    return m


def journal_path(out: str) -> str:
    return fsio.join(out, JOURNAL)


def _entry(key: str, record: dict) -> bytes:
    return (json.dumps({"key": key, "record": record}, sort_keys=True, separators=(",", ":")) + "\n").encode()


def read_journal(out: str) -> list:
    """(key, record) of every task committed to the journal, in commit order (by name for the
    one-object-per-task journal of a URL output; the order does not matter). A torn last
    line (a kill mid-append) is dropped; a bad line before the last means corruption: an error."""
    path = journal_path(out)
    if fsio.is_url(out):
        entries = []
        for url, data in sorted(fsio.cat_many(fsio.find(path)).items()):
            entries.append(_journal_entry(data, f"journal object {url}"))
        return entries
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    entries = []
    lines = data.split(b"\n")
    for k, line in enumerate(lines[:-1]):  # lines[-1]: bytes after the last newline (torn)
        try:
            entries.append(_journal_entry(line, f"journal {path}, line {k + 1}"))
        except ManifestError:
            if k == len(lines) - 2 and not lines[-1]:
                try:
                    json.loads(line)
                except ValueError:
                    break  # a torn final line that happens to end in a newline
            raise
    return entries


def _journal_entry(data: bytes, where: str) -> tuple:
    """(key, record) of one journal entry, checked like a manifest record."""
    try:
        e = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"corrupt {where}: {exc}") from None
    if not isinstance(e, dict) or e.get("key") not in ("shards", "maps") or "record" not in e:
        raise ManifestError(f"corrupt {where}: not a task record ({{\"key\": \"shards\"|\"maps\", \"record\": ...}})")
    check_record(f"corrupt {where}", e["key"], e["record"])
    return e["key"], e["record"]


class Journal:
    """Append-only commit log: one JSON line per finished task, fsynced before returning."""

    def __init__(self, out: str):
        self.out, self.fd = out, -1
        if fsio.is_url(out):
            return  # one object per record (see the module docstring)
        path = journal_path(out)
        new = not os.path.exists(path)
        # O_NOFOLLOW: a symlink planted at the journal's name is an error, never written through
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        if new:
            fsync_dir(out)

    def append(self, key: str, record: dict) -> None:
        data = _entry(key, record)
        if fsio.is_url(self.out):
            write_bytes_atomic(fsio.join(journal_path(self.out), f"{key}-{record['index']:06d}.json"), data)
            return
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def remove_journal(out: str) -> None:
    """Once its records are folded into a durable manifest.json, the journal goes."""
    if fsio.is_url(out):
        fsio.rm(journal_path(out))
        return
    try:
        os.unlink(journal_path(out))
    except FileNotFoundError:
        return
    fsync_dir(out)


def output_files(m: dict):
    """(relative path, (checksum algorithm, expected digest), expected bytes) of every file the
    manifest vouches for."""
    for sh in m.get("shards", []):
        for key in ("centroids", "metadata", "concepts"):
            f = sh.get(key)
            if f:
                yield f["file"], record_checksum(f), f["bytes"]


def _check_codes(rel: str, a, codec, rows: int, keep: int) -> list[str]:
    """Shape and dtype of a shard's codes, and that its first rows decode to (n, keep) finite floats."""
    shape = codec.code_shape(rows, keep)
    if a.shape != shape or a.dtype.name != codec.code_dtype:
        return [f"{rel}: {a.dtype} {a.shape}, codec {codec.name!r} expects {codec.code_dtype} {shape}"]
    import numpy as np

    x = codec.decode(np.asarray(a[:256]))
    if x.shape != (min(rows, 256), keep) or not np.isfinite(x).all():
        return [f"{rel}: codes do not decode to finite ({min(rows, 256)}, {keep}) float32 rows with codec {codec.name!r}"]
    return []


def _npy_head(url: str, rows: int):
    """The first `rows` rows of a remote .npy (header + those rows only), shape of the whole."""
    import numpy as np

    with fsio.open(url, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        n = min(rows, shape[0]) if shape else 0
        count = n * int(np.prod(shape[1:], dtype=np.int64)) if shape else 1
        head = np.frombuffer(f.read(count * dtype.itemsize), dtype=dtype, count=count).reshape((n,) + tuple(shape[1:]))
    return _Head(head, shape)


class _Head:
    """A .npy's first rows that reports the whole file's shape (for the checks of verify)."""

    def __init__(self, head, shape):
        self.head, self.shape, self.dtype = head, tuple(shape), head.dtype

    def __getitem__(self, key):
        return self.head[key]


def verify(out: str) -> list[str]:
    """Check a compressed folder against its manifest. Returns a list of problems (empty = ok)."""
    import numpy as np

    m = load(out)
    problems = []
    if m.get("status") != "complete":
        problems.append(f"manifest status is {m.get('status')!r}, not 'complete' (interrupted run? use --resume)")
    shards = m.get("shards", [])
    if len(shards) != m.get("num_shards", len(shards)):
        problems.append(f"manifest lists {len(shards)} shards, expected {m.get('num_shards')}")
    keep = m["rfs"]["keep"]
    rfs = m["rfs"]
    problems += _check_rfs(m)
    codec = None
    try:
        from .codecs import codec_from_manifest

        codec = codec_from_manifest(m)
        if codec.dim not in (None, keep):
            problems.append(f"codec {codec.name!r} is for K={codec.dim}, the RFS keeps {keep}")
    except (ValueError, KeyError, ImportError) as exc:
        problems.append(f"codec: {exc}")
    total = 0
    remote = fsio.is_url(out)
    sizes = fsio.sizes_under(out) if remote else None  # one listing, not a request per file
    size_of = (lambda rel: sizes.get(rel)) if remote else \
        (lambda rel: os.path.getsize(os.path.join(out, rel)) if os.path.exists(os.path.join(out, rel)) else None)
    for rel, (algo, digest), nbytes in output_files(m):
        path = fsio.join(out, rel)
        escape = None if remote else local_escape(out, rel)
        if escape:
            problems.append(escape)
            continue
        size = size_of(rel)
        if size is None:
            problems.append(f"missing file {rel}")
        elif size != nbytes:
            problems.append(f"{rel}: size {size} != manifest {nbytes}")
        elif file_checksum(path, algo) != digest:
            problems.append(f"{rel}: {algo} mismatch")
    for sh in shards:
        c = sh["centroids"]
        path = fsio.join(out, c["file"])
        if (remote or not local_escape(out, c["file"])) and size_of(c["file"]) is not None:
            try:
                a = _npy_head(path, 256) if remote else np.load(path, mmap_mode="r")
                if codec is not None:
                    problems += _check_codes(c["file"], a, codec, sh["rows"], keep)
            except Exception as exc:
                problems.append(f"{c['file']}: unreadable .npy ({exc})")
        total += sh["rows"]
    if "rows_out" in m and total != m["rows_out"]:
        problems.append(f"shard rows sum to {total}, manifest rows_out is {m['rows_out']}")
    return problems


def _check_rfs(m: dict) -> list[str]:
    """The RFS record agrees with the parameters (dim, keep, seed) and is the index those
    give; a drop rate, when recorded, gives the same keep."""
    from ..features import RandomFeatureSelector

    rfs, p = m["rfs"], m["parameters"]
    problems = [f"rfs.{k} is {rfs[k]!r}, parameters.{k} is {p.get(k)!r}"
                for k in ("dim", "keep", "seed") if k in p and p.get(k) != rfs[k]]
    if "dim" not in p or "keep" not in p:
        problems.append("parameters lack dim / keep")
    try:
        RandomFeatureSelector.from_dict(rfs)
    except ValueError as exc:
        problems.append(f"RFS index: {exc}")
    return problems
