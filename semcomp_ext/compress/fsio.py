"""Paths or URLs: local files through `os`, anything else (`s3://`, `gs://`, `memory://`, ...)
through fsspec, imported only when a URL is given.

A `file://` URL is the local path it names (the local code path, byte for byte). Storage
options (credentials, endpoint, ...) are set once per process with `configure` — by
`compress` / `verify` / `open_compressed`, and by every task from its plan (Ray workers) —
and are never written to a manifest or a log line.
"""

from __future__ import annotations

import os
import posixpath

_OPTIONS: dict = {}


def configure(storage_options: dict | None) -> None:
    """The fsspec storage options every URL of this process is opened with."""
    global _OPTIONS
    opts = dict(storage_options or {})
    if opts != _OPTIONS:
        _OPTIONS = opts


def storage_errors() -> tuple:
    """Exception types of an unreachable or refusing store, for a one-line CLI error: OSError,
    and botocore's / aiohttp's errors (an S3 endpoint that cannot be reached is not an
    OSError) when those packages are loaded — looked up, never imported here. Evaluate it in
    the `except` clause, after the backend has been loaded."""
    import sys

    errors = [OSError]
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is not None:
        errors += [botocore.BotoCoreError, botocore.ClientError]
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and hasattr(aiohttp, "ClientError"):
        errors.append(aiohttp.ClientError)
    return tuple(errors)


def parse_storage_options(text: str | None) -> dict:
    """--storage-options JSON -> dict. The error never echoes the text (it may hold secrets)."""
    if not text:
        return {}
    import json

    try:
        opts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options must be a JSON object: invalid JSON at character {exc.pos}") from None
    if not isinstance(opts, dict):
        raise ValueError(f"--storage-options must be a JSON object, got a JSON {type(opts).__name__}")
    return opts


def is_url(path) -> bool:
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def local(path):
    """file:///a/b -> /a/b; anything else unchanged."""
    if isinstance(path, str) and path.startswith("file://"):
        return path[len("file://"):] or "/"
    return path


def abspath(path: str) -> str:
    path = local(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def get_fs(url: str):
    """(fsspec filesystem, path without protocol) of a URL."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec comes with s3fs / gcsfs
        raise ImportError(f"{url.split('://')[0]}:// URLs need fsspec and its backend: "
                          "pip install 'semcomp-ext[s3]' (s3fs) or gcsfs, adlfs, ...") from exc
    try:
        return fsspec.core.url_to_fs(url, **_OPTIONS)
    except ImportError as exc:
        raise ImportError(f"{url.split('://')[0]}:// URLs: {exc}") from None
    except TypeError as exc:  # an option the backend does not take (the message names it, no value)
        raise ValueError(f"{url}: --storage-options rejected by the storage backend: {exc}") from None
    except ValueError as exc:  # e.g. an unknown protocol
        raise ValueError(f"{url}: {exc}") from None


def refresh(url: str) -> None:
    """Drop fsspec's cached listings below url (another process may have written there)."""
    if is_url(url):
        fs, p = get_fs(url)
        fs.invalidate_cache(p)


def existing_folder(path, who: str, storage_options: dict | None = None) -> str:
    """The folder `path` (a local path or URL; a URL without its trailing slash and with this
    process's listing cache dropped, since another process may have written there), after
    setting `storage_options` when given. FileNotFoundError naming `who` if it is no folder."""
    path = local(os.fspath(path))
    if storage_options is not None:
        configure(storage_options)
    if is_url(path):
        path = path.rstrip("/")
        refresh(path)
    if not isdir(path):
        raise FileNotFoundError(f"{who}: path {path!r} is not a folder")
    return path


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = get_fs(path)
    return fs.exists(p)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = get_fs(path)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = get_fs(path)
    return fs.isfile(p)


def listdir(path: str) -> list:
    """Names of the entries of a folder (files and sub-folders / prefixes)."""
    if not is_url(path):
        return os.listdir(path)
    fs, p = get_fs(path)
    return [posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False) if e.rstrip("/") != p.rstrip("/")]


def _mtime_ns(info: dict) -> int:
    import datetime

    for key in ("LastModified", "mtime", "updated", "created", "last_modified"):
        v = info.get(key)
        if v is None:
            continue
        if isinstance(v, str):
            try:
                v = datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
            except ValueError:
                continue
        if isinstance(v, datetime.datetime):
            v = v.timestamp()
        try:
            return int(round(float(v) * 1e9))
        except (TypeError, ValueError):
            continue
    return 0


def stat(path: str) -> tuple:
    """(size in bytes, modification time in ns) of a file; FileNotFoundError if missing."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    fs, p = get_fs(path)
    info = fs.info(p)
    if info.get("type") == "directory":
        raise IsADirectoryError(f"{path} is a folder")
    return int(info["size"]), _mtime_ns(info)


def getsize(path: str) -> int:
    return stat(path)[0]


# Read-ahead of a URL file opened to read a header or a footer: fsspec's default block (s3fs:
# 50 MiB) would fetch a whole shard only to check its .npy header, and the job reads it again.
HEAD_BLOCK = 1 << 16


def open(path: str, mode: str = "rb", block_size: int | None = None):  # noqa: A001 - the builtin for local paths
    """A file object for a local path or a URL; `block_size` (URLs): the read-ahead block."""
    if not is_url(path):
        import builtins

        return builtins.open(path, mode)
    fs, p = get_fs(path)
    return fs.open(p, mode) if block_size is None else fs.open(p, mode, block_size=block_size)


def open_unbuffered(path: str):
    """A binary reader with readinto: an unbuffered local file, or fsspec's (read-ahead) file."""
    if not is_url(path):
        import builtins

        return builtins.open(path, "rb", buffering=0)
    fs, p = get_fs(path)
    return fs.open(p, "rb")


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    fs, p = get_fs(path)
    fs.makedirs(p, exist_ok=True)


def put_file(src: str, url: str) -> None:
    """Upload a local file whole: on object stores the object appears only when complete."""
    fs, p = get_fs(url)
    try:
        fs.put_file(src, p)
    except FileNotFoundError:  # a filesystem with real folders (sftp, hdfs, ...): make the parent
        fs.makedirs(fs._parent(p), exist_ok=True)
        fs.put_file(src, p)


def cat_many(urls: list) -> dict:
    """url -> bytes, fetched concurrently where the backend can."""
    if not urls:
        return {}
    fs, _ = get_fs(urls[0])
    paths = [get_fs(u)[1] for u in urls]
    got = fs.cat(paths)
    if not isinstance(got, dict):  # one path
        got = {paths[0]: got}
    return {u: got[p] for u, p in zip(urls, paths)}


def sizes_under(url: str) -> dict:
    """relative path -> size of every object below url (one listing, fresh)."""
    fs, p = get_fs(url)
    fs.invalidate_cache(p)
    if not fs.exists(p):
        return {}
    base = p.rstrip("/") + "/"
    return {k[len(base):]: int(v.get("size") or 0) for k, v in fs.find(p, detail=True).items() if k.startswith(base)}


def find(url: str) -> list:
    """URLs of every object below url (fresh listing), sorted."""
    fs, p = get_fs(url)
    fs.invalidate_cache(p)
    if not fs.exists(p):
        return []
    base = p.rstrip("/") + "/"
    return sorted(url.rstrip("/") + "/" + k[len(base):] for k in fs.find(p) if k.startswith(base))


def rm(path: str) -> None:
    """Remove a file or a folder (recursively) if it exists."""
    if not is_url(path):
        import shutil

        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.unlink(path)
        return
    fs, p = get_fs(path)
    fs.invalidate_cache(p)
    if fs.exists(p):
        fs.rm(p, recursive=True)
        fs.invalidate_cache(p)
