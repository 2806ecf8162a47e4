"""Atomic, checksummed writes: a temp file in the destination folder, fsync, rename, fsync of
the folder. A reader (or a resumed job) therefore sees either the old state or the complete
new file, never a torn one; leftovers of a killed run are only ever `*.tmp-*` files.

On an object store (a URL destination, see fsio.py) there is no rename: the file is written to
a local temp file and uploaded whole once complete, so the object appears under its final key
only when it is complete (a PUT / multipart upload is atomic); a kill leaves no object behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

import numpy as np

from . import fsio

TMP_MARK = ".tmp-"


def _read_umask() -> int:
    """The process umask, read without a window where it is changed (Linux: /proc), else by
    os.umask(0) + restore — done once, at import, before any worker thread exists."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0)
    os.umask(old)
    return old


# mkstemp creates 0600 files; outputs get what a plain open() would give under the umask
FILE_MODE = 0o666 & ~_read_umask()


class DiskFullError(OSError):
    """Raised instead of a bare ENOSPC so the CLI can say which file could not be written."""


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str):
    """Yield a binary file object writing to a temp file next to `path`; on success the file
    is fsynced and renamed over `path`. On any error the temp file is removed. A URL `path`
    is uploaded whole from a local temp file (see the module docstring)."""
    if fsio.is_url(path):
        with _upload_file(path) as f:
            yield f
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + TMP_MARK, dir=folder)
    try:
        with os.fdopen(fd, "w+b") as f:  # readable: a rewritten header is rehashed
            os.fchmod(f.fileno(), FILE_MODE)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}") from exc
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # a bare "[Errno 27] File too large" names no file: name the one being written
            raise OSError(exc.errno, f"{exc.strerror or exc} while writing {path}") from exc
        raise


@contextmanager
def _upload_file(url: str):
    fd, tmp = tempfile.mkstemp(prefix="semcomp-upload" + TMP_MARK)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
        fsio.put_file(tmp, url)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"local disk full while staging {url} for upload "
                                              "(set TMPDIR to a larger disk)") from exc
        raise
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


# ---- checksums of the data files a manifest vouches for ----------------------------------
# xxh3-128 (the xxhash package) hashes at memory speed, about 10 GB/s on one core; sha256 ran at
# 1.8 GB/s and was a third of a compress job's CPU time. A file record names its algorithm by
# its key, {"xxh3_128": hex} or {"sha256": hex}: manifests written with sha256 (before xxh3, or
# where xxhash is not installed) verify as they are. Small files (manifest, index) keep sha256.
CHECKSUMS = ("xxh3_128", "sha256")


def _xxhash():
    try:
        import xxhash
    except ImportError:
        return None
    return xxhash


def default_checksum() -> str:
    return "xxh3_128" if _xxhash() is not None else "sha256"


def new_hasher(algo: str | None = None):
    """A hashlib-style object (update, hexdigest) for `algo` (default: default_checksum())."""
    algo = algo or default_checksum()
    if algo == "sha256":
        return hashlib.sha256()
    if algo == "xxh3_128":
        xxhash = _xxhash()
        if xxhash is None:
            raise ImportError("this manifest's checksums are xxh3_128, which needs xxhash: pip install xxhash")
        return xxhash.xxh3_128()
    raise ValueError(f"unknown checksum algorithm {algo!r} (known: {', '.join(CHECKSUMS)})")


def record_checksum(rec: dict) -> tuple:
    """(algorithm, hex digest) of a manifest file record."""
    for algo in CHECKSUMS:
        if algo in rec:
            return algo, rec[algo]
    raise KeyError(f"file record {rec.get('file', rec)!r} has no checksum (one of {', '.join(CHECKSUMS)})")


def file_checksum(path: str, algo: str) -> str:
    h = new_hasher(algo)
    with fsio.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def hash_back(f) -> dict:
    """{"bytes", <checksum>} of everything written so far to the readable file `f`."""
    f.flush()
    f.seek(0)
    algo = default_checksum()
    h, n = new_hasher(algo), 0
    while chunk := f.read(1 << 22):
        h.update(chunk)
        n += len(chunk)
    return {"bytes": n, algo: h.hexdigest()}


class HashingWriter:
    """File wrapper that checksums every byte written (without re-reading the file)."""

    def __init__(self, f):
        self.f, self.algo, self.nbytes = f, default_checksum(), 0
        self.hasher = new_hasher(self.algo)

    def write(self, data) -> None:
        mv = memoryview(data)
        if mv.nbytes == 0:  # an empty partition; memoryview cannot cast a zero-size shape
            return
        mv = mv.cast("B")
        self.hasher.update(mv)
        self.f.write(mv)
        self.nbytes += mv.nbytes

    def record(self) -> dict:
        """{"bytes", <checksum>} of what was written."""
        return {"bytes": self.nbytes, self.algo: self.hasher.hexdigest()}


class DirectWriter(HashingWriter):
    """HashingWriter for large local files whose bytes go to the disk with O_DIRECT, past the
    page cache. A block that is whole aligned pages (at an aligned file offset) is written
    straight from the caller's memory; anything else is gathered in a page-aligned staging
    buffer and written a full buffer at a time. `finish()` writes the padded tail and cuts the
    file to its size. Copying into the page cache was the largest kernel cost of a compress
    job (and the dirty pages' writeback at fsync the next).
    Where the filesystem refuses O_DIRECT (when it is set or at the first write), the
    writer falls back to ordinary buffered writes, silently: the bytes are the same.
    Call finish() before anything else uses the file; the file object must have nothing
    pending when the writer is created."""

    ALIGN = 4096

    def __init__(self, f, stage_bytes: int = 4 << 20):
        import fcntl
        import mmap

        super().__init__(f)
        f.flush()
        self.fd = f.fileno()
        self.cap = max(self.ALIGN, stage_bytes // self.ALIGN * self.ALIGN)
        self.stage = None
        self.fill = 0
        self.started = False  # a direct write has reached the file (no fallback after that)
        try:
            flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except (OSError, AttributeError):  # not supported here: plain writes
            return
        self.flags = flags
        self.stage = mmap.mmap(-1, self.cap)
        self.view = np.frombuffer(self.stage, dtype=np.uint8)

    @property
    def direct(self) -> bool:
        return self.stage is not None

    def write(self, data) -> None:
        if not self.direct:
            return super().write(data)
        mv = memoryview(data)
        if mv.nbytes == 0:
            return
        mv = mv.cast("B")
        self.hasher.update(mv)
        self.nbytes += mv.nbytes
        src = np.frombuffer(mv, dtype=np.uint8)
        if self.fill % self.ALIGN == 0 and src.size % self.ALIGN == 0 and src.ctypes.data % self.ALIGN == 0:
            # whole aligned pages at an aligned file offset: straight from the caller's memory
            # (after what is staged, itself whole pages: e.g. a page-sized header)
            if self.fill:
                self._flush(self.fill)
            if not self.direct or not self._write_direct(mv):
                self.f.write(mv)
            return
        pos = 0
        while pos < src.size:
            if not self.direct:  # fell back while writing this block: the rest goes plain
                self.f.write(mv[pos:])
                return
            take = min(src.size - pos, self.cap - self.fill)
            self.view[self.fill:self.fill + take] = src[pos:pos + take]
            self.fill += take
            pos += take
            if self.fill == self.cap:
                self._flush(self.cap)

    def _write_direct(self, mv) -> bool:
        """Write mv (aligned) at the file's offset. False, with the writer switched to buffered
        writes, when the filesystem refuses (EINVAL) the very first direct write; the caller
        then writes mv through the file object."""
        done = 0
        try:
            while done < mv.nbytes:
                done += os.write(self.fd, mv[done:])
        except OSError as exc:
            if exc.errno != errno.EINVAL or self.started or done:
                raise
            self._plain()
            return False
        self.started = True
        return True

    def _flush(self, n: int) -> None:
        """Write the first n (aligned) staged bytes; on a fallback the staged bytes (without
        the padding) go through the file object."""
        staged = memoryview(self.stage)[:n]
        fill, self.fill = self.fill, 0
        if self._write_direct(staged):
            return
        self.f.write(bytes(staged[:fill]))

    def _plain(self) -> None:
        import fcntl

        fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
        self.view = None
        try:
            self.stage.close()
        except BufferError:  # a view of it is still alive (an error's traceback): unmapped with it
            pass
        self.stage = None

    def finish(self) -> None:
        """Write the staged tail (zero-padded to the alignment), cut the file to its size, and
        return the file to buffered mode."""
        if not self.direct:
            return
        if self.fill:
            n = self.fill
            padded = -(-n // self.ALIGN) * self.ALIGN
            self.view[n:padded] = 0
            self._flush(padded)
            if not self.direct:  # fell back: the tail went through the file object, unpadded
                self.f.flush()
                return
            os.ftruncate(self.fd, self.nbytes)
        self._plain()
        os.lseek(self.fd, self.nbytes, os.SEEK_SET)


def npy_header(shape: tuple, dtype: np.dtype, align: int | None = None) -> bytes:
    """A version-1.0 .npy header for a C-ordered array (what np.save writes). With `align`, the
    header is padded (spaces, as the format allows) to exactly `align` bytes, so the data starts
    at that file offset: a page boundary for align=4096 (direct writes, page-aligned maps)."""
    buf = _BytesSink()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                               "fortran_order": False, "shape": tuple(shape)})
    h = buf.data
    if align and len(h) < align:
        h = h[:-1] + b" " * (align - len(h)) + b"\n"
        h = h[:8] + np.uint16(len(h) - 10).tobytes() + h[10:]
    return h


class _BytesSink:
    def __init__(self):
        self.data = b""

    def write(self, b):
        self.data += bytes(b)


def write_npy_atomic(path: str, arrays, shape: tuple, dtype) -> dict:
    """Write a .npy whose rows come from the iterable `arrays` (each C-contiguous, of dtype),
    atomically. Returns {"rows", "bytes", "sha256"}. Rows are streamed: memory stays bounded."""
    dtype = np.dtype(dtype)
    with atomic_file(path) as f:
        w = HashingWriter(f)
        w.write(npy_header(shape, dtype))
        rows = 0
        for a in arrays:
            if a.dtype != dtype:
                raise TypeError(f"write_npy_atomic: {path}: chunk dtype {a.dtype} != {dtype}")
            w.write(np.ascontiguousarray(a))
            rows += a.shape[0]
        if rows != shape[0]:
            raise ValueError(f"write_npy_atomic: {path}: wrote {rows} rows, header says {shape[0]}")
    return {"rows": rows, **w.record()}


def write_bytes_atomic(path: str, data: bytes) -> dict:
    with atomic_file(path) as f:
        f.write(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_json_atomic(path: str, obj) -> None:
    # sort_keys + fixed indent: the manifest of a resumed run is byte-identical too.
    write_bytes_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def copy_atomic(src: str, dst: str) -> dict:
    with fsio.open(src, "rb") as fin, atomic_file(dst) as f:
        w = HashingWriter(f)
        while chunk := fin.read(1 << 22):
            w.write(chunk)
    return w.record()


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with fsio.open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def remove_tmp_files(folder: str) -> int:
    """Delete `*.tmp-*` leftovers of a killed run below `folder`; returns how many."""
    n = 0
    if fsio.is_url(folder):  # temp files are local: nothing is ever left on the store
        return 0
    for root, _, files in os.walk(folder):
        for name in files:
            if TMP_MARK in name:
                os.unlink(os.path.join(root, name))
                n += 1
    return n


def rmtree_if_exists(path: str) -> None:
    if fsio.is_url(path):
        fsio.rm(path)
        return
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.unlink(path)
