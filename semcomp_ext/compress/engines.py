"""Executors for shard tasks. Both call the same task functions (pipeline.py) and hand each
finished record to `on_done` on the driver, which owns the manifest; only the scheduling
differs, so the bytes written are the same."""

from __future__ import annotations

import json
import os


def run_local(fn, plan, items, on_done, workers: int = 1) -> None:
    """Run fn(plan, i) for each item on `workers` threads (the heavy parts — readinto, the
    torch kernels, writes and sha256 — release the GIL). At most `workers` tasks run at once,
    each holding a few blocks, so memory is bounded by workers x blocks. Records reach
    on_done (on this thread) as tasks finish, in any order. On an error the running tasks
    finish and are committed, nothing new starts, and the first error is raised."""
    items = list(items)
    workers = max(1, min(workers, len(items)))
    if workers == 1:
        for i in items:
            on_done(fn(plan, i))
        return
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    import torch

    threads = torch.get_num_threads()
    # the cores are shared out between the workers: no oversubscription by intra-op threads
    torch.set_num_threads(max(1, threads // workers))
    error = None
    pool = ThreadPoolExecutor(workers, thread_name_prefix="semcomp-task")
    try:
        todo, running = iter(items), set()
        while True:
            while error is None and len(running) < workers:
                i = next(todo, None)
                if i is None:
                    break
                running.add(pool.submit(fn, plan, i))
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                if f.exception() is not None:
                    error = error or f.exception()
                else:
                    on_done(f.result())
    except BaseException:
        # Ctrl-C (or an error on this thread): return at once, without joining tasks that may
        # be stuck in a stalled store's requests; what they write is never committed
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        torch.set_num_threads(threads)
    if error is not None:
        raise error


def require_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        raise ImportError("--engine ray needs Ray Data: pip install 'semcomp-ext[ray]'") from exc
    return ray


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Connect to a cluster (address, or RAY_ADDRESS) or start a local Ray. An already
    initialised Ray (tests, notebooks) is reused as is."""
    ray = require_ray()
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    return ray


def _ray_worker(fn, plan, row):
    import torch

    # one Ray CPU per task: keep torch from oversubscribing the node's cores
    torch.set_num_threads(1)
    return {"record": json.dumps(fn(plan, int(row["item"])))}


def run_ray(fn, plan, items, on_done, address: str | None = None, workers: int | None = None) -> None:
    """One Ray Data row per shard task; results stream back (any order) to on_done. `workers`:
    at most this many tasks at once (and the CPUs of a local Ray started here); None: every
    CPU of the cluster."""
    if not items:
        return
    ray = init_ray(address, num_cpus=workers)
    ds = ray.data.from_items([{"item": int(i)} for i in items], override_num_blocks=len(items))
    ds = ds.map(lambda row: _ray_worker(fn, plan, row), num_cpus=1, **({"concurrency": workers} if workers else {}))
    for row in ds.iter_rows():
        on_done(json.loads(row["record"]))
