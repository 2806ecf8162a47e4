"""Small on-disk datasets in the layouts `semcomp compress` reads (written by the tests)."""

from __future__ import annotations

import hashlib
import os

import numpy as np

ROWS = (70, 33, 5)


def make_clip_layout(root, rows=ROWS, dim=16, dtype=np.float32, seed=0, metadata=True, mods=("img", "text")):
    rng = np.random.default_rng(seed)
    data = {m: [] for m in mods}
    for m in mods:
        os.makedirs(os.path.join(root, f"{m}_emb"), exist_ok=True)
    if metadata:
        import pyarrow as pa
        import pyarrow.parquet as pq

        os.makedirs(os.path.join(root, "metadata"), exist_ok=True)
    for i, n in enumerate(rows):
        for m in mods:
            a = rng.standard_normal((n, dim)).astype(dtype)
            np.save(os.path.join(root, f"{m}_emb", f"{m}_emb_{i:04d}.npy"), a)
            data[m].append(a)
        if metadata:
            pq.write_table(pa.table({"caption": [f"s{i}r{j}" for j in range(n)], "row": np.arange(n)}),
                           os.path.join(root, "metadata", f"metadata_{i:04d}.parquet"))
    return {m: np.concatenate(v) for m, v in data.items()}


def make_parquet_layout(root, data: dict, rows=ROWS):
    """embedding-reader style: one folder per modality of parquet shards, `embedding` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folders = []
    for m, x in data.items():
        folder = os.path.join(root, m)
        os.makedirs(folder, exist_ok=True)
        start = 0
        for i, n in enumerate(rows):
            part = x[start : start + n]
            start += n
            col = pa.array(list(part), type=pa.list_(pa.from_numpy_dtype(part.dtype)))
            # small row groups so reads cross row-group boundaries
            pq.write_table(pa.table({"embedding": col}), os.path.join(folder, f"part_{i:04d}.parquet"), row_group_size=7)
        folders.append(folder)
    return folders


def make_concepts(folder, rows=ROWS, n_ids=9, seed=1):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    ids = []
    for i, n in enumerate(rows):
        c = rng.integers(0, n_ids, n) * 1000003  # sparse, large ids
        np.save(os.path.join(folder, f"ids_{i:04d}.npy"), c)
        ids.append(c)
    return np.concatenate(ids)


def load_centroids(out):
    import glob

    return np.concatenate([np.load(f) for f in sorted(glob.glob(os.path.join(out, "centroids", "*.npy")))])


def tree_sha(out) -> dict:
    """sha256 of every file under out (relative path -> digest)."""
    res = {}
    for d, _, files in os.walk(out):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                res[os.path.relpath(p, out)] = hashlib.sha256(fh.read()).hexdigest()
    return res


def make_labelled_clusters(root, n: int = 240, dim: int = 32, classes: int = 3, seed: int = 0):
    """Two modalities (`root/in/{img,text}_emb`) of `classes` separated clusters, with labels
    in `root/lab/labels_0000.npy`; returns the labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    mu = rng.standard_normal((classes, dim)) * 3
    for m in ("img", "text"):
        os.makedirs(os.path.join(root, "in", f"{m}_emb"))
        x = (mu[y] + rng.standard_normal((n, dim))).astype(np.float32)
        np.save(os.path.join(root, "in", f"{m}_emb", f"{m}_emb_0000.npy"), x)
    os.makedirs(os.path.join(root, "lab"))
    np.save(os.path.join(root, "lab", "labels_0000.npy"), y)
    return y
