"""Measurements of one trained encoder pair (one dataset, training seed and τ), kept per test
item so that intervals can combine training seeds, RFS seeds and test sampling
(`semcomp_ext.eval.intervals`).

* geometry: modality gap, true-pair cosine, Fisher ratio, components for 95% of the variance;
  the gap also per bootstrap replicate of the test items;
* recovery: held-out R² of a linear map (ridge, fitted on the train split) from the centroid to
  each modality — near 1 means the centroid is an invertible code of both embeddings;
* classification by storage form (image, text, concatenation, centroid), centroid + RFS at each
  kept-feature count over several RFS seeds, and equal-byte alternatives at each byte budget;
* retrieval recall@{1,5,10} with ties counted against the query.

The linear probe is `ridge_probe` (rotation-invariant, L2 chosen by 5-fold CV on the train
split for every storage form, solved exactly); kNN (cosine, k=10) is reported beside it for
the storage forms and RFS. Compressors (PCA, quantizers) are fitted on the train split.
Bytes are per item; the original is M=2 fp32 embeddings of D values (8·D bytes)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from .. import metrics as M
from ..eval.probe import knn_predict, retrieval_ranks, ridge_probe
from ..features import RandomFeatureSelector
from ..functional import pair_centroids

FP32 = 4
# Equal-byte methods (the report's names). "rfs" is the method under test: centroid + RFS, fp32.
METHODS = ("rfs", "rfs+int8", "rfs+binary", "pca", "pca+int8", "pq", "truncation")
RECALL_KS = (1, 5, 10)


def geometry(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None, w_item: np.ndarray | None = None) -> dict:
    """Modality gap, true-pair cosine, Fisher ratio (classes pooled over both modalities), the
    components needed for 95% of the variance of pooled embeddings and of centroids; with
    item weights (B, N), also the gap of each bootstrap replicate ("gap_reps")."""
    out = {
        "modality_gap": float(M.modality_gap(img, txt)),
        "true_pair_cosine": float(M.true_pair_cosine(img, txt)),
        "n95_pooled": int(M.explained_variance([img, txt]).components[0.95]),
        "n95_centroid": int(M.explained_variance(pair_centroids([img, txt])).components[0.95]),
    }
    if labels is not None:
        out["fisher_ratio"] = float(M.fisher_ratio([img, txt], labels))
    if w_item is not None:
        a = torch.nn.functional.normalize(img.double(), dim=1).numpy()
        b = torch.nn.functional.normalize(txt.double(), dim=1).numpy()
        diff = w_item @ (a - b) / a.shape[0]
        out["gap_reps"] = np.linalg.norm(diff, axis=1)
    return out


def recovery_r2(ctr, xtr, cte, xte, l2: float = 1e-8) -> float:
    """Held-out R² of the ridge map centroid -> x fitted on the train split: 1 - SSE / SST
    on the test split (SST around the test mean). ~1: x is a linear function of the centroid."""
    ctr, xtr, cte, xte = (t.double() for t in (ctr, xtr, cte, xte))
    mc, mx = ctr.mean(0), xtr.mean(0)
    a = ctr - mc
    w = torch.linalg.solve(a.T @ a + l2 * a.shape[0] * torch.eye(a.shape[1], dtype=a.dtype), a.T @ (xtr - mx))
    pred = (cte - mc) @ w + mx
    sse = float(((pred - xte) ** 2).sum())
    sst = float(((xte - xte.mean(0)) ** 2).sum())
    return 1.0 - sse / sst if sst > 0 else float("nan")


class _Scorer:
    """Per-item correctness (bool numpy (N_test,)) of the ridge probe, and optionally kNN."""

    def __init__(self, ytr, yte, k: int, seed: int):
        self.ytr, self.yte, self.k, self.seed = ytr, yte, k, seed
        self.l2 = {}

    def probe(self, xtr, xte, key=None) -> np.ndarray:
        pred, info = ridge_probe(xtr, self.ytr, xte, seed=self.seed)
        if key is not None:
            self.l2[key] = info["l2"]
        return (pred == self.yte).numpy()

    def knn(self, xtr, xte) -> np.ndarray:
        return (knn_predict(xtr, self.ytr, xte, k=self.k) == self.yte).numpy()


def rfs_keeps(dim: int, drop_rates, targets) -> list:
    """Kept-feature counts evaluated: one per drop rate (RandomFeatureSelector's rounding) and,
    for each compression target t (vs both fp32 embeddings), the largest count whose
    compression 2·D/keep is at least t. Sorted descending, distinct."""
    keeps = {RandomFeatureSelector(dim, drop_rate=p).keep for p in drop_rates}
    keeps |= {max(1, int(2 * dim // t)) for t in targets}
    return sorted((k for k in keeps if 1 <= k <= dim), reverse=True)


def _pca(xtr: torch.Tensor, n: int):
    """Top-n principal axes of the train rows (fp64 SVD, sign fixed by the largest coordinate
    so the basis does not flip between runs)."""
    mu = xtr.double().mean(0)
    _, _, vh = torch.linalg.svd(xtr.double() - mu, full_matrices=False)
    v = vh[:n].T
    v = v * torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    return lambda x: ((x.double() - mu) @ v).float()


def _sq8(xtr: torch.Tensor):
    """Per-dimension 8-bit scalar quantizer (min/max from the train rows); returns the
    quantize-then-dequantize map, i.e. what a reader of the codes would reconstruct."""
    lo, hi = xtr.min(0).values, xtr.max(0).values
    step = (hi - lo).clamp(min=1e-12) / 255.0
    return lambda x: ((x - lo) / step).round().clamp(0, 255) * step + lo


def _largest_divisor_at_most(d: int, m: int) -> int:
    return max(q for q in range(1, min(d, m) + 1) if d % q == 0)


def _codec_roundtrip(spec: str, xtr: torch.Tensor, xte: torch.Tensor, seed: int):
    """Encode and decode both splits with a `semcomp compress --codec` codec fitted on train."""
    from ..compress.codecs import parse_codec

    codec = parse_codec(spec, seed=seed)
    a, b = xtr.numpy().astype(np.float32), xte.numpy().astype(np.float32)
    if codec.needs_fit:
        codec.fit(a)
    return [torch.from_numpy(codec.decode(codec.encode(x))) for x in (a, b)]


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def evaluate_pair(tr: tuple, te: tuple, ytr, yte, *, keeps, rfs_seeds, codec_seeds: int = 3, k: int = 10,
                  seed: int = 0, w_item: np.ndarray | None = None, baselines: bool = True) -> dict:
    """Everything measured on one model's (train, test) embeddings. Per-item arrays (bool,
    (N_test,)) are keyed as
      items["form", name, "probe"|"knn"]              name in image, text, concat, centroid
      items["rfs", keep, "probe"|"knn"]               array (R, N): one row per RFS seed
      items["budget", method, budget_bytes]            array (R', N), R' = 1 or codec_seeds
      items["retrieval", direction, k]                (N,) hit within the top k
    and `bytes[("budget", method, budget)]` = the bytes that method actually stores."""
    (itr, ttr), (ite, tte) = tr, te
    ctr, cte = pair_centroids([itr, ttr]), pair_centroids([ite, tte])
    d = itr.shape[1]
    out = {"geometry": geometry(ite, tte, yte, w_item), "items": {}, "bytes": {},
           "recovery_r2": {"image": recovery_r2(ctr, itr, cte, ite), "text": recovery_r2(ctr, ttr, cte, tte)}}
    items = out["items"]
    for direction, (q, kx) in {"image_to_text": (ite, tte), "text_to_image": (tte, ite)}.items():
        ranks = retrieval_ranks(q, kx, ties="pessimistic").numpy()
        for kk in RECALL_KS:
            items["retrieval", direction, kk] = ranks < kk
    if ytr is None or yte is None:
        return out
    score = _Scorer(ytr, yte, k, seed)
    forms = {"image": (itr, ite), "text": (ttr, tte), "concat": (torch.cat([itr, ttr], 1), torch.cat([ite, tte], 1)),
             "centroid": (ctr, cte)}
    for name, (a, b) in forms.items():
        items["form", name, "probe"] = score.probe(a, b, key=name)
        items["form", name, "knn"] = score.knn(a, b)
    for keep in keeps:
        sels = [RandomFeatureSelector(d, keep=keep, seed=s) for s in rfs_seeds]
        if keep == d:  # every seed keeps all columns: the centroid itself
            p, n = items["form", "centroid", "probe"], items["form", "centroid", "knn"]
            items["rfs", keep, "probe"], items["rfs", keep, "knn"] = np.stack([p] * len(sels)), np.stack([n] * len(sels))
            continue
        items["rfs", keep, "probe"] = np.stack([score.probe(s(ctr), s(cte), key=("rfs", keep) if i == 0 else None)
                                                for i, s in enumerate(sels)])
        items["rfs", keep, "knn"] = np.stack([score.knn(s(ctr), s(cte)) for s in sels])
    out["l2"] = score.l2
    if baselines:
        _budgets(out, score, ctr, cte, keeps, rfs_seeds[:codec_seeds], seed)
    return out


def _budgets(out, score, ctr, cte, keeps, codec_seeds, seed) -> None:
    """Equal-byte alternatives at each budget 4·keep bytes (what centroid + RFS stores)."""
    items, nbytes = out["items"], out["bytes"]
    d = ctr.shape[1]
    faiss = _faiss()
    cache = {}
    for keep in keeps:
        budget = FP32 * keep
        items["budget", "rfs", budget] = items["rfs", keep, "probe"]
        nbytes["budget", "rfs", budget] = budget
        n = max(1, min(d, budget // FP32))
        f = _pca(ctr, n)
        items["budget", "pca", budget] = score.probe(f(ctr), f(cte))[None]
        nbytes["budget", "pca", budget] = FP32 * n
        items["budget", "truncation", budget] = score.probe(ctr[:, :n], cte[:, :n])[None]
        nbytes["budget", "truncation", budget] = FP32 * n
        m = max(1, min(d, budget))
        if ("pca8", m) not in cache:
            f = _pca(ctr, m)
            q = _sq8(f(ctr))
            cache["pca8", m] = score.probe(q(f(ctr)), q(f(cte)))[None]
        items["budget", "pca+int8", budget] = cache["pca8", m]
        nbytes["budget", "pca+int8", budget] = m
        for method, kept, spec in (("rfs+int8", min(d, budget), "int8"), ("rfs+binary", min(d, 8 * budget), "binary")):
            if (method, kept) not in cache:
                rows = []
                for s in codec_seeds:
                    sel = RandomFeatureSelector(d, keep=kept, seed=s)
                    rows.append(score.probe(*_codec_roundtrip(spec, sel(ctr), sel(cte), seed)))
                cache[method, kept] = np.stack(rows)
            items["budget", method, budget] = cache[method, kept]
            nbytes["budget", method, budget] = kept if spec == "int8" else (kept + 7) // 8
        if faiss is not None and ctr.shape[0] >= 256:
            # 8-bit sub-quantizers over sub-vectors of >= 4 dims, the largest count dividing D
            # within the budget; equal code sizes are trained once.
            msub = _largest_divisor_at_most(d, min(budget, max(1, d // 4)))
            if ("pq", msub) not in cache:
                pq = faiss.ProductQuantizer(d, msub, 8)
                pq.cp.min_points_per_centroid = 1  # small train sets are expected here
                pq.train(ctr.numpy().astype("float32"))  # faiss k-means seeds from a fixed default

                def rec(x, pq=pq):
                    return torch.from_numpy(pq.decode(pq.compute_codes(x.numpy().astype("float32"))))

                cache["pq", msub] = score.probe(rec(ctr), rec(cte))[None]
            items["budget", "pq", budget] = cache["pq", msub]
            nbytes["budget", "pq", budget] = msub


@contextmanager
def faiss_threads(n: int):
    """faiss's OpenMP threads set to n (e.g. torch's) inside the block; a no-op without faiss.
    Two threads on the shared 2-core machine measured ~5x slower PQ training than one."""
    faiss = _faiss()
    if faiss is None:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


# ---- centroid + RFS + storage codec, as mean/std rows (kept for `semcomp_ext` users of the ---------
# ---- earlier results layout; `semcomp reproduce` itself uses the equal-byte budgets above) ---------

CODECS = ("int8", "binary", "pq")


def _codec_spec(name: str, keep: int, n_train: int) -> str | None:
    """The codec spec evaluated for `name` at `keep` kept features: "pq" uses 8-bit
    sub-quantizers over sub-vectors of >= 8 dims, the largest count dividing keep; None
    (skipped) without faiss or with fewer than 256 train rows."""
    if name != "pq":
        return name
    if _faiss() is None or n_train < 256:
        return None
    return f"pq:{_largest_divisor_at_most(keep, max(1, keep // 8))}"


def rfs_codecs(ctr, cte, ytr, yte, *, drop_rates, rfs_seeds, codecs=CODECS, k=10, probe_iter=None, seed=0) -> list:
    """Ridge-probe and kNN accuracy (mean/std over RFS seeds; "pq" over the first seed only) of
    the centroid + RFS stored with each codec at each drop rate, the codec fitted on the
    train split. `probe_iter` is ignored (the probe is solved exactly)."""
    import statistics

    from ..compress.codecs import parse_codec

    def stats(xs):
        xs = list(xs)
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}

    score = _Scorer(ytr, yte, k, seed)
    d = ctr.shape[1]
    rows = []
    for name in codecs:
        for rate in drop_rates:
            keep = RandomFeatureSelector(d, drop_rate=rate).keep
            spec = _codec_spec(name, keep, ctr.shape[0])
            if spec is None:
                continue
            runs = []
            for s in rfs_seeds[:1] if name == "pq" else rfs_seeds:
                sel = RandomFeatureSelector(d, drop_rate=rate, seed=s)
                rec = _codec_roundtrip(spec, sel(ctr), sel(cte), seed)
                runs.append({"probe": float(score.probe(*rec).mean()), "knn": float(score.knn(*rec).mean())})
            nbytes = parse_codec(spec).bytes_per_vector(keep)
            rows.append({"codec": name, "spec": spec, "drop_rate": rate, "keep": keep, "bytes": nbytes,
                         "compression": 2 * d * FP32 / nbytes,
                         "probe": stats(r["probe"] for r in runs), "knn": stats(r["knn"] for r in runs)})
    return rows
