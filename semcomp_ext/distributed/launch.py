"""Run a function on W spawned processes joined in a torch.distributed process group.

Used by the tests and benchmarks: ``launch(fn, world_size, args)`` returns the W return values
(ordered by rank) or raises RuntimeError naming the rank that failed or the deadline that
passed. No call can hang: the process group has its own timeout (collectives whose peers never
arrive fail) and the parent kills its children when ``timeout`` seconds pass.
fn must be importable (module level) and return picklable, preferably plain Python, values.
"""

from __future__ import annotations

import datetime
import os
import queue as queue_mod
import socket
import time
import traceback

__all__ = ["free_port", "launch"]


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, results, backend, pg_timeout, threads):
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        out = fn(rank, world_size, *args)
        results.put((rank, True, out))
    except BaseException as exc:  # reported to the parent, which raises
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(fn, world_size: int, args=(), *, timeout: float = 90.0, backend: str = "gloo",
           pg_timeout: float = 30.0, threads: int = 1) -> list:
    """fn(rank, world_size, *args) on world_size spawned processes; their results by rank."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, results, backend, pg_timeout, threads), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    got: dict[int, tuple[bool, object]] = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"launch: ranks {sorted(set(range(world_size)) - set(got))} did not finish within {timeout:.0f} s")
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
                got[rank] = (ok, out)
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"launch: rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result")
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
    failed = [(r, out) for r, (ok, out) in sorted(got.items()) if not ok]
    if failed:
        raise RuntimeError(f"launch: rank {failed[0][0]} failed:\n{failed[0][1]}")
    return [got[r][1] for r in range(world_size)]
