"""Verdicts on the paper's claims (a)-(d), CSV tables and report.md, from results.json data.

Thresholds (stated in the report too): "comparable" = within 1 accuracy point; "keeps its
accuracy" = loses at most 2 points; "large compression" = at least 10x the bytes of storing
both fp32 embeddings. The linear probe is the primary metric, kNN is reported beside it.
`codec_compression` answers the storage question beside the claims: the largest compression
of centroid + RFS in each stored form (fp32 and every codec) within 1 point of the
concatenation, against the project's goal of 16x."""

from __future__ import annotations

import os

COMPARABLE = 0.01
KEEPS = 0.02
LARGE = 10.0
GOAL = 16.0  # the project's target compression at <= COMPARABLE accuracy loss


def _taus(results) -> list:
    return sorted(results["temperatures"], key=float)


def _spearman(xs, ys) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for k, i in enumerate(order):
            r[i] = float(k)
        return r

    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    if n < 2:
        return 0.0
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx) ** 0.5
    vy = sum((b - my) ** 2 for b in ry) ** 0.5
    return cov / (vx * vy) if vx and vy else 0.0


def _verdict(n_ok: int, n: int) -> str:
    return "held" if n_ok == n else "did not hold" if n_ok == 0 else "partly held"


def claims(results) -> dict:
    taus = _taus(results)
    R = results["temperatures"]
    gaps = [R[t]["geometry"]["modality_gap"] for t in taus]
    rho = _spearman([float(t) for t in taus], gaps)
    decreasing = all(b < a for a, b in zip(gaps, gaps[1:]))
    a = {"gaps": dict(zip(taus, gaps)), "spearman_tau_gap": rho, "strictly_decreasing": decreasing,
         "verdict": "held" if decreasing else "partly held" if (rho < 0 and gaps[-1] < gaps[0]) else "did not hold"}
    out = {"a": a}
    if not all("classification" in R[t] for t in taus):
        for k in "bcd":
            out[k] = {"verdict": "not measured (the dataset has no class labels)"}
        return out
    # (b) centroid vs concatenation at half the bytes
    b = {"per_tau": {}}
    for t in taus:
        f = R[t]["classification"]["forms"]
        b["per_tau"][t] = {"centroid_probe": f["centroid"]["probe"], "concat_probe": f["concat"]["probe"],
                           "centroid_knn": f["centroid"]["knn"], "concat_knn": f["concat"]["knn"],
                           "ok": f["centroid"]["probe"] >= f["concat"]["probe"] - COMPARABLE}
    b["verdict"] = _verdict(sum(v["ok"] for v in b["per_tau"].values()), len(taus))
    out["b"] = b
    # (c) RFS robustness at the highest temperature, and faster decay at the lowest
    def loss_at_max_drop(t):
        rows = R[t]["classification"]["rfs"]
        return rows[0]["probe"]["mean"] - rows[-1]["probe"]["mean"], rows[-1]["drop_rate"]

    hi, lo = taus[-1], taus[0]
    loss_hi, drop = loss_at_max_drop(hi)
    loss_lo, _ = loss_at_max_drop(lo)
    keeps, sooner = loss_hi <= KEEPS, loss_lo > loss_hi
    out["c"] = {"tau_high": hi, "tau_low": lo, "max_drop_rate": drop, "loss_high": loss_hi, "loss_low": loss_lo,
                "loss_per_tau": {t: loss_at_max_drop(t)[0] for t in taus},
                "high_keeps_accuracy": keeps, "low_degrades_sooner": sooner, "verdict": _verdict(keeps + sooner, 2)}
    # (d) largest compression (vs both fp32 embeddings) with accuracy within 1 point of concat
    d = {"per_tau": {}}
    for t in taus:
        cls = R[t]["classification"]
        best = _largest_within(cls["rfs"], cls["forms"]["concat"]["probe"])
        d["per_tau"][t] = best["compression"] if best else None
    best = max((v for v in d["per_tau"].values() if v), default=None)
    d["best_compression"] = best
    d["verdict"] = "held" if best and best >= LARGE else "partly held" if best else "did not hold"
    out["d"] = d
    return out


def _largest_within(rows, ref: float):
    """The row of largest compression whose mean linear-probe accuracy is within COMPARABLE of
    ref, or None."""
    ok = [r for r in rows if r["probe"]["mean"] >= ref - COMPARABLE]
    return max(ok, key=lambda r: r["compression"]) if ok else None


def _stored_forms(r) -> dict:
    """codec -> its rows at each drop rate: fp32 centroid + RFS (classification) and each codec."""
    forms = {"float32": r["classification"]["rfs"]}
    for x in r.get("codecs", []):
        forms.setdefault(x["codec"], []).append(x)
    return forms


def codec_compression(results) -> dict:
    """At <= 1 point of linear-probe accuracy below the fp32 concatenation: the largest
    compression (vs both fp32 embeddings) of centroid + RFS per τ and stored form, and whether
    it reaches GOAL."""
    R = results["temperatures"]
    taus = [t for t in _taus(results) if "classification" in R[t]]
    if not taus:
        return {"verdict": "not measured (the dataset has no class labels)"}
    per_tau = {}
    for t in taus:
        ref = R[t]["classification"]["forms"]["concat"]["probe"]
        per_tau[t] = {}
        for codec, rows in _stored_forms(R[t]).items():
            b = _largest_within(rows, ref)
            per_tau[t][codec] = None if b is None else {
                "compression": b["compression"], "bytes": b["bytes"], "drop_rate": b["drop_rate"], "keep": b["keep"],
                "spec": b.get("spec", codec), "probe": b["probe"]["mean"], "loss": ref - b["probe"]["mean"]}
    best_tau = {t: max((v["compression"] for v in per.values() if v), default=None) for t, per in per_tau.items()}
    reached = [t for t, v in best_tau.items() if v and v >= GOAL]
    verdict = ("reached at every τ" if len(reached) == len(taus) else
               f"reached at τ ∈ {{{', '.join(reached)}}} only" if reached else "not reached")
    return {"threshold": COMPARABLE, "goal": GOAL, "per_tau": per_tau, "best_per_tau": best_tau,
            "goal_reached": reached, "verdict": verdict}


# ---- tables ---------------------------------------------------------------------------------------------


def table_rows(results) -> dict:
    """name -> (header, rows): the CSV tables (also rendered into report.md)."""
    R = results["temperatures"]
    geo = (["tau", "final_loss", "modality_gap", "true_pair_cosine", "fisher_ratio", "n95_pooled", "n95_centroid"], [])
    cls = (["tau", "form", "bytes", "probe", "knn"], [])
    rfs = (["tau", "drop_rate", "keep", "bytes", "compression", "probe_mean", "probe_std", "knn_mean", "knn_std"], [])
    base = (["tau", "method", "budget", "bytes", "probe", "knn"], [])
    ret = (["tau", "direction", "R@1", "R@5", "R@10"], [])
    cod = (["tau", "codec", "spec", "drop_rate", "keep", "bytes", "compression", "probe_mean", "probe_std", "knn_mean",
            "knn_std"], [])
    for t in _taus(results):
        r = R[t]
        g = r["geometry"]
        geo[1].append([t, r["train"]["final_loss_avg10"], g["modality_gap"], g["true_pair_cosine"], g.get("fisher_ratio", ""),
                       g["n95_pooled"], g["n95_centroid"]])
        if "classification" in r:
            for name, f in r["classification"]["forms"].items():
                cls[1].append([t, name, f["bytes"], f["probe"], f["knn"]])
            for x in r["classification"]["rfs"]:
                rfs[1].append([t, x["drop_rate"], x["keep"], x["bytes"], x["compression"], x["probe"]["mean"], x["probe"]["std"],
                               x["knn"]["mean"], x["knn"]["std"]])
            for x in r["baselines"]:
                base[1].append([t, x["method"], x["budget"], x["bytes"], x["probe"], x["knn"]])
            for x in r.get("codecs", []):
                cod[1].append([t, x["codec"], x["spec"], x["drop_rate"], x["keep"], x["bytes"], x["compression"],
                               x["probe"]["mean"], x["probe"]["std"], x["knn"]["mean"], x["knn"]["std"]])
        for direction, rec in r["retrieval"].items():
            ret[1].append([t, direction, rec["1"], rec["5"], rec["10"]])
    return {"geometry": geo, "classification": cls, "rfs": rfs, "baselines": base, "codecs": cod, "retrieval": ret}


def write_tables(results, out_dir: str, csv) -> None:
    for name, (header, rows) in table_rows(results).items():
        with open(os.path.join(out_dir, f"{name}.csv"), "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _md(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def claim_text(c: dict) -> list:
    a = c["a"]
    gaps = ", ".join(f"τ={t}: {g:.3f}" for t, g in a["gaps"].items())
    lines = [f"**(a) Higher τ → smaller modality gap: {a['verdict']}.** Gaps {gaps}; Spearman(τ, gap) = "
             f"{a['spearman_tau_gap']:.2f}; strictly decreasing: {'yes' if a['strictly_decreasing'] else 'no'}."]
    if "per_tau" not in c["b"]:
        return lines + [f"**({k}) {c[k]['verdict']}.**" for k in "bcd"]
    b = c["b"]
    per = "; ".join(f"τ={t}: centroid {_pct(v['centroid_probe'])} vs concat {_pct(v['concat_probe'])} (kNN {_pct(v['centroid_knn'])} vs {_pct(v['concat_knn'])})"
                    for t, v in b["per_tau"].items())
    lines.append(f"**(b) Centroid ≈ or better than concatenation at half the storage: {b['verdict']}** "
                 f"(comparable = within {100 * COMPARABLE:.0f} point, linear probe). {per}.")
    cc = c["c"]
    per = ", ".join(f"τ={t}: {100 * v:+.1f} pt" for t, v in cc["loss_per_tau"].items())
    lines.append(f"**(c) τ={cc['tau_high']} keeps its accuracy at {100 * cc['max_drop_rate']:.0f}% of features dropped, "
                 f"low τ degrades sooner: {cc['verdict']}.** Accuracy lost from drop 0 to {cc['max_drop_rate']} "
                 f"(linear probe, mean over RFS seeds): {per}. High τ keeps (≤ {100 * KEEPS:.0f} pt): "
                 f"{'yes' if cc['high_keeps_accuracy'] else 'no'}; τ={cc['tau_low']} loses more than τ={cc['tau_high']}: "
                 f"{'yes' if cc['low_degrades_sooner'] else 'no'}.")
    d = c["d"]
    per = ", ".join(f"τ={t}: {v:.0f}×" if v else f"τ={t}: none" for t, v in d["per_tau"].items())
    best = f"{d['best_compression']:.0f}×" if d["best_compression"] else "none"
    lines.append(f"**(d) Large compression (≥ {LARGE:.0f}×) with no downstream loss: {d['verdict']}.** Largest "
                 f"compression of centroid + RFS (vs both fp32 embeddings) within {100 * COMPARABLE:.0f} point of "
                 f"concatenation: {per}; best {best}.")
    return lines


def codec_text(cc: dict) -> list:
    """The storage answer: one sentence and a τ x stored-form table of the largest compression
    within COMPARABLE of the concatenation."""
    if "per_tau" not in cc:
        return [f"Storage codecs: {cc['verdict']}."]
    from .evaluate import CODECS

    seen = {c for per in cc["per_tau"].values() for c in per}
    forms = [c for c in ("float32", *CODECS) if c in seen] + sorted(seen - {"float32", *CODECS})
    def cell(codec, v):
        if not v:
            return "none"
        spec = f"{v['spec']}, " if v["spec"] != codec else ""
        return f"{v['compression']:.0f}× ({spec}drop {v['drop_rate']:g}, {v['bytes']:g} B, {-100 * v['loss']:+.1f} pt)"

    rows = [[t] + [cell(c, per.get(c)) for c in forms] for t, per in cc["per_tau"].items()]
    best = ", ".join(f"τ={t}: {v:.0f}×" if v else f"τ={t}: none" for t, v in cc["best_per_tau"].items())
    return [f"**Largest compression (vs both fp32 embeddings) of centroid + RFS within {100 * cc['threshold']:.0f} "
            f"point of the fp32 concatenation (linear probe), per stored form:** best {best}. "
            f"Goal ≥ {cc['goal']:.0f}×: **{cc['verdict']}**. Cells: compression (pq spec, RFS drop rate, "
            f"stored bytes per item, probe accuracy change vs the concatenation).", "",
            _md(["tau"] + forms, rows), ""]


def write_report(results, timings: dict, out_dir: str) -> None:
    conf = results["config"]
    tabs = table_rows(results)
    parts = [
        "# Semantic compression: reproduction report",
        "",
        f"Data: `{conf['dataset']}` ({results['num_train']} train / {results['num_test']} test pairs), model "
        f"`{conf['model']}` (D = {results['dim']}), {conf['steps']} steps at batch {conf['batch_size']}, seed {conf['seed']}, "
        f"τ ∈ {{{', '.join(_taus(results))}}}. Probes are fit on train-split embeddings and scored on the test split; "
        f"RFS over seeds {list(conf['rfs_seeds'])}. Total time {timings['total_s']:.0f} s "
        f"(training {sum(timings['train_s'].values()):.0f} s, evaluation {sum(timings['eval_s'].values()):.0f} s).",
        "",
        "## Claims",
        "",
        *[line + "\n" for line in claim_text(results["claims"])],
        "## Storage codecs: largest compression at ≤ 1 point loss",
        "",
        *codec_text(results.get("codec_compression", {"verdict": "not measured"})),
        "## Geometry",
        _md(*tabs["geometry"]),
        "",
        "![gap vs tau](gap_vs_tau.png)",
        "",
    ]
    if tabs["classification"][1]:
        parts += ["## Classification by storage form", _md(*tabs["classification"]), "",
                  "## Centroid + RFS (mean ± std over RFS seeds)", _md(*tabs["rfs"]), "",
                  "![accuracy vs drop rate](acc_vs_drop.png)", "",
                  "## Equal-byte baselines on the centroid (PCA fp32, PCA + int8, product quantization)",
                  _md(*tabs["baselines"]), "", "![accuracy vs bytes](acc_vs_bytes.png)", "",
                  "## Centroid + RFS + storage codec (`semcomp compress --codec`; fitted on the train split, "
                  "scored after encode → decode; mean ± std over RFS seeds, pq over the first seed)",
                  _md(*tabs["codecs"]), ""]
    parts += ["## Retrieval (test pairs)", _md(*tabs["retrieval"]), ""]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
