"""Regenerate the documentation's reproduction results from a run's results.json:
`semcomp reproduce --render-docs RUN_DIR` rewrites the text between the markers

    <!-- reproduce-results:begin -->  ...  <!-- reproduce-results:end -->

in README.md ("What the reproduction finds") and docs/reproduce.md ("Results"), and copies the
run's artefacts (results.json, CSVs, plots, report.md, timings.json) to docs/results/<name>/
(name: "quick" for a --quick run, else "full")."""

from __future__ import annotations

import json
import os
import shutil

from .report import CLAIM_TITLES, ci, sizes, verdict_table

BEGIN, END = "<!-- reproduce-results:begin -->", "<!-- reproduce-results:end -->"
ARTEFACT_EXT = (".json", ".csv", ".png", ".svg", ".md")


def _headline(results, run_name: str, timings: dict | None) -> str:
    conf = results["config"]
    data = "; ".join(f"{ds}: {D['num_train']} train / {D['num_test']} test pairs, D = {D['dim']}"
                     for ds, D in results["datasets"].items())
    took = ""  # wall times depend on the machine's load: they are in report.md and timings.json
    return (f"From `docs/results/{run_name}/results.json` ({'--quick' if results['protocol'].get('quick') else 'full protocol'}: "
            f"{len(conf['seeds'])} training seeds shared across τ ∈ {{{', '.join(f'{t:g}' for t in sorted(conf['temperatures']))}}}, "
            f"{conf['steps']} steps each, {len(conf['rfs_seeds'])} RFS seeds, {data}{took}). Every interval combines "
            f"training seeds, RFS seeds and test items; each verdict is held / not held / inconclusive by a rule fixed in "
            f"advance (docs/reproduce.md).")


def _by_float(d: dict) -> list:
    """Items of a dict keyed by numbers as strings, in numeric order (results.json sorts keys
    as text: "10" before "2.5")."""
    return sorted(d.items(), key=lambda kv: float(kv[0]))


def _evidence(results) -> list:
    """One line per claim and dataset with the deciding numbers."""
    lines = []
    for ds, D in results["datasets"].items():
        c = D["claims"]
        a = c["a"]
        lines.append(f"- ({ds}) **(a) {a['verdict']}**: Spearman(τ, gap) = −1 in {a['n_perfect']} of {a['n_seeds']} seeds.")
        if "per_tau" not in c["b"]:
            continue
        b = c["b"]
        per = "; ".join(f"τ={t} {ci(v['diff'], 'pt')}" for t, v in _by_float(b["per_tau"]))
        s0 = next(iter(b["per_tau"].values()))["diff"]
        lines.append(f"- ({ds}) **(b) {b['verdict']}**: centroid − concat (90% interval): {per} ({sizes(s0)}).")
        cc = c["c"]
        tl = cc["per_tau"][cc["tau"]]["loss"]
        tr = cc["trend"]
        slope = f"{100 * tr['mean']:+.1f} pt/decade [{100 * tr['lo']:+.1f}, {100 * tr['hi']:+.1f}]".replace("-", "−")
        lines.append(f"- ({ds}) **(c) {cc['verdict']}**: loss at drop {cc['drop_rate']:.2f} at τ={cc['tau']}: "
                     f"{ci(tl, 'pt')} (keeps if < {100 * cc['threshold']:.0f} pt); slope of the loss vs log10 τ {slope} "
                     f"(trend {tr['verdict']}).")
        d = c["d"]
        per = "; ".join(f"{t}×: {ci(v['diff'], 'pt')} → {v['verdict']}" for t, v in _by_float(d["per_target"]))
        lines.append(f"- ({ds}) **(d) {d['verdict']}** (10× target): centroid + RFS − concat at τ={d['tau']}: {per}.")
    return lines


def _winners(results) -> list:
    lines = []
    for ds, D in results["datasets"].items():
        if "per_tau" not in D["claims"]["b"]:
            continue
        t = D["claims"]["d"]["tau"]
        cells = []
        for row in D["temperatures"][t].get("budgets", []):
            tie = f", tied with {row['runner_up']}" if row.get("tied") else ""
            cells.append(f"{row['budget']:g} B: {row['winner']} {ci(row['methods'][row['winner']])}{tie}")
        lines.append(f"- ({ds}, τ={t}) best storage at equal bytes: " + "; ".join(cells) + ".")
    return lines


def render_section(results, run_name: str = "full", timings: dict | None = None) -> str:
    """The markdown placed between the markers."""
    parts = [_headline(results, run_name, timings), "", verdict_table(results), "", *_evidence(results), "",
             *_winners(results), "",
             f"Details, tables and plots: [docs/results/{run_name}/report.md](docs/results/{run_name}/report.md)."]
    return "\n".join(parts)


def _replace(path: str, text: str) -> bool:
    with open(path, encoding="utf-8") as f:
        src = f.read()
    if BEGIN not in src or END not in src:
        raise ValueError(f"{path}: missing the markers {BEGIN} ... {END}")
    a, b = src.index(BEGIN) + len(BEGIN), src.index(END)
    new = src[:a] + "\n" + text + "\n" + src[b:]
    if new != src:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != src


def render_docs(run_dir: str, root: str = ".", run_name: str | None = None) -> list:
    """Copy RUN_DIR's artefacts to docs/results/<name>/ and rewrite the marked sections of
    README.md and docs/reproduce.md from its results.json. Returns the files written."""
    path = os.path.join(run_dir, "results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--render-docs: no results.json in {run_dir}")
    with open(path, encoding="utf-8") as f:
        results = json.load(f)
    if "datasets" not in results:
        raise ValueError(f"--render-docs: {path} was written by an earlier version (no 'datasets'); rerun semcomp reproduce")
    timings = None
    tpath = os.path.join(run_dir, "timings.json")
    if os.path.isfile(tpath):
        with open(tpath, encoding="utf-8") as f:
            timings = json.load(f)
    name = run_name or ("quick" if results["protocol"].get("quick") else "full")
    dest = os.path.join(root, "docs", "results", name)
    written = []
    if os.path.abspath(dest) != os.path.abspath(run_dir):
        if os.path.isdir(dest):
            shutil.rmtree(dest)
        os.makedirs(dest)
        for fname in sorted(os.listdir(run_dir)):
            if fname.endswith(ARTEFACT_EXT) and os.path.isfile(os.path.join(run_dir, fname)):
                shutil.copy2(os.path.join(run_dir, fname), os.path.join(dest, fname))
        written.append(dest + "/")
    section = render_section(results, name, timings)
    for doc in ("README.md", os.path.join("docs", "reproduce.md")):
        p = os.path.join(root, doc)
        text = section if doc == "README.md" else section.replace("(docs/results/", "(results/").replace(
            "(docs/reproduce.md)", "(below)")
        if _replace(p, text):
            written.append(p)
    return written


__all__ = ["render_docs", "render_section", "CLAIM_TITLES"]
