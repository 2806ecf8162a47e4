"""Measurements of one trained encoder pair: geometry, classification of each storage form
(one modality, concatenation, centroid, centroid + RFS), centroid + RFS stored with each codec
of `semcomp compress --codec` (int8, binary, pq), equal-byte baselines (PCA, int8 scalar
quantization, product quantization) and cross-modal retrieval.

Classifiers (linear probe, kNN) are fit on the train split's embeddings and scored on the test
split's; compressors (PCA, quantizers) are fit on the train split too. Storage is counted per
item: the original is M=2 fp32 embeddings of D values (8D bytes)."""

from __future__ import annotations

import statistics
from contextlib import contextmanager

import torch

from .. import metrics as M
from ..eval.probe import knn_accuracy, linear_probe_accuracy, retrieval_recall
from ..features import RandomFeatureSelector
from ..functional import pair_centroids

FP32 = 4


def _stats(xs) -> dict:
    xs = list(xs)
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def geometry(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor | None) -> dict:
    """Modality gap, true-pair cosine, Fisher ratio (classes pooled over both modalities) and
    the components needed for 95% of the variance of pooled embeddings and of centroids."""
    out = {
        "modality_gap": float(M.modality_gap(img, txt)),
        "true_pair_cosine": float(M.true_pair_cosine(img, txt)),
        "n95_pooled": int(M.explained_variance([img, txt]).components[0.95]),
        "n95_centroid": int(M.explained_variance(pair_centroids([img, txt])).components[0.95]),
    }
    if labels is not None:
        out["fisher_ratio"] = float(M.fisher_ratio([img, txt], labels))
    return out


class _Scorer:
    """Linear-probe and kNN accuracy of a (train, test) feature pair against fixed labels."""

    def __init__(self, ytr, yte, k: int, probe_iter: int, seed: int):
        self.ytr, self.yte, self.k, self.iter, self.seed = ytr, yte, k, probe_iter, seed

    def __call__(self, xtr, xte) -> dict:
        return {
            "probe": linear_probe_accuracy(xtr, self.ytr, xte, self.yte, max_iter=self.iter, seed=self.seed),
            "knn": knn_accuracy(xtr, self.ytr, xte, self.yte, k=self.k),
        }


def classification(tr: tuple, te: tuple, ytr, yte, *, drop_rates, rfs_seeds, k=10, probe_iter=200, seed=0) -> dict:
    """Accuracy of image-only, text-only, concat, centroid, and centroid + RFS at each drop
    rate over several RFS seeds (mean/std), with bytes per item for each form."""
    score = _Scorer(ytr, yte, k, probe_iter, seed)
    (itr, ttr), (ite, tte) = tr, te
    ctr, cte = pair_centroids([itr, ttr]), pair_centroids([ite, tte])
    d = itr.shape[1]
    forms = {
        "image": (itr, ite, d * FP32),
        "text": (ttr, tte, d * FP32),
        "concat": (torch.cat([itr, ttr], 1), torch.cat([ite, tte], 1), 2 * d * FP32),
        "centroid": (ctr, cte, d * FP32),
    }
    out = {"forms": {}, "rfs": []}
    for name, (a, b, nbytes) in forms.items():
        out["forms"][name] = score(a, b) | {"bytes": nbytes}
    for rate in drop_rates:
        runs = []
        for s in rfs_seeds:
            sel = RandomFeatureSelector(d, drop_rate=rate, seed=s)
            runs.append(score(sel(ctr), sel(cte)))
        keep = RandomFeatureSelector(d, drop_rate=rate).keep
        out["rfs"].append({"drop_rate": rate, "keep": keep, "bytes": keep * FP32,
                           "compression": 2 * d / keep,
                           "probe": _stats(r["probe"] for r in runs), "knn": _stats(r["knn"] for r in runs)})
    return out


# ---- equal-byte baselines --------------------------------------------------------------------------


def _pca(xtr: torch.Tensor, n: int):
    """Top-n principal axes of the train rows (deterministic SVD, sign fixed by the largest
    coordinate so the basis does not flip between runs)."""
    mu = xtr.double().mean(0)
    _, _, vh = torch.linalg.svd(xtr.double() - mu, full_matrices=False)
    v = vh[:n].T
    sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    v = v * sign
    return lambda x: ((x.double() - mu) @ v).float()


def _sq8(xtr: torch.Tensor):
    """Per-dimension int8 scalar quantizer (min/max from the train rows); returns the
    quantize-then-dequantize map, i.e. what a reader of the int8 codes would reconstruct."""
    lo, hi = xtr.min(0).values, xtr.max(0).values
    step = (hi - lo).clamp(min=1e-12) / 255.0
    return lambda x: ((x - lo) / step).round().clamp(0, 255) * step + lo


def _largest_divisor_at_most(d: int, m: int) -> int:
    return max(q for q in range(1, min(d, m) + 1) if d % q == 0)


def baselines(ctr, cte, ytr, yte, *, budgets, k=10, probe_iter=200, seed=0) -> list:
    """Classification of the centroid compressed by other means to (at most) each byte
    budget: PCA to budget/4 fp32 components; PCA + int8 codes (budget components, <= D);
    faiss product quantization with the largest number of 8-bit sub-quantizers that divides D,
    fits the budget and leaves sub-vectors of >= 4 dims (skipped when faiss is not installed)."""
    score = _Scorer(ytr, yte, k, probe_iter, seed)
    d = ctr.shape[1]
    try:
        import faiss  # noqa: F401
    except ImportError:
        faiss = None
    rows, pq_cache = [], {}
    for budget in budgets:
        n = max(1, min(d, budget // FP32))
        f = _pca(ctr, n)
        rows.append({"method": "pca", "budget": budget, "bytes": n * FP32} | score(f(ctr), f(cte)))
        m = max(1, min(d, budget))
        if ("sq8", m) not in pq_cache:  # budgets >= D bytes all give the same int8 codes
            f = _pca(ctr, m)
            q = _sq8(f(ctr))
            pq_cache["sq8", m] = score(q(f(ctr)), q(f(cte)))
        rows.append({"method": "pca+int8", "budget": budget, "bytes": m} | pq_cache["sq8", m])
        if faiss is not None and ctr.shape[0] >= 256:
            # Sub-vectors of at least 4 dims: 1-dim sub-quantizers are just scalar quantization
            # (covered above) and cost ~5x more k-means time; equal code sizes are trained once.
            msub = _largest_divisor_at_most(d, min(budget, max(1, d // 4)))
            if msub not in pq_cache:
                pq = faiss.ProductQuantizer(d, msub, 8)
                pq.cp.min_points_per_centroid = 1  # small train sets are expected here; silence the warning
                # faiss k-means seeds from a fixed default, so codes are reproducible.
                pq.train(ctr.numpy().astype("float32"))

                def rec(x, pq=pq):
                    return torch.from_numpy(pq.decode(pq.compute_codes(x.numpy().astype("float32"))))

                pq_cache[msub] = score(rec(ctr), rec(cte))
            rows.append({"method": "pq", "budget": budget, "bytes": msub} | pq_cache[msub])
    return rows


# ---- centroid + RFS + storage codec -----------------------------------------------------------------

CODECS = ("int8", "binary", "pq")


def _codec_spec(name: str, keep: int, n_train: int) -> str | None:
    """The codec spec evaluated for `name` at `keep` kept features: "pq" uses 8-bit
    sub-quantizers over sub-vectors of >= 8 dims (about 1 bit per feature, the bytes of
    "binary"), the largest count dividing keep; None (skipped) without faiss or when the train
    split has fewer rows than the 256 centroids a sub-quantizer needs."""
    if name != "pq":
        return name
    try:
        import faiss  # noqa: F401
    except ImportError:
        return None
    if n_train < 256:
        return None
    return f"pq:{_largest_divisor_at_most(keep, max(1, keep // 8))}"


def rfs_codecs(ctr, cte, ytr, yte, *, drop_rates, rfs_seeds, codecs=CODECS, k=10, probe_iter=200, seed=0) -> list:
    """Accuracy of the centroid + RFS stored with each codec at each drop rate: the codec
    (`semcomp_ext.compress.codecs`, the code `semcomp compress --codec` runs) is fitted on the
    train split's reduced centroids, both splits are encoded and decoded, and the decoded
    vectors are scored (mean/std over RFS seeds; "pq" over the first RFS seed only, its
    k-means costs ~0.1 s per sub-quantizer). bytes = the stored code per item; compression is
    against both fp32 embeddings (8·D bytes)."""
    from ..compress.codecs import parse_codec

    score = _Scorer(ytr, yte, k, probe_iter, seed)
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
                codec = parse_codec(spec, seed=seed)
                xtr, xte = sel(ctr).numpy(), sel(cte).numpy()
                if codec.needs_fit:
                    codec.fit(xtr)
                rec = [torch.from_numpy(codec.decode(codec.encode(x))) for x in (xtr, xte)]
                runs.append(score(*rec))
            nbytes = parse_codec(spec).bytes_per_vector(keep)
            rows.append({"codec": name, "spec": spec, "drop_rate": rate, "keep": keep, "bytes": nbytes,
                         "compression": 2 * d * FP32 / nbytes,
                         "probe": _stats(r["probe"] for r in runs), "knn": _stats(r["knn"] for r in runs)})
    return rows


@contextmanager
def faiss_threads(n: int):
    """faiss's OpenMP threads set to n (e.g. torch's) inside the block; a no-op without faiss.
    Two threads on the shared 2-core machine measured ~5x slower PQ training than one."""
    try:
        import faiss
    except ImportError:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def retrieval(img, txt) -> dict:
    """Recall@{1,5,10} of image->text and text->image on the row-aligned test pairs."""
    return {"image_to_text": retrieval_recall(img, txt), "text_to_image": retrieval_recall(txt, img)}
