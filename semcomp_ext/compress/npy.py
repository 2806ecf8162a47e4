""".npy shards: the header parsed and checked against the file size before any work starts
(Python integers: a shape whose product overflows int64 is refused, never wrapped), and rows
read in blocks: a local file as private memory maps of each block's rows (no copy out of the
page cache, resident memory bounded by the block size), a URL with `readinto` into two reused
buffers, one block ahead."""

from __future__ import annotations

import math
import os
import re

import numpy as np

from . import fsio
from .shard import InlineExecutor, Shard

# the header np.save writes (format 1.0), parsed without ast.literal_eval (~0.2 ms a file: the
# bulk of opening a small shard); anything else goes through numpy's own reader
_NPY_HEADER = re.compile(rb"\{'descr': '([<>|=]?[A-Za-z]\d*)', 'fortran_order': (False|True), "
                         rb"'shape': \(((?:\d+, ?)*\d*)\), \} *\n")


def read_header(f) -> tuple:
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
            shape, fortran, dtype, offset = read_header(f)
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


def iter_npy_buffered(shard: Shard, batch: int):
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


def iter_npy_mapped(shard: Shard, batch: int):
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


def iter_npy(shard: Shard, batch: int):
    """Blocks of `batch` rows (the last may be shorter): mapped for a local file, read ahead
    into reused buffers for a URL."""
    if fsio.is_url(shard.path):
        return iter_npy_buffered(shard, batch)
    return iter_npy_mapped(shard, batch)
