"""manifest.json of a compressed folder: what was done, from what, and checksums to verify it.

The manifest is rewritten atomically after every finished shard with "status": "in_progress"
and only at the very end with "status": "complete" — a folder whose manifest is not complete
is never mistaken for finished output, and `--resume` knows which shards are done.
"""

from __future__ import annotations

import json
import os

from .atomic import sha256_file, write_json_atomic

FORMAT = "semcomp-compress/1"
MANIFEST = "manifest.json"


def manifest_path(out: str) -> str:
    return os.path.join(out, MANIFEST)


def load(out: str) -> dict:
    path = manifest_path(out)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no {MANIFEST} in {out}")
    try:
        with open(path) as f:
            m = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt manifest {path}: {exc}") from exc
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown manifest format {m.get('format')!r} (expected {FORMAT})")
    return m


def save(out: str, m: dict) -> None:
    write_json_atomic(manifest_path(out), m)


def output_files(m: dict):
    """(relative path, expected sha256, expected bytes) of every file the manifest vouches for."""
    for sh in m.get("shards", []):
        for key in ("centroids", "metadata", "concepts"):
            f = sh.get(key)
            if f:
                yield f["file"], f["sha256"], f["bytes"]


def file_ok(out: str, rec: dict) -> bool:
    path = os.path.join(out, rec["file"])
    return os.path.exists(path) and os.path.getsize(path) == rec["bytes"] and sha256_file(path) == rec["sha256"]


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
    try:
        from ..features import RandomFeatureSelector

        RandomFeatureSelector.from_dict(rfs)
    except ValueError as exc:
        problems.append(f"RFS index: {exc}")
    total = 0
    for rel, sha, nbytes in output_files(m):
        path = os.path.join(out, rel)
        if not os.path.exists(path):
            problems.append(f"missing file {rel}")
        elif os.path.getsize(path) != nbytes:
            problems.append(f"{rel}: size {os.path.getsize(path)} != manifest {nbytes}")
        elif sha256_file(path) != sha:
            problems.append(f"{rel}: sha256 mismatch")
    for sh in shards:
        c = sh["centroids"]
        path = os.path.join(out, c["file"])
        if os.path.exists(path):
            try:
                a = np.load(path, mmap_mode="r")
                if a.shape != (sh["rows"], keep):
                    problems.append(f"{c['file']}: shape {a.shape} != ({sh['rows']}, {keep})")
                if a.dtype.name != m["parameters"]["out_dtype"]:
                    problems.append(f"{c['file']}: dtype {a.dtype} != {m['parameters']['out_dtype']}")
            except Exception as exc:
                problems.append(f"{c['file']}: unreadable .npy ({exc})")
        total += sh["rows"]
    if "rows_out" in m and total != m["rows_out"]:
        problems.append(f"shard rows sum to {total}, manifest rows_out is {m['rows_out']}")
    return problems
