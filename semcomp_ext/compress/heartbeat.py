"""Progress for blocking steps (faiss training, codec fitting) and faiss's thread count.

A faiss `train` is one C call that holds the caller for seconds to minutes: nothing can print
from inside it. `Heartbeat` runs a daemon thread that prints one line every `every` seconds
while the step runs (to a terminal or a pipe alike), and measures the step itself, so the
duration it reports is the step's own:

    with Heartbeat("codec faiss:OPQ16,PQ16: fitting on 65,536 x 256", quiet=False) as hb:
        index.train(sample)
    hb.seconds   # wall time of the body

prints `semcomp codec faiss:OPQ16,PQ16: fitting on 65,536 x 256 ...` at the start,
`... 10 s elapsed` every 10 s, and `... done in 41.3 s` at the end. `status` (a callable
returning a short string) adds the step's own counter to each line, e.g. rows added so far.

`faiss_threads(n)` sets faiss's OpenMP threads for a block and restores them after; by default
`default_threads()`: fewer on a busy machine, where OpenMP's spinning barriers stall.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager

__all__ = ["Heartbeat", "default_threads", "faiss_threads", "usable_cores", "HEARTBEAT_SECONDS"]

HEARTBEAT_SECONDS = 10.0


def usable_cores() -> int:
    """The cores this process may run on (affinity / cgroup cpusets), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> int:
    """faiss's threads: $OMP_NUM_THREADS when set to a positive count; else the usable cores
    less the machine's excess load (1-minute load average beyond this process's own 1),
    at least 1. faiss's OpenMP regions end in barriers where threads spin: a thread that the
    scheduler hands to another process stalls its siblings for a time slice per region. On
    the 2-core VM at load ~10, a PQ8 fit on 4096 x 64 took 16 s on 2 threads and 2 s on 1
    (0.6 s on 2 with OMP_WAIT_POLICY=PASSIVE, which must be set before torch is imported)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except OSError:
        return cores
    return max(1, min(cores, round(cores + 1 - load)))


class Heartbeat:
    """Context manager: a start line, a line every `every` seconds from a daemon thread while
    the body runs, an end line with the body's wall time (`seconds`). Nothing when quiet; the
    timing is measured either way."""

    def __init__(self, label: str, *, quiet: bool = True, every: float = HEARTBEAT_SECONDS, stream=None,
                 status=None, prefix: str = "semcomp "):
        if not every > 0:
            raise ValueError(f"Heartbeat: every must be > 0 seconds, got {every!r}")
        self.label, self.quiet, self.every, self.status, self.prefix = label, quiet, every, status, prefix
        self.stream = stream
        self.seconds: float | None = None
        self.beats = 0
        self._stop = threading.Event()
        self._thread = None
        self._t0 = 0.0

    def _print(self, text: str, status: bool = True) -> None:
        stream = self.stream or sys.stderr
        extra = ""
        if status and self.status is not None:
            try:
                extra = f", {self.status()}"
            except Exception:  # a status callback must never break the step it reports on
                extra = ""
        try:
            print(f"{self.prefix}{self.label}{text}{extra}", file=stream, flush=True)
        except (OSError, ValueError):  # closed or broken stream: progress is best effort
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.beats += 1
            self._print(f" ... {time.perf_counter() - self._t0:.0f} s elapsed")

    def __enter__(self) -> Heartbeat:
        self._t0 = time.perf_counter()
        if not self.quiet:
            self._print(" ...", status=False)
            self._thread = threading.Thread(target=self._run, name="semcomp-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._print(f" ... {'done' if exc_type is None else 'failed'} in {self.seconds:.1f} s")


@contextmanager
def faiss_threads(n: int | None = None):
    """faiss's OpenMP threads set to `n` for the block (default: $OMP_NUM_THREADS when set,
    else the usable cores), restored after (nothing is set without faiss). faiss's own default is the machine's core count,
    which oversubscribes a process confined to fewer cores."""
    if n is None:
        n = default_threads()
    try:
        import faiss
    except ImportError:  # the caller's own faiss import names the missing package
        yield int(n)
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n))
    try:
        yield int(n)
    finally:
        faiss.omp_set_num_threads(old)
