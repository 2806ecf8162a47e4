"""Progress of a long step on stderr: a tqdm bar on a terminal; elsewhere (a pipe, a log file)
a log line every `interval` seconds and one at the end; nothing when quiet. Every command
(compress, gap, eval) reports through it, so all behave alike."""

from __future__ import annotations

import sys
import time


class Progress:
    """A tqdm bar when `stream` is a terminal; otherwise a log line every `interval` seconds
    (tasks done/total, rows, GB, GB/s, ETA) and one at the end; nothing when quiet. `unit`
    "tasks" names what `total_tasks` counts ("shards", "steps")."""

    def __init__(self, total_bytes: int, total_tasks: int, quiet: bool = False, desc: str = "compress",
                 interval: float = 5.0, stream=None, unit: str = "tasks"):
        self.stream = stream or sys.stderr
        self.total_bytes, self.total_tasks, self.desc, self.interval = total_bytes, total_tasks, desc, interval
        self.bytes = self.tasks = self.rows = self.start_bytes = 0
        self.t0 = self.last = time.monotonic()
        self.bar, self.log, self.unit = None, False, unit
        if quiet:
            return
        if self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, file=self.stream)
        else:
            self.log = True

    def skip(self, nbytes: int, tasks: int, rows: int = 0) -> None:
        """Work done by an earlier (resumed) run: counted as done (the line counts the whole
        job), not in the rate."""
        self.start_bytes += nbytes
        self.update(nbytes, tasks, rows)

    def update(self, nbytes: int, tasks: int = 1, rows: int = 0) -> None:
        self.bytes += nbytes
        self.tasks += tasks
        self.rows += rows
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.log and time.monotonic() - self.last >= self.interval:
            self._line()

    def _line(self) -> None:
        self.last = now = time.monotonic()
        dt = max(now - self.t0, 1e-9)
        rate = (self.bytes - self.start_bytes) / dt
        left = self.total_bytes - self.bytes
        eta = f"{int(left / rate) // 60}:{int(left / rate) % 60:02d}" if rate > 0 else "?"
        size = (f", {self.bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB, {rate / 1e9:.2f} GB/s"
                if self.total_bytes else "")  # steps without a byte count (eval): no GB figures
        print(f"semcomp {self.desc}: {self.tasks}/{self.total_tasks} {self.unit}, {self.rows:,} rows{size}, "
              f"{dt:.1f} s, ETA {eta}", file=self.stream, flush=True)

    def abort(self) -> None:
        """Stop reporting without a final line (the step failed: its error is the last word)."""
        self.log = False
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.log:
            self._line()
            self.log = False
