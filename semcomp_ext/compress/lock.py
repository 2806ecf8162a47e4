"""One writer per output folder: OUT/.semcomp.lock.

Local folders: the lock file is created (never through a symlink) and held with `flock` for
the life of the job; it holds the holder's host, pid and start time. The kernel drops an
flock when its process dies, so a lock file that can be flocked is stale: left by a job that
was killed (kill -9, a lost node). It is then taken over and named in `OutputLock.stale`; a
lock that is held is a refusal (`FolderLockedError`, one line naming the holder).

Object stores: the lock object is created with a conditional PUT (`If-None-Match: *`, through
fsspec's `pipe_file(mode="create")`): of two jobs exactly one gets it. Stores where semcomp
knows no such atomic create (CONDITIONAL_CREATE lists the protocols that have one) cannot be
locked: such an output is refused (`FolderLockedError`), rather than left open to two writers. A lock
object whose holder is a dead process of this host is stale and replaced; one from another
host is a refusal (its liveness cannot be known): remove it by hand once that job is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time

from . import fsio

LOCK = ".semcomp.lock"
# fsspec protocols whose pipe_file(mode="create") is an atomic conditional create: S3's PUT with
# If-None-Match: * (s3fs), and the in-process memory store. Others are refused (see above).
CONDITIONAL_CREATE = {"s3", "s3a", "memory"}


class FolderLockedError(FileExistsError):
    """Another job holds the output folder (or it cannot be locked)."""


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unknown job (unreadable lock)"
    started = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else ""
    return f"{holder.get('command', 'semcomp')} pid {holder.get('pid')} on host {holder.get('host')}{when}"


def _parse(data: bytes) -> dict | None:
    try:
        h = json.loads(data)
    except ValueError:
        return None
    return h if isinstance(h, dict) else None


class OutputLock:
    """The held lock of one output folder; `release()` (or the context exit) removes it."""

    def __init__(self, out: str, command: str = "semcomp compress"):
        self.out, self.path = out, fsio.join(out, LOCK)
        self.command = command
        self.fd = -1
        self.stale: dict | None = None  # the holder of a stale lock that was taken over
        self.held = False

    def _payload(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                           "command": self.command}).encode()

    def acquire(self) -> OutputLock:
        fsio.makedirs(self.out)
        (self._acquire_url if fsio.is_url(self.out) else self._acquire_local)()
        self.held = True
        return self

    def _acquire_local(self) -> None:
        import fcntl

        if os.path.islink(self.out):
            real = os.path.realpath(self.out)
            if not os.path.isdir(real):
                raise FolderLockedError(f"output folder {self.out} is a symlink to {real}, not a folder")
        for _ in range(10):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            except OSError as exc:
                raise FolderLockedError(f"cannot create the lock {self.path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _parse(os.pread(fd, 4096, 0))
                os.close(fd)
                raise FolderLockedError(f"output folder {self.out} is in use by {_describe(holder)} "
                                        f"(lock {self.path}); wait for that job to end") from None
            # the file we locked must still be the one at the path (a releasing job unlinks it)
            try:
                same = os.fstat(fd).st_ino == os.lstat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            old = os.pread(fd, 4096, 0)
            if old:
                self.stale = _parse(old) or {}
            data = self._payload()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
            self.fd = fd
            return
        raise FolderLockedError(f"cannot lock {self.path}: it keeps being replaced")

    def _acquire_url(self) -> None:
        fs, p = fsio.get_fs(self.path)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        if not protocols & CONDITIONAL_CREATE:
            raise FolderLockedError(f"{self.out}: semcomp knows no atomic conditional create on {type(fs).__name__} "
                                    "stores, so the folder cannot be locked against a second job; write to a local "
                                    "folder or an S3-compatible store")
        for _ in range(2):
            try:
                fs.pipe_file(p, self._payload(), mode="create")
                return
            except FileExistsError:
                pass
            except NotImplementedError:
                raise FolderLockedError(f"{self.out}: the {type(fs).__name__} store cannot create the lock object "
                                        "conditionally; write to a local folder or an S3-compatible store") from None
            except Exception as exc:  # botocore's PreconditionFailed when not translated
                if "PreconditionFailed" not in repr(exc) and "412" not in str(exc):
                    raise
            fs.invalidate_cache(p)
            try:
                holder = _parse(fs.cat_file(p))
            except FileNotFoundError:
                continue  # released in between: try again
            if holder and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                self.stale = holder
                fs.rm(p)
                continue
            raise FolderLockedError(f"output folder {self.out} is in use by {_describe(holder)} (lock object "
                                    f"{self.path}); wait for that job to end, or remove the lock object if it is gone")
        raise FolderLockedError(f"cannot lock {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if fsio.is_url(self.out):
            try:
                fsio.rm(self.path)
            except Exception:  # noqa: BLE001 - a store gone away: the lock object stays, named on the next run
                pass
            return
        try:
            os.unlink(self.path)  # while still flocked: a waiting job re-opens the path afresh
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = -1

    def release_soon(self, timeout: float = 2.0) -> None:
        """release(), but a store that does not answer within `timeout` seconds leaves its lock
        object behind (named as stale by the next job of this host) instead of holding up the
        exit, e.g. after Ctrl-C on a stalled store."""
        if not fsio.is_url(self.out):
            return self.release()
        import threading

        t = threading.Thread(target=self.release, daemon=True, name="semcomp-unlock")
        t.start()
        t.join(timeout)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_note(lock: OutputLock) -> str | None:
    """The one line that names a stale lock taken over, or None."""
    if lock.stale is None:
        return None
    return f"took over the stale lock of {_describe(lock.stale)}, which is no longer running"
