"""What the readers hand on: a validated input shard (`Shard`), a modality's shards, the block
size, and the small helpers every reader uses."""

from __future__ import annotations

from dataclasses import dataclass, field




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
