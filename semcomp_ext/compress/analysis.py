"""`semcomp gap` (streamed geometry of a folder) and `semcomp eval` (downstream accuracy of
compressed vs original embeddings)."""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from .readers import DEFAULT_BATCH_ROWS, discover, iter_chunks, list_shards, open_shard, validate


def gap_report(inputs: list, *, batch_size: int = DEFAULT_BATCH_ROWS, column: str = "embedding", quiet: bool = False) -> dict:
    """One pass over the shards with O(M*D + D^2) state: per-modality sums of unit vectors
    (modality gap, as metrics.modality_gaps), per-pair cosine sums (metrics.true_pair_cosine),
    and the pooled second-moment matrix (metrics.explained_variance's PCA spectrum)."""
    from tqdm import tqdm

    from ..metrics import ExplainedVariance

    mods, _ = discover(inputs, None, column)
    dim, _, _ = validate(mods, None, column)
    m = len(mods)
    unit_sum = torch.zeros(m, dim, dtype=torch.float64)
    pair_cos = torch.zeros(m, m, dtype=torch.float64)
    s1 = torch.zeros(dim, dtype=torch.float64)
    s2 = torch.zeros(dim, dim, dtype=torch.float64)
    n = 0
    total = sum(s.rows for s in mods[0].shards)
    with tqdm(total=total, unit="row", unit_scale=True, desc="gap", disable=quiet or not sys.stderr.isatty()) as bar:
        for i in range(len(mods[0].shards)):
            for chunk in zip(*(iter_chunks(mm.shards[i], batch_size) for mm in mods)):
                zs = [torch.from_numpy(np.array(c, dtype=np.float64)) for c in chunk]
                units = [torch.nn.functional.normalize(z, dim=1) for z in zs]
                for a in range(m):
                    unit_sum[a] += units[a].sum(0)
                    for b in range(a + 1, m):
                        pair_cos[a, b] += (units[a] * units[b]).sum()
                    s1 += zs[a].sum(0)
                    s2 += zs[a].T @ zs[a]
                n += zs[0].shape[0]
                bar.update(zs[0].shape[0])
    if n < 2:
        raise ValueError(f"gap: need at least 2 rows, got {n}")
    means = unit_sum / n
    gaps = torch.cdist(means, means)
    iu = torch.triu_indices(m, m, 1)
    pooled = n * m
    mu = s1 / pooled
    cov = (s2 - pooled * torch.outer(mu, mu)) / (pooled - 1)
    eig = torch.linalg.eigvalsh(cov).flip(0).clamp(min=0)
    ratio = eig / eig.sum() if eig.sum() > 0 else torch.zeros_like(eig)
    ev = ExplainedVariance(ratio, ratio.cumsum(0), {})
    names = [mm.name for mm in mods]
    return {
        "modalities": names, "rows": n, "dim": dim,
        "modality_gap": {f"{names[a]}-{names[b]}": float(gaps[a, b]) for a, b in zip(iu[0].tolist(), iu[1].tolist())},
        "mean_modality_gap": float(gaps[iu[0], iu[1]].mean()),
        "true_pair_cosine": {f"{names[a]}-{names[b]}": float(pair_cos[a, b] / n) for a, b in zip(iu[0].tolist(), iu[1].tolist())},
        "explained_variance_components": {str(f): min(ev.n_components(f), dim) for f in (0.9, 0.95, 0.99)},
        "explained_variance_ratio_top10": [float(r) for r in ratio[:10]],
    }


def _read_rows(shards, max_rows: int, batch: int) -> np.ndarray:
    out, have = [], 0
    for s in shards:
        for c in iter_chunks(s, batch):
            out.append(np.array(c[: max_rows - have]))
            have += out[-1].shape[0]
            if have >= max_rows:
                return np.concatenate(out)
    return np.concatenate(out) if out else np.zeros(0)


def _read_decoded(folder: str, man: dict, codec, max_rows: int) -> np.ndarray:
    """The first max_rows rows of a compressed folder, decoded to float32 by its codec."""
    out, have = [], 0
    for sh in man["shards"]:
        if have >= max_rows:
            break
        codes = np.load(os.path.join(folder, sh["centroids"]["file"]), mmap_mode="r")[: max_rows - have]
        out.append(codec.decode(np.asarray(codes)))
        have += out[-1].shape[0]
    return np.concatenate(out) if out else np.zeros((0, man["rfs"]["keep"]), np.float32)


def eval_report(inputs, compressed: str, labels: str, *, label_column: str = "label", test_fraction: float = 0.2,
                max_rows: int = 200000, k: int = 10, seed: int = 0, column: str = "embedding") -> dict:
    """Linear-probe and kNN accuracy of the compressed centroids vs the original embeddings
    (each modality alone, and all modalities concatenated — the paper's baseline), plus
    retrieval recall@k: original modality 0 -> 1, and each modality's RFS-reduced embedding
    -> its compressed centroid. Uses the first max_rows rows (held in memory)."""
    from .. import compression_ratio, select_features
    from ..eval import knn_accuracy, linear_probe_accuracy, retrieval_recall
    from . import manifest
    from .codecs import codec_from_manifest

    man = manifest.load(compressed)
    if man["parameters"]["mode"] != "pairs":
        raise ValueError("eval: needs a pairs-mode output (one centroid per input row)")
    if man.get("invalid_rows_skipped"):
        raise ValueError("eval: the compressed folder skipped invalid rows; rows no longer align with the labels")
    if not 0 < test_fraction < 1:
        raise ValueError(f"eval: --test-fraction must be in (0, 1), got {test_fraction}")
    mods, _ = discover(inputs, None, column)
    dim, _, _ = validate(mods, None, column)
    files = list_shards(labels) if os.path.isdir(labels) else [labels]
    label_shards = [open_shard(p, label_column, want_2d=False) for p in files]
    batch = DEFAULT_BATCH_ROWS
    y = torch.from_numpy(_read_rows(label_shards, max_rows, batch).astype(np.int64))
    xs = [torch.from_numpy(_read_rows(mm.shards, max_rows, batch)).float() for mm in mods]
    codec = codec_from_manifest(man)
    c = torch.from_numpy(_read_decoded(compressed, man, codec, max_rows))
    n = min(len(y), c.shape[0], xs[0].shape[0])
    if n < 4:
        raise ValueError(f"eval: need at least 4 labelled rows, got {n}")
    y, xs, c = y[:n], [x[:n] for x in xs], c[:n]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(n * test_fraction)))
    te, tr = perm[:n_test], perm[n_test:]
    reps = {f"original_{mm.name}": x for mm, x in zip(mods, xs)}
    reps["original_concat"] = torch.cat(xs, dim=1)
    reps["compressed"] = c
    res = {"rows": n, "train": len(tr), "test": n_test, "keep": man["rfs"]["keep"], "dim": dim,
           "compression_ratio": compression_ratio(len(mods), dim, man["rfs"]["keep"]), "codec": codec.name,
           # bytes of M fp32 embeddings / bytes of the stored code
           "stored_compression_ratio": len(mods) * dim * 4 / codec.bytes_per_vector(man["rfs"]["keep"]),
           "accuracy": {}}
    for name, x in reps.items():
        res["accuracy"][name] = {
            "linear_probe": linear_probe_accuracy(x[tr], y[tr], x[te], y[te], seed=seed),
            f"knn@{k}": knn_accuracy(x[tr], y[tr], x[te], y[te], k=k),
        }
    index = torch.tensor(man["rfs"]["index"])
    res["retrieval_recall"] = {f"original_{mods[0].name}->{mods[1].name}": retrieval_recall(xs[0], xs[1])}
    for mm, x in zip(mods, xs):
        res["retrieval_recall"][f"{mm.name}[rfs]->compressed"] = retrieval_recall(select_features(x, index), c)
    return res
