"""`semcomp gap` (streamed geometry of a folder) and `semcomp eval` (downstream accuracy of
compressed vs original embeddings)."""

from __future__ import annotations

import os

import numpy as np
import torch

from . import fsio
from .options import OptionError, OptionPathError, check_int
from .readers import DEFAULT_BATCH_ROWS, discover, iter_chunks, list_shards, validate

EVAL_MAX_ROWS = 20000  # rows sampled by `semcomp eval` unless --max-rows says otherwise


def gap_report(inputs: list, *, batch_size: int = DEFAULT_BATCH_ROWS, column: str = "embedding", quiet: bool = False,
               modalities: list | None = None, storage_options: dict | None = None) -> dict:
    """One pass over the shards with O(M*D + D^2) state: per-modality sums of unit vectors
    (modality gap, as metrics.modality_gaps), per-pair cosine sums (metrics.true_pair_cosine),
    and the pooled second-moment matrix (metrics.explained_variance's PCA spectrum)."""
    from ..metrics import ExplainedVariance
    from .options import check_int
    from .progress import Progress

    check_int("batch_size", batch_size, 1)
    if storage_options is not None:
        fsio.configure(storage_options)
    mods, _ = discover(inputs, None, column, modalities)
    dim, in_dtype, _ = validate(mods, None, column)
    m = len(mods)
    unit_sum = torch.zeros(m, dim, dtype=torch.float64)
    pair_cos = torch.zeros(m, m, dtype=torch.float64)
    s1 = torch.zeros(dim, dtype=torch.float64)
    s2 = torch.zeros(dim, dim, dtype=torch.float64)
    n = 0
    bar = Progress(sum(s.size for mm in mods for s in mm.shards), len(mods[0].shards), quiet, desc="gap", unit="shards")
    try:
        for i in range(len(mods[0].shards)):
            start = 0
            for chunk in zip(*(iter_chunks(mm.shards[i], batch_size) for mm in mods)):
                zs = [torch.from_numpy(np.array(c, dtype=np.float64)) for c in chunk]
                check_finite([mm.shards[i].path for mm in mods], zs, start)
                start += zs[0].shape[0]
                units = [torch.nn.functional.normalize(z, dim=1) for z in zs]
                for a in range(m):
                    unit_sum[a] += units[a].sum(0)
                    for b in range(a + 1, m):
                        pair_cos[a, b] += (units[a] * units[b]).sum()
                    s1 += zs[a].sum(0)
                    s2 += zs[a].T @ zs[a]
                n += zs[0].shape[0]
                bar.update(sum(z.shape[0] * mm.shards[i].size // max(mm.shards[i].rows, 1) for z, mm in zip(zs, mods)),
                           0, zs[0].shape[0])
            bar.update(0, 1)
    except BaseException:
        bar.abort()
        raise
    bar.close()
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
        "modalities": names, "rows": n, "dim": dim, "in_dtype": in_dtype,
        "modality_gap": {f"{names[a]}-{names[b]}": float(gaps[a, b]) for a, b in zip(iu[0].tolist(), iu[1].tolist())},
        "mean_modality_gap": float(gaps[iu[0], iu[1]].mean()),
        "true_pair_cosine": {f"{names[a]}-{names[b]}": float(pair_cos[a, b] / n) for a, b in zip(iu[0].tolist(), iu[1].tolist())},
        "explained_variance_components": {str(f): min(ev.n_components(f), dim) for f in (0.9, 0.95, 0.99)},
        "explained_variance_ratio_top10": [float(r) for r in ratio[:10]],
    }


def check_finite(paths: list, blocks: list, start: int) -> None:
    """ValueError naming the file and row of the first NaN/Inf of the row-aligned blocks."""
    for path, z in zip(paths, blocks):
        bad = ~torch.isfinite(z).all(1) if z.ndim == 2 else ~torch.isfinite(z)
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise ValueError(f"non-finite values (NaN/Inf) in {path} at row {start + row} ({int(bad.sum())} such rows "
                             "in this block); drop those rows first (`semcomp compress --skip-invalid` does)")


def _sample_rows(total: int, max_rows: int | None, seed: int) -> np.ndarray | None:
    """Sorted row numbers of a seeded uniform sample of max_rows rows (None: every row)."""
    if not max_rows or total <= max_rows:
        return None
    return np.sort(np.random.default_rng(seed).choice(total, size=max_rows, replace=False))


def _take(shards, sel: np.ndarray | None, batch: int) -> np.ndarray:
    """Rows `sel` (sorted global row numbers; None: all) of a modality's shards, as float32
    (float64 inputs are cast). Local .npy shards are memory-mapped; parquet and URL shards
    streamed. A NaN/Inf among the rows taken is a ValueError naming its file and row."""
    out, base = [], 0
    for s in shards:
        lo, hi = base, base + s.rows
        base = hi
        local = None if sel is None else sel[(sel >= lo) & (sel < hi)] - lo
        if local is not None and local.size == 0:
            continue
        if s.kind == "npy" and not fsio.is_url(s.path):
            arr = np.load(s.path, mmap_mode="r")
            got = [np.asarray(arr if local is None else arr[local], dtype=np.float32)]
        else:
            got, start = [], 0
            for c in iter_chunks(s, batch):
                n = c.shape[0]
                if local is None:
                    got.append(np.array(c, dtype=np.float32))
                else:
                    k = local[(local >= start) & (local < start + n)] - start
                    if k.size:
                        got.append(np.asarray(c[k], dtype=np.float32))
                start += n
        x = np.concatenate(got) if len(got) > 1 else got[0] if got else np.zeros((0, s.dim), np.float32)
        bad = ~np.isfinite(x).all(1)
        if bad.any():
            row = int(np.nonzero(bad)[0][0])
            raise ValueError(f"non-finite values (NaN/Inf) in {s.path} at row {row if local is None else int(local[row])} "
                             f"({int(bad.sum())} such rows among those evaluated); drop those rows first "
                             "(`semcomp compress --skip-invalid` does)")
        out.append(x)
    return np.concatenate(out) if out else np.zeros((0, shards[0].dim if shards else 0), np.float32)


def load_labels(path: str, column: str = "label") -> np.ndarray:
    """Integer class labels from a .npy file, a parquet file (`column`) or a folder of such
    shards (numeric file order), concatenated. Non-integer labels are refused (a float label
    in [0, 1) would silently become class 0)."""
    if not os.path.exists(path):
        raise OptionPathError("labels", f": no such file or folder: {path}")
    files = list_shards(path) if os.path.isdir(path) else [path]
    parts = []
    for f in files:
        if f.endswith(".npy"):
            try:
                a = np.load(f, mmap_mode="r", allow_pickle=False)
            except Exception as exc:  # noqa: BLE001 - numpy raises several kinds on garbage
                raise OptionError("labels", f": cannot read {f} as a .npy array: {exc}") from exc
        elif f.endswith(".parquet"):
            from .readers import require_pyarrow

            pq = require_pyarrow("parquet labels")
            try:
                table = pq.read_table(f, columns=[column])
            except Exception as exc:  # noqa: BLE001
                raise OptionError("labels", f": {f}: cannot read column {column!r}: {exc}") from exc
            col = table.column(0)
            if col.null_count:
                raise OptionError("labels", f": {f}: column {column!r} has null labels")
            a = col.to_numpy()
        else:
            raise OptionError("labels", f": {f}: expected a .npy or .parquet file")
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 1:
            raise OptionError("labels", f": {f}: labels must be 1-D (one per row), got shape {a.shape}")
        if a.dtype.kind not in "iu":
            hint = " (floats: map them to integer class ids; a value in [0, 1) would all become class 0)" \
                if a.dtype.kind == "f" else " (map them to integer class ids)"
            raise OptionError("labels", f": {f}: labels must be integers, got dtype {a.dtype}{hint}")
        parts.append(np.asarray(a))
    y = np.concatenate(parts) if len(parts) > 1 else parts[0]
    return np.unique(y, return_inverse=True)[1].reshape(-1).astype(np.int64)  # class ids 0..C-1 (uint64 safe)


def _read_decoded(cs, sel: np.ndarray | None) -> np.ndarray:
    """Rows `sel` (None: all) of an open compressed set, decoded to float32 by its codec."""
    out, base = [], 0
    for i, sh in enumerate(cs.shards):
        lo, hi = base, base + sh["rows"]
        base = hi
        local = None if sel is None else sel[(sel >= lo) & (sel < hi)] - lo
        if local is not None and local.size == 0:
            continue
        codes = cs.codes(i)
        out.append(cs.codec.decode(np.asarray(codes if local is None else codes[local])))
    return np.concatenate(out) if out else np.zeros((0, cs.K), np.float32)


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


class SourceMismatchError(ValueError):
    """The inputs given to eval are not the files the compressed folder was made from."""


def check_sources(man: dict, mods: list, folder: str, force: bool = False) -> None:
    """The inputs are the files the manifest records (path, size, mtime of every shard of
    every modality, in order); SourceMismatchError naming the first difference, unless force."""
    if force:
        return
    want = [s for s in man.get("sources", []) if s.get("modality") in man["parameters"]["modalities"]]
    got = [(s.path, s.size, s.mtime_ns) for mm in mods for s in mm.shards]
    if len(want) != len(got):
        raise SourceMismatchError(f"{folder} was compressed from {len(want)} input files, {len(got)} are given; "
                                  "give the inputs it was compressed from, or force the comparison")
    for w, (path, size, mtime) in zip(want, got):
        for what, a, b in (("path", w.get("path"), path), ("size", w.get("bytes"), size),
                           ("modification time", w.get("mtime_ns"), mtime)):
            if a != b:
                raise SourceMismatchError(f"{path} is not the input {folder} was compressed from ({what} differs: "
                                          f"the manifest has {a!r}, the file {b!r}); give the inputs it was "
                                          "compressed from, or force the comparison")


def _check_eval_options(test_fraction, max_rows, k, sample_seed, drop_rates, compressed) -> list:
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise OptionError("test_fraction", f"must be in (0, 1), got {test_fraction!r}")
    if max_rows is not None:
        check_int("max_rows", max_rows, 0)
    check_int("k", k, 1)
    check_int("sample_seed", sample_seed)
    drop_rates = list(drop_rates or [])
    for r in drop_rates:
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 <= r < 1:
            raise OptionError("drop_rates", f"must be in [0, 1), got {r!r}")
    if compressed is None and not drop_rates:
        raise OptionError("compressed", "missing: give a compressed folder and/or drop rates (what to evaluate)")
    return drop_rates


def eval_report(inputs, compressed: str | None = None, labels: str | None = None, *, label_column: str = "label",
                test_fraction: float = 0.2, max_rows: int | None = EVAL_MAX_ROWS, k: int = 10, sample_seed: int = 0,
                column: str = "embedding", drop_rates=None, normalize: str | None = None, codec: str | None = None,
                seed: int | None = None, modalities: list | None = None, quiet: bool = True,
                recall_queries: int = 2000, recall_k: int = 10, force: bool = False,
                storage_options: dict | None = None, rfs_seed: int | None = None) -> dict:
    """What compression costs on the user's own data, on a seeded sample of `max_rows` rows
    (None/0: every row; held in memory as float32).

    Representations scored: each original modality, their concatenation (the baseline: every
    embedding kept), the folder `compressed` (a pairs-mode output of `semcomp compress`), and
    for each of `drop_rates` the centroid + RFS of the sampled rows computed in memory
    (`compress_arrays`, with the folder's normalisation, codec and RFS seed when given, else
    `normalize` / `codec` / `seed` (the RFS seed; `rfs_seed` is its earlier name)). Per representation: bytes per item and compression ratio
    from the real dtypes (input dtype x M x D -> stored code); with `labels` (integers, one per
    input row) the ridge linear-probe and kNN accuracy on a seeded train/test split; always,
    labels or not, the neighbour recall@`recall_k`: for `recall_queries` sampled rows, the
    fraction of their `recall_k` nearest rows (cosine, among all evaluated rows) in the original
    concatenation that the representation's nearest rows recover (how much a search over the
    compressed vectors agrees with one over everything kept). `sample_seed` seeds the row sample,
    the train/test split and the recall queries. The inputs must be the files the folder's
    manifest records (path, size, mtime: SourceMismatchError otherwise) unless `force`. `delta_pt`: the change against
    the original concatenation, in percentage points; negative = lost."""
    from .api import codebook_bytes, compress_arrays

    if rfs_seed is not None:  # the earlier name of `seed`
        seed = rfs_seed if seed is None else seed
    drop_rates = _check_eval_options(test_fraction, max_rows, k, sample_seed, drop_rates, compressed)
    if storage_options is not None:
        fsio.configure(storage_options)
    cs = None if compressed is None else _open_folder(compressed)
    man = None if cs is None else cs.manifest
    if man is not None:
        pm = man["parameters"]
        normalize = normalize or pm["normalize"]
        codec = codec or pm.get("codec") or pm.get("out_dtype")
        seed = pm["seed"] if seed is None else seed
    normalize = normalize or "none"
    seed = 0 if seed is None else seed

    mods, _ = discover(inputs, None, column, modalities)
    dim, in_dtype, _ = validate(mods, None, column)
    total = sum(s.rows for s in mods[0].shards)
    if man is not None:
        check_sources(man, mods, compressed, force)
        if man["rows_out"] != total or man["parameters"]["dim"] != dim:
            raise SourceMismatchError(f"{compressed} holds {man['rows_out']} rows of dim {man['parameters']['dim']}, "
                                      f"the inputs {total} of dim {dim}; give the inputs it was compressed from")
    y_all = None
    if labels is not None:
        y_all = load_labels(labels, label_column)
        if len(y_all) != total:
            raise OptionError("labels", f"has {len(y_all)} labels for {total} input rows; give one label per row")
    sel = _sample_rows(total, max_rows, sample_seed)
    n = total if sel is None else len(sel)
    if n < 4:
        raise ValueError(f"eval needs at least 4 rows, got {n}")

    from .progress import Progress

    steps = len(mods) + (man is not None) + len(drop_rates) + 1
    bar = Progress(0, steps, quiet, desc="eval", unit="steps")
    xs_np = []
    for mm in mods:
        xs_np.append(_take(mm.shards, sel, DEFAULT_BATCH_ROWS))
        bar.update(0, 1, len(xs_np[-1]))
    xs = [torch.from_numpy(x) for x in xs_np]
    y = None if y_all is None else torch.from_numpy(y_all if sel is None else y_all[sel])
    m = len(mods)
    in_item = np.dtype(in_dtype).itemsize
    concat = torch.cat(xs, 1)
    score = _Scorer(concat, y, test_fraction, sample_seed, recall_queries, recall_k, k)

    rows = []
    for mm, x in zip(mods, xs):
        rows.append({"representation": f"original {mm.name}", "bytes_per_item": dim * in_item, **score(x)})
    rows.append({"representation": "original concat", "bytes_per_item": m * dim * in_item, **score(concat)})
    bar.update(0, 1)

    def sweep_row(name, vec, cdc, keep, index, rows):
        # every stored byte: the codes and, shared by the `rows` items, a fitted codec's codebook
        return {"representation": name, "keep": keep, "codec": cdc.name,
                "bytes_per_item": cdc.bytes_per_vector(keep) + codebook_bytes(cdc) / max(rows, 1),
                **score(torch.from_numpy(vec))}

    compressed_row = None
    if man is not None:
        cdc = cs.codec
        vec = _read_decoded(cs, sel)
        compressed_row = sweep_row(f"compressed {os.path.basename(os.path.normpath(compressed))}", vec, cdc,
                                   man["rfs"]["keep"], man["rfs"]["index"], man["rows_out"])
        compressed_row["drop_rate"] = man["parameters"]["drop_rate"]
        rows.append(compressed_row)
        bar.update(0, 1)
    for r in drop_rates:
        ca = compress_arrays(xs_np, drop_rate=r, seed=seed, normalize=normalize, codec=codec or None,
                             out_dtype=None if codec else ("float16" if in_dtype == "float16" else "float32"))
        row = sweep_row(f"centroid + RFS drop {r:g}", ca.vectors(), ca.codec, len(ca.index), ca.index, total)
        row["drop_rate"] = r
        rows.append(row)
        bar.update(0, 1)
    bar.close()
    _deltas(rows, rows[m], m * dim * in_item)
    return _report(rows, compressed_row, score, cs, mods, dim, in_dtype, total, sel, labels is not None,
                   sample_seed, seed, recall_k, k)


def _report(rows, compressed_row, score, cs, mods, dim, in_dtype, total, sel, labelled, sample_seed, seed,
            recall_k, k) -> dict:
    """The report of eval_report: the table and its context, and flat keys per representation."""
    from .api import compression_ratio_bytes

    n = total if sel is None else len(sel)
    m = len(mods)
    man = None if cs is None else cs.manifest
    res = {
        "rows_total": total, "rows": n, "train": len(score.tr), "test": len(score.te), "dim": dim, "in_dtype": in_dtype,
        "modalities": [mm.name for mm in mods], "labels": labelled, "sample_seed": sample_seed,
        "seed": seed,
        "sample": (f"all {n} rows" if sel is None else f"a random sample of {n} of {total} rows (seed {sample_seed}: "
                   "the sample seed; max_rows 0 for every row)"),
        "probe": "ridge linear probe (closed form, L2 by leave-one-out CV on the train split)",
        "recall_queries": len(score.qidx), "recall_k": recall_k,
        "delta_convention": "percentage points, representation minus the original concatenation; negative = lost",
        "table": rows,
    }
    if man is not None:  # flat keys of the folder's row (compatibility with earlier reports)
        cdc = cs.codec
        res["keep"], res["codec"] = man["rfs"]["keep"], cdc.name
        res["compression_ratio"] = res["stored_compression_ratio"] = compression_ratio_bytes(
            m, dim, in_dtype, cdc, man["rfs"]["keep"], rows=man["rows_out"])
    res["accuracy"] = {}
    res["neighbour_recall"] = {}
    for row in rows:
        key = row["representation"].replace("original ", "original_").replace(" ", "_")
        if row is compressed_row:
            key = "compressed"
        if labelled:
            res["accuracy"][key] = {"linear_probe": row["linear_probe"], f"knn@{k}": row[f"knn@{k}"]}
        res["neighbour_recall"][key] = row["neighbour_recall"]
    return res


def _open_folder(compressed: str):
    """The compressed folder eval scores: finished (local or URL), pairs mode, no row dropped."""
    from .open import open_compressed

    cs = open_compressed(compressed)  # sizes and headers checked
    if cs.manifest["parameters"]["mode"] != "pairs":
        raise ValueError(f"{compressed} is a concepts-mode output; eval needs pairs mode (one centroid per input row)")
    if cs.manifest.get("invalid_rows_skipped"):
        raise ValueError(f"{compressed} skipped invalid rows; its rows no longer align with the inputs")
    return cs


class _Scorer:
    """score(rep) of one representation of the sampled rows: the probes on a seeded train/test
    split (with labels) and the neighbour recall against the original concatenation."""

    def __init__(self, concat, y, test_fraction, sample_seed, recall_queries, recall_k, k):
        from ..eval import nearest

        n = concat.shape[0]
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed))
        n_test = max(1, int(round(n * test_fraction)))
        self.te, self.tr, self.y, self.k = perm[:n_test], perm[n_test:], y, k
        # neighbour-recall queries: a seeded sample of rows; their exact neighbours in the concat
        self.qidx = torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed + 1))[:min(n, recall_queries)]
        self.ref_nn = nearest(concat, self.qidx, recall_k)

    def __call__(self, rep: torch.Tensor) -> dict:
        from ..eval import knn_accuracy, neighbour_recall, ridge_loo_accuracy

        r, y, tr, te = {}, self.y, self.tr, self.te
        if y is not None:
            r["linear_probe"], r["probe_l2"] = ridge_loo_accuracy(rep[tr], y[tr], rep[te], y[te])
            r[f"knn@{self.k}"] = knn_accuracy(rep[tr], y[tr], rep[te], y[te], k=self.k)
        r["neighbour_recall"] = neighbour_recall(rep, self.ref_nn, self.qidx)
        return r


def _deltas(rows: list, base: dict, in_bytes: float) -> None:
    """Each row's compression ratio (input bytes per item / its stored bytes per item) and its
    change against the original concatenation `base`, in percentage points."""
    for row in rows:
        row["compression_ratio"] = in_bytes / row["bytes_per_item"]
        row["delta_pt"] = {key: round(_pct(row[key]) - _pct(base[key]), 2) for key in base
                           if key in ("linear_probe", "neighbour_recall") or key.startswith("knn@")}
