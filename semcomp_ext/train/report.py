"""CSV tables and report.md of a reproduction, from results.json data (see `analysis` for the
statistics and the verdict rules).

Number formats, everywhere in the report: accuracies and recalls as percentages with one
decimal ("95.2%"), intervals in brackets in the same unit ("[94.1, 96.0]"), differences in
accuracy points with an explicit sign ("−1.8 pt": negative = the compressed form is worse),
gaps and cosines with three decimals, compression as "20×".

`codec_compression` / `codec_text` (the largest compression within 1 point, per storage codec)
are kept for results written by earlier versions; the current report compares storage forms at
equal bytes instead of taking a maximum."""

from __future__ import annotations

import math

import os

COMPARABLE = 0.01
GOAL = 16.0  # the project's target compression at <= COMPARABLE accuracy loss
MINUS = "−"
METHOD_ORDER = ("rfs", "rfs+int8", "rfs+binary", "pca", "pca+int8", "pq", "truncation")  # = evaluate.METHODS


def _taus(results) -> list:
    return sorted(results["temperatures"], key=float)


def _by_float(d: dict) -> list:
    """Items of a dict keyed by numbers as strings, in numeric order (JSON sorts keys as text)."""
    return sorted(d.items(), key=lambda kv: float(kv[0]))


def pct(x) -> str:
    return f"{100 * x:.1f}%"


def pts(x) -> str:
    v = 100 * x
    return f"{'+' if v >= 0.05 else MINUS if v <= -0.05 else '±'}{abs(v):.1f} pt"


def ci(s: dict, unit: str = "%") -> str:
    """'95.2% [94.1, 96.0]' for an accuracy stat, '−1.8 pt [−3.0, −0.6]' for a difference."""
    if unit == "%":
        return f"{100 * s['mean']:.1f}% [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}]"
    f = lambda v: f"{100 * v:+.1f}".replace("-", MINUS)  # noqa: E731
    return f"{pts(s['mean'])} [{f(s['lo'])}, {f(s['hi'])}]"


def sizes(s: dict) -> str:
    parts = [f"{s['n_seeds']} training seed{'s' if s['n_seeds'] != 1 else ''}"]
    if s.get("n_rfs", 1) > 1:
        parts.append(f"{s['n_rfs']} RFS seeds")
    parts.append(f"{s['n_test']} test items")
    return ", ".join(parts)


# ---- tables ---------------------------------------------------------------------------------------------


def table_rows(results) -> dict:
    """name -> (header, rows): the CSV tables (raw fractions, 6 decimals in results.json)."""
    geo = (["dataset", "tau", "final_loss", "modality_gap", "gap_lo", "gap_hi", "true_pair_cosine", "fisher_ratio",
            "n95_pooled", "n95_centroid", "r2_image_from_centroid", "r2_text_from_centroid"], [])
    cls = (["dataset", "tau", "form", "bytes", "probe", "probe_lo", "probe_hi", "knn", "knn_lo", "knn_hi"], [])
    rfs = (["dataset", "tau", "keep", "drop_rate", "bytes", "compression", "probe", "probe_lo", "probe_hi", "knn", "knn_lo",
            "knn_hi", "n_seeds", "n_rfs", "n_test"], [])
    base = (["dataset", "tau", "budget", "method", "bytes", "probe", "probe_lo", "probe_hi", "winner"], [])
    ret = (["dataset", "tau", "direction", "k", "recall", "lo", "hi"], [])
    for ds, D in results["datasets"].items():
        for t in sorted(D["temperatures"], key=float):
            r = D["temperatures"][t]
            g = r["geometry"]
            geo[1].append([ds, t, r["train"]["final_loss"]["mean"], g["modality_gap"]["mean"], g["modality_gap"]["lo"],
                           g["modality_gap"]["hi"], g["true_pair_cosine"]["mean"], g.get("fisher_ratio", {}).get("mean", ""),
                           g["n95_pooled"]["mean"], g["n95_centroid"]["mean"], r["recovery_r2"]["image"]["mean"],
                           r["recovery_r2"]["text"]["mean"]])
            for name, f in r.get("forms", {}).items():
                cls[1].append([ds, t, name, f["bytes"], f["probe"]["mean"], f["probe"]["lo"], f["probe"]["hi"],
                               f["knn"]["mean"], f["knn"]["lo"], f["knn"]["hi"]])
            for x in r.get("rfs", []):
                p, k = x["probe"], x["knn"]
                rfs[1].append([ds, t, x["keep"], x["drop_rate"], x["bytes"], x["compression"], p["mean"], p["lo"], p["hi"],
                               k["mean"], k["lo"], k["hi"], p["n_seeds"], p["n_rfs"], p["n_test"]])
            for row in r.get("budgets", []):
                for m, s in row["methods"].items():
                    base[1].append([ds, t, row["budget"], m, s["bytes"], s["mean"], s["lo"], s["hi"], int(m == row["winner"])])
            for direction, rec in r["retrieval"].items():
                for k, s in rec.items():
                    ret[1].append([ds, t, direction, k, s["mean"], s["lo"], s["hi"]])
    return {"geometry": geo, "classification": cls, "rfs": rfs, "baselines": base, "retrieval": ret}


def write_tables(results, out_dir: str, csv) -> None:
    for name, (header, rows) in table_rows(results).items():
        with open(os.path.join(out_dir, f"{name}.csv"), "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)


def _md(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- claims -----------------------------------------------------------------------------------------------

CLAIM_TITLES = {
    "a": "Higher τ → smaller modality gap",
    "b": "Centroid ≈ or better than concatenation at half the bytes",
    "c": "High τ keeps its accuracy with most features dropped; low τ degrades sooner",
    "d": "Large compression (≥ 10×) with no downstream loss",
}


def claim_lines(ds: str, D: dict) -> list:
    """One paragraph per claim for one dataset: the verdict, the rule, the numbers with their
    intervals and sample sizes."""
    c = D["claims"]
    a = c["a"]
    gaps = "; ".join(f"τ={t}: {g['mean']:.3f} [{g['lo']:.3f}, {g['hi']:.3f}]" for t, g in _by_float(a["gap"]))
    g0 = next(iter(a["gap"].values()))
    lines = [f"**(a) {CLAIM_TITLES['a']}: {a['verdict']}** ({ds}). Spearman(τ, gap) = −1 in {a['n_perfect']} of "
             f"{a['n_seeds']} training seeds (rule: {a['rule']}; per seed "
             f"{', '.join(f'{r:.2f}'.replace('-', MINUS) for r in a['spearman_per_seed'])}). Gap, mean and 95% interval: {gaps} "
             f"({sizes(g0)})."]
    if "per_tau" not in c["b"]:
        return lines + [f"**({k}) {CLAIM_TITLES[k]}: {c[k]['verdict']}.**" for k in "bcd"]
    b = c["b"]
    per = "; ".join(f"τ={t}: {ci(v['diff'], 'pt')} → {v['verdict']}{' (equivalent)' if v['equivalent'] else ''}"
                    for t, v in _by_float(b["per_tau"]))
    s0 = next(iter(b["per_tau"].values()))["diff"]
    lines.append(f"**(b) {CLAIM_TITLES['b']}: {b['verdict']}** ({ds}). Centroid − concatenation, linear probe, "
                 f"seed-mean paired difference with 90% interval (negative = centroid worse; rule: {b['rule']}): {per} "
                 f"({sizes(s0)}).")
    cc = c["c"]
    per = "; ".join(f"τ={t}: {ci(v['loss'], 'pt')} → {'keeps' if v['keeps'] == 'held' else 'does not keep' if v['keeps'] == 'not held' else 'inconclusive'}"
                    for t, v in _by_float(cc["per_tau"]))
    tr = cc["trend"]
    s0 = next(iter(cc["per_tau"].values()))["loss"]
    lines.append(f"**(c) {CLAIM_TITLES['c']}: {cc['verdict']}** ({ds}). Accuracy lost (positive = worse) from drop 0 to "
                 f"drop {cc['drop_rate']:.2f} ({cc['keep']} features kept), 95% interval: {per}. At τ={cc['tau']}: "
                 f"{cc['per_tau'][cc['tau']]['keeps']} (keeps = upper bound < {100 * cc['threshold']:.0f} pt). Trend: "
                 f"slope of the loss vs log10 τ = {100 * tr['mean']:+.1f} pt per decade "
                 f"[{100 * tr['lo']:+.1f}, {100 * tr['hi']:+.1f}] → {tr['verdict']} (negative = low τ loses more) "
                 f"({sizes(s0)}).".replace("-", MINUS).replace(f"{MINUS}>", "->"))
    d = c["d"]
    per = "; ".join(f"{tgt}× (keep {v['keep']}, {v['compression']:.1f}×): {ci(v['diff'], 'pt')} → {v['verdict']}"
                    for tgt, v in _by_float(d["per_target"]))
    s0 = next(iter(d["per_target"].values()))["diff"]
    lines.append(f"**(d) {CLAIM_TITLES['d']}: {d['verdict']}** ({ds}, verdict of the {d['headline_target']:g}× target). "
                 f"Centroid + RFS − concatenation at τ={d['tau']}, 95% interval (negative = compressed worse; held if the "
                 f"lower bound > −{100 * d['margin']:.0f} pt): {per} ({sizes(s0)}).")
    return lines


def budget_table(D: dict, tau: str) -> str:
    rows = []
    for row in D["temperatures"][tau].get("budgets", []):
        cells = []
        for m in [m for m in METHOD_ORDER if m in row["methods"]] + sorted(set(row["methods"]) - set(METHOD_ORDER)):
            s = row["methods"][m]
            star = "**" if m == row["winner"] else ""
            cells.append(f"{star}{m}{star} {ci(s)} ({s['bytes']:g} B)")
        tie = ""
        if "margin" in row:
            tie = (f"tied with {row['runner_up']} ({ci(row['margin'], 'pt')})" if row["tied"]
                   else f"wins by {ci(row['margin'], 'pt')} over {row['runner_up']}")
        rows.append([f"{row['budget']:g} B ({2 * D['dim'] * 4 / row['budget']:.1f}×)", row["winner"], tie, "; ".join(cells)])
    return _md(["budget (compression)", "best", "vs runner-up", "all methods: probe accuracy [95% interval] (stored bytes)"], rows)


def verdict_table(results) -> str:
    """Markdown table: claim × dataset verdicts and the combined verdict (README, docs)."""
    names = list(results["datasets"])
    rows = []
    for k in "abcd":
        c = results["claims"][k]
        rows.append([f"({k}) {CLAIM_TITLES[k]}"] + [c["per_dataset"].get(n, "—") for n in names] + [f"**{c['verdict']}**"])
    return _md(["claim"] + names + ["overall"], rows)


def _load_text(timings: dict) -> str:
    a, b = timings.get("load_avg_start"), timings.get("load_avg_end")
    if a is None or b is None:
        return ""
    return f" on {timings.get('cpu_count')} CPUs, 1-minute load average {a:g} at the start and {b:g} at the end"


def write_report(results, timings: dict, out_dir: str) -> None:
    conf = results["config"]
    parts = [
        "# Semantic compression: reproduction report",
        "",
        f"Model `{conf['model']}` (image tower: {conf['image_tower']}, text tower: {conf['text_tower']}), {conf['steps']} "
        f"steps at batch {conf['batch_size']}, training seeds {list(conf['seeds'])} shared across τ ∈ "
        f"{{{', '.join(f'{t:g}' for t in sorted(conf['temperatures']))}}}, RFS seeds {list(conf['rfs_seeds'])}, "
        f"{results['protocol']['bootstrap_replicates']} bootstrap replicates. Linear probe: "
        f"{results['protocol']['probe']}. Retrieval ties: {results['protocol']['retrieval_ties']}. "
        f"Total time {timings['total_s']:.0f} s (training {sum(timings['train_s'].values()):.0f} s, evaluation "
        f"{sum(timings['eval_s'].values()):.0f} s){_load_text(timings)}.",
        "",
        "Every interval combines training seeds, RFS seeds and test items (crossed bootstrap); verdicts are held / "
        "not held / inconclusive by the rules fixed in advance (docs/reproduce.md).",
        "",
        "## Verdicts",
        "",
        verdict_table(results),
        "",
    ]
    for ds, D in results["datasets"].items():
        parts += [f"## {ds}: {D['num_train']} train / {D['num_test']} test pairs, D = {D['dim']}", ""]
        parts += [line + "\n" for line in claim_lines(ds, D)]
        taus = sorted(D["temperatures"], key=float)
        chance = math.log(conf["batch_size"])  # InfoNCE of embeddings that tell no pair apart

        def loss_cell(r):
            v = r["train"]["final_loss"]["mean"]
            return f"{v:.3f}" + (" (≈ chance)" if v > chance - 0.05 else "")

        geo = [[t, loss_cell(r), f"{r['geometry']['modality_gap']['mean']:.3f} "
                f"[{r['geometry']['modality_gap']['lo']:.3f}, {r['geometry']['modality_gap']['hi']:.3f}]",
                f"{r['geometry']['true_pair_cosine']['mean']:.3f}", f"{r['recovery_r2']['image']['mean']:.3f}",
                f"{r['recovery_r2']['text']['mean']:.3f}"] for t, r in ((t, D["temperatures"][t]) for t in taus)]
        parts += [f"### Geometry ({ds})", "", _md(["τ", "final loss", "modality gap [95%]", "true-pair cosine",
                                                   "R² image ← centroid", "R² text ← centroid"], geo), "",
                  f"Final loss: training InfoNCE averaged over the last steps and the training seeds; log {conf['batch_size']} "
                  f"= {chance:.3f} is chance (embeddings that tell no pair apart), and a τ whose loss is within 0.05 of it "
                  "is marked: its encoders did not train, so what is measured at that τ speaks about the training "
                  "recipe, not about the method.",
                  "",
                  "R²: held-out linear recovery of each modality from the centroid (1.000 = the centroid is an "
                  "invertible code of both embeddings).", ""]
        if "forms" in D["temperatures"][taus[0]]:
            rows = [[t] + [ci(D["temperatures"][t]["forms"][f]["probe"]) for f in ("image", "text", "concat", "centroid")]
                    for t in taus]
            parts += [f"### Storage forms, linear probe ({ds})", "", _md(["τ", "image", "text", "concat", "centroid"], rows), ""]
            rows = [[t] + [ci(x["probe"]) for x in D["temperatures"][t]["rfs"]] for t in taus]
            head = [f"keep {x['keep']} ({x['compression']:.1f}×)" for x in D["temperatures"][taus[0]]["rfs"]]
            parts += [f"### Centroid + RFS, linear probe ({ds})", "", _md(["τ"] + head, rows), ""]
            ct = D["claims"]["d"]["tau"]
            parts += [f"### Equal bytes at τ={ct} ({ds}): which storage wins", "", budget_table(D, ct), ""]
        rows = [[t] + [ci(D["temperatures"][t]["retrieval"][d][k]) for d in ("image_to_text", "text_to_image") for k in ("1", "10")]
                for t in taus]
        parts += [f"### Retrieval, ties counted against the query ({ds})", "",
                  _md(["τ", "image→text R@1", "image→text R@10", "text→image R@1", "text→image R@10"], rows), ""]
    parts += ["## Plots", "", "![gap vs tau](gap_vs_tau.png)", "", "![accuracy vs features kept](acc_vs_kept.png)", ""]
    for ds in results["datasets"]:
        if os.path.exists(os.path.join(out_dir, f"acc_vs_bytes_{ds}.png")):
            parts += [f"![accuracy vs bytes, {ds}](acc_vs_bytes_{ds}.png)", ""]
    parts += ["Full tables: geometry.csv, classification.csv, rfs.csv, baselines.csv (every τ and budget), retrieval.csv.", ""]
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


# ---- earlier results layout: largest compression within 1 point, per storage codec ---------------------


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


