"""Statistics and verdicts of a reproduction, from per-item measurements (`evaluate_pair`).

Every accuracy comes with a percentile-bootstrap interval that combines training seeds, RFS
seeds and test items (`semcomp_ext.eval.intervals`). The verdict rules are fixed in advance
and have three outcomes — held, not held, inconclusive:

(a) higher τ → smaller modality gap: Spearman(τ, gap) = −1 in at least 4 of 5 training seeds
    (with n ≥ 5 seeds: in ≥ 80% of them; with fewer, held/not held only when the missing seeds
    could not change the count, else inconclusive); the gap's 95% interval per τ is reported.
(b) centroid ≈ or better than concatenation at half the bytes: per τ, the 90% interval of the
    seed-mean paired difference centroid − concat (the two one-sided tests of a TOST at ±1 pt):
    held if its lower bound > −1 pt, not held if its upper bound < −1 pt, else inconclusive
    ("equivalent" when it also lies below +1 pt). Overall: held if held at every τ, not held if
    not held at any τ, else inconclusive.
(c) high τ keeps its accuracy with 95% of features dropped, low τ degrades sooner: per τ the
    loss from drop 0 to the highest drop rate with a 95% interval; "keeps" is held if the upper
    bound < 2 pt, not held if the lower bound > 2 pt; the trend is the least-squares slope of
    the loss against log10 τ over all τ (95% interval): held if < 0 throughout, not held if
    > 0 throughout. Claim (c) = both parts at the claim τ (0.4).
(d) large compression with no downstream loss: at the claim τ (0.4, fixed: no maximum over τ)
    and compression targets fixed in advance (2.5×, 10×, 20× vs both fp32 embeddings), centroid
    + RFS at the largest kept-feature count reaching the target vs the concatenation: held if
    the 95% lower bound of the accuracy difference > −1 pt, not held if the upper bound < −1 pt.
    The claim's verdict is the 10× target's (the "large" threshold); all three are reported.
Across datasets: held if held on every dataset, not held if not held on any, else inconclusive.
"""

from __future__ import annotations

import math

import numpy as np

from ..eval.intervals import Resampler, mean_interval, spearman, summary
from .evaluate import FP32, METHODS, RECALL_KS

HELD, NOT_HELD, INCONCLUSIVE = "held", "not held", "inconclusive"
MARGIN_B = 0.01     # (b) equivalence margin: 1 accuracy point
MARGIN_D = 0.01     # (d) "no downstream loss": within 1 point of the concatenation
KEEPS = 0.02        # (c) "keeps its accuracy": loses less than 2 points
SPEARMAN_SHARE = 0.8
SPEARMAN_SEEDS = 5  # (a) "in >= 4 of 5 seeds"
TARGETS = (2.5, 10.0, 20.0)
HEADLINE_TARGET = 10.0
CLAIM_TAU = 0.4


def _combine(outcomes) -> str:
    outcomes = list(outcomes)
    if outcomes and all(o == HELD for o in outcomes):
        return HELD
    if any(o == NOT_HELD for o in outcomes):
        return NOT_HELD
    return INCONCLUSIVE


def _stack(runs, key, seeds) -> np.ndarray:
    """(S, R, N) float array of one per-item key across training seeds."""
    rows = [np.asarray(runs[s]["items"][key], dtype=np.float64) for s in seeds]
    return np.stack([r if r.ndim == 2 else r[None] for r in rows])


def _seed_stat(values) -> dict:
    v = [float(x) for x in values]
    return {"mean": float(np.mean(v)), "min": min(v), "max": max(v), "n_seeds": len(v)}


def _slope(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum()) if (x * x).sum() > 0 else 0.0


def spearman_outcome(n_perfect: int, n_seeds: int) -> str:
    """(a)'s rule: Spearman = -1 in >= 4 of 5 seeds (>= 80% of n when n >= 5)."""
    if n_seeds >= SPEARMAN_SEEDS:
        return HELD if n_perfect >= SPEARMAN_SHARE * n_seeds else NOT_HELD
    need = math.ceil(SPEARMAN_SHARE * SPEARMAN_SEEDS)
    missing = SPEARMAN_SEEDS - n_seeds
    if n_perfect >= need:
        return HELD
    if n_perfect + missing < need:
        return NOT_HELD
    return INCONCLUSIVE


def interval_outcome(lo: float, hi: float, threshold: float, *, above_is_held: bool = True) -> str:
    """held if the whole interval is on the held side of the threshold, not held if it is
    wholly on the other side, inconclusive when it straddles it."""
    if above_is_held:
        return HELD if lo > threshold else NOT_HELD if hi < threshold else INCONCLUSIVE
    return HELD if hi < threshold else NOT_HELD if lo > threshold else INCONCLUSIVE


def summarize_dataset(runs: dict, seeds, taus, rs: Resampler, *, dim: int, keeps, targets=TARGETS,
                      claim_tau: float = CLAIM_TAU) -> dict:
    """runs[seed][tau] = evaluate_pair(...) output (+ "train"); returns the dataset's summary
    (per-τ statistics, equal-byte comparison, claims)."""
    seeds, taus = list(seeds), list(taus)
    out = {"temperatures": {}}
    labelled = all(("form", "centroid", "probe") in runs[s][t]["items"] for s in seeds for t in taus)
    per_tau_items = {}
    for t in taus:
        R = {s: runs[s][t] for s in seeds}
        g = [R[s]["geometry"] for s in seeds]
        gap_reps = rs.combine(np.stack([x["gap_reps"] for x in g], axis=1)[:, :, None])
        geo = {"modality_gap": summary(np.mean([x["modality_gap"] for x in g]), gap_reps, n_seeds=len(seeds),
                                       n_items=rs.n_items),
               "gap_per_seed": [x["modality_gap"] for x in g]}
        for k in ("true_pair_cosine", "fisher_ratio", "n95_pooled", "n95_centroid"):
            if all(k in x for x in g):
                geo[k] = _seed_stat(x[k] for x in g)
        entry = {"geometry": geo,
                 "recovery_r2": {m: _seed_stat(R[s]["recovery_r2"][m] for s in seeds) for m in ("image", "text")},
                 "train": {"final_loss": _seed_stat(R[s]["train"]["final_loss_avg10"] for s in seeds)},
                 "retrieval": {d: {str(k): mean_interval(rs, _stack(R, ("retrieval", d, k), seeds)) for k in RECALL_KS}
                               for d in ("image_to_text", "text_to_image")}}
        if labelled:
            items = {key: _stack(R, key, seeds) for key in R[seeds[0]]["items"] if key[0] != "retrieval"}
            per_tau_items[t] = items
            entry["forms"] = {name: {"bytes": (2 if name == "concat" else 1) * dim * FP32,
                                     "probe": mean_interval(rs, items["form", name, "probe"]),
                                     "knn": mean_interval(rs, items["form", name, "knn"])}
                              for name in ("image", "text", "concat", "centroid")}
            entry["rfs"] = [{"keep": k, "drop_rate": 1 - k / dim, "bytes": FP32 * k, "compression": 2 * dim / k,
                             "probe": mean_interval(rs, items["rfs", k, "probe"]),
                             "knn": mean_interval(rs, items["rfs", k, "knn"])} for k in keeps]
            entry["l2"] = runs[seeds[0]][t].get("l2", {})
            entry["l2"] = {(k if isinstance(k, str) else f"rfs_keep_{k[1]}"): v for k, v in entry["l2"].items()}
            entry["budgets"] = _budgets(R[seeds[0]], items, rs)
        out["temperatures"][t] = entry
    out["claims"] = _claims(out, runs, seeds, taus, rs, per_tau_items, dim=dim, keeps=keeps, targets=targets,
                            claim_tau=claim_tau)
    return out


def _budgets(run0, items, rs) -> list:
    """Per byte budget: each method's accuracy and interval, the winner, and the paired
    difference winner - runner-up (tied when its 95% interval contains 0)."""
    budgets = sorted({key[2] for key in items if key[0] == "budget"}, reverse=True)
    rows = []
    for b in budgets:
        methods = {m: items["budget", m, b] for m in METHODS if ("budget", m, b) in items}
        stats = {m: mean_interval(rs, x) | {"bytes": run0["bytes"]["budget", m, b]} for m, x in methods.items()}
        order = sorted(stats, key=lambda m: -stats[m]["mean"])
        row = {"budget": b, "methods": stats, "winner": order[0]}
        if len(order) > 1:
            a, c = methods[order[0]], methods[order[1]]
            if a.shape[1] != c.shape[1]:
                a, c = a.mean(1, keepdims=True), c.mean(1, keepdims=True)
            d = mean_interval(rs, a - c)
            row["runner_up"], row["margin"] = order[1], d
            row["tied"] = d["lo"] <= 0
        rows.append(row)
    return rows


def _claims(out, runs, seeds, taus, rs, items, *, dim, keeps, targets, claim_tau) -> dict:
    T = out["temperatures"]
    x = [float(t) for t in taus]
    # (a)
    rhos = [spearman(x, [runs[s][t]["geometry"]["modality_gap"] for t in taus]) for s in seeds]
    n_perfect = sum(r <= -1 + 1e-9 for r in rhos)
    a = {"spearman_per_seed": rhos, "n_perfect": n_perfect, "n_seeds": len(seeds),
         "gap": {t: T[t]["geometry"]["modality_gap"] for t in taus},
         "rule": "Spearman(τ, gap) = −1 in ≥ 4 of 5 training seeds", "verdict": spearman_outcome(n_perfect, len(seeds))}
    claims = {"a": a}
    if not items:
        for k in "bcd":
            claims[k] = {"verdict": "not measured (the dataset has no class labels)"}
        return claims
    # (b)
    b = {"per_tau": {}, "margin": MARGIN_B, "level": 0.90,
         "rule": "90% interval of centroid − concat (TOST ±1 pt): held if lower bound > −1 pt"}
    for t in taus:
        d = mean_interval(rs, items[t]["form", "centroid", "probe"] - items[t]["form", "concat", "probe"], level=0.90)
        b["per_tau"][t] = {"diff": d, "equivalent": d["lo"] > -MARGIN_B and d["hi"] < MARGIN_B,
                           "verdict": interval_outcome(d["lo"], d["hi"], -MARGIN_B)}
    b["verdict"] = _combine(v["verdict"] for v in b["per_tau"].values())
    claims["b"] = b
    # (c)
    k_min = min(keeps, key=lambda k: k)
    drop = 1 - k_min / dim
    c = {"per_tau": {}, "drop_rate": drop, "keep": k_min, "threshold": KEEPS,
         "rule": "loss from drop 0 to the highest drop rate: keeps if the 95% upper bound < 2 pt; trend = slope of the "
                 "loss vs log10 τ, held if its 95% interval is below 0"}
    reps = {}
    for t in taus:
        diff = items[t]["rfs", dim, "probe"] - items[t]["rfs", k_min, "probe"]
        reps[t] = rs.replicates(diff)
        s = summary(float(diff.mean()), reps[t], n_seeds=diff.shape[0], n_rfs=diff.shape[1], n_items=diff.shape[2])
        c["per_tau"][t] = {"loss": s, "keeps": interval_outcome(s["lo"], s["hi"], KEEPS, above_is_held=False)}
    logx = np.log10(x)
    slope_reps = np.array([_slope(logx, [reps[t][i] for t in taus]) for i in range(rs.reps)])
    slope = _slope(logx, [c["per_tau"][t]["loss"]["mean"] for t in taus])
    c["trend"] = summary(slope, slope_reps, n_seeds=len(seeds), n_rfs=rs.n_rfs, n_items=rs.n_items)
    c["trend"]["verdict"] = interval_outcome(c["trend"]["lo"], c["trend"]["hi"], 0.0, above_is_held=False)
    ct = _claim_tau(taus, claim_tau)
    c["tau"] = ct
    c["verdict"] = _combine([c["per_tau"][ct]["keeps"], c["trend"]["verdict"]])
    claims["c"] = c
    # (d)
    d = {"tau": ct, "per_target": {}, "margin": MARGIN_D, "headline_target": HEADLINE_TARGET,
         "rule": "centroid + RFS at the target compression vs concat at τ = 0.4: held if the 95% lower bound of the "
                 "difference > −1 pt"}
    for tgt in targets:
        keep = max(1, int(2 * dim // tgt))
        diff = items[ct]["rfs", keep, "probe"] - items[ct]["form", "concat", "probe"]
        s = mean_interval(rs, diff)
        d["per_target"][f"{tgt:g}"] = {"keep": keep, "compression": 2 * dim / keep, "diff": s,
                                       "verdict": interval_outcome(s["lo"], s["hi"], -MARGIN_D)}
    head = d["per_target"].get(f"{HEADLINE_TARGET:g}")
    d["verdict"] = head["verdict"] if head else _combine(v["verdict"] for v in d["per_target"].values())
    claims["d"] = d
    return claims


def _claim_tau(taus, claim_tau) -> str:
    """The τ key closest to claim_tau (0.4 when it was run)."""
    return min(taus, key=lambda t: abs(float(t) - claim_tau))


def combine_datasets(per_dataset: dict) -> dict:
    """Claim -> {"verdict", "per_dataset": {name: verdict}}: held only if held on every dataset."""
    out = {}
    for k in "abcd":
        verdicts = {name: ds["claims"][k]["verdict"] for name, ds in per_dataset.items() if k in ds["claims"]}
        measured = [v for v in verdicts.values() if v in (HELD, NOT_HELD, INCONCLUSIVE)]
        out[k] = {"verdict": _combine(measured) if measured else "not measured", "per_dataset": verdicts}
    return out
