"""Plots of a reproduction (matplotlib, headless Agg backend, imported lazily), each written as
PNG and SVG. Error bars are the 95% intervals of results.json (training seeds × RFS seeds ×
test items); panels have their own y-axes; x is log-scaled where it spans decades (τ, features
kept, bytes) with the values actually run as ticks."""

from __future__ import annotations

import os

STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 9, "xtick.labelsize": 9,
         "ytick.labelsize": 9}
METHOD_STYLE = {"rfs": ("o-", "centroid + RFS (fp32)"), "rfs+int8": ("s-", "centroid + RFS + int8"),
                "rfs+binary": ("v-", "centroid + RFS + binary"), "pca": ("^--", "PCA (fp32)"),
                "pca+int8": ("D--", "PCA + int8"), "pq": ("x--", "product quantization"),
                "truncation": ("P:", "truncation (first K dims)")}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fixed metadata so the files do not change between identical runs.
    plt.rcParams["svg.hashsalt"] = "semcomp"
    plt.rcParams.update(STYLE)
    return plt


def _save(fig, out_dir: str, name: str) -> list:
    paths = []
    for ext, kw in (("png", {"dpi": 120, "metadata": {"Software": None}}), ("svg", {"metadata": {"Date": None}})):
        p = os.path.join(out_dir, f"{name}.{ext}")
        fig.savefig(p, bbox_inches="tight", **kw)
        paths.append(p)
    return paths


def _err(stats, scale=100.0):
    y = [scale * s["mean"] for s in stats]
    lo = [scale * (s["mean"] - s["lo"]) for s in stats]
    hi = [scale * (s["hi"] - s["mean"]) for s in stats]
    return y, [lo, hi]


def _tau_axis(ax, taus):
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator([float(t) for t in taus]))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels(taus)
    ax.set_xlabel("temperature τ")


def _log_axis(ax, values, label):
    """Log x with the values actually run as ticks."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log")
    vals = sorted(set(values))
    ax.xaxis.set_major_locator(FixedLocator(vals))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{v:g}" for v in vals])
    ax.set_xlabel(label)


def _bytes_axis(ax):
    """Log-2 byte axis with ticks at powers of two (the plotted sizes are too close to label
    every one)."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    lo, hi = ax.get_xlim()
    ticks = [2 ** k for k in range(0, 40) if lo <= 2 ** k <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.set_xlabel("bytes per item (log scale)")


def make_plots(results, out_dir: str) -> list:
    plt = _plt()
    paths = []
    datasets = results["datasets"]

    # gap and true-pair cosine vs τ: two panels, own y-axes, one line per dataset
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ds, D in datasets.items():
        taus = sorted(D["temperatures"], key=float)
        x = [float(t) for t in taus]
        gaps = [D["temperatures"][t]["geometry"]["modality_gap"] for t in taus]
        y, e = _err(gaps, 1.0)
        axes[0].errorbar(x, y, yerr=e, marker="o", capsize=3, label=ds)
        cos = [D["temperatures"][t]["geometry"]["true_pair_cosine"] for t in taus]
        axes[1].errorbar(x, [c["mean"] for c in cos], yerr=[[c["mean"] - c["min"] for c in cos], [c["max"] - c["mean"] for c in cos]],
                         marker="s", capsize=3, label=ds)
    for ax, (label, title) in zip(axes, (("modality gap ‖mean â − mean b̂‖", "Modality gap (95% interval)"),
                                         ("mean true-pair cosine", "True-pair cosine (seed min–max)"))):
        _tau_axis(ax, sorted({t for D in datasets.values() for t in D["temperatures"]}, key=float))
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    paths += _save(fig, out_dir, "gap_vs_tau")
    plt.close(fig)

    labelled = {ds: D for ds, D in datasets.items() if all("rfs" in r for r in D["temperatures"].values())}
    if not labelled:
        return paths
    # accuracy vs features kept: rows = datasets, columns = probe / kNN, own y-axes
    fig, axes = plt.subplots(len(labelled), 2, figsize=(11, 3.8 * len(labelled)), squeeze=False)
    for row, (ds, D) in zip(axes, labelled.items()):
        taus = sorted(D["temperatures"], key=float)
        for ax, metric in zip(row, ("probe", "knn")):
            for t in taus:
                rows = D["temperatures"][t]["rfs"]
                y, e = _err([r[metric] for r in rows])
                ax.errorbar([r["keep"] for r in rows], y, yerr=e, marker="o", capsize=3, label=f"τ={t}")
            _log_axis(ax, [r["keep"] for r in D["temperatures"][taus[0]]["rfs"]], f"features kept of D={D['dim']} (centroid + RFS)")
            ax.set_ylabel(f"{'linear probe' if metric == 'probe' else 'kNN'} test accuracy (%)")
            ax.set_title(f"{ds}: {'linear probe' if metric == 'probe' else 'kNN (k=10)'}")
            ax.grid(alpha=0.3)
        row[0].legend(title="temperature")
    paths += _save(fig, out_dir, "acc_vs_kept")
    plt.close(fig)

    # accuracy vs bytes: one figure per dataset, a grid of τ panels with own y-axes, one legend
    for ds, D in labelled.items():
        taus = sorted(D["temperatures"], key=float)
        ncol = min(3, len(taus))
        nrow = -(-len(taus) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.8 * nrow), squeeze=False)
        handles = {}
        for ax, t in zip(axes.flat, taus):
            r = D["temperatures"][t]
            for m, (style, label) in METHOD_STYLE.items():
                pts = [(row["methods"][m]["bytes"], row["methods"][m]) for row in r.get("budgets", []) if m in row["methods"]]
                if not pts:
                    continue
                pts.sort(key=lambda p: p[0])
                y, e = _err([p[1] for p in pts])
                h = ax.errorbar([p[0] for p in pts], y, yerr=e, fmt=style, capsize=2, markersize=4, label=label)
                handles[label] = h
            f = r["forms"]["concat"]
            h = ax.errorbar([f["bytes"]], [100 * f["probe"]["mean"]],
                            yerr=[[100 * (f["probe"]["mean"] - f["probe"]["lo"])], [100 * (f["probe"]["hi"] - f["probe"]["mean"])]],
                            fmt="k*", markersize=10, capsize=3, label="concatenation (fp32, 2 embeddings)")
            handles[h.get_label()] = h
            _bytes_axis(ax)
            ax.set_ylabel("linear probe accuracy (%)")
            ax.set_title(f"{ds}, τ={t}")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(taus):]:
            ax.axis("off")
        fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, bbox_to_anchor=(0.5, -0.02 - 0.03 * nrow))
        fig.tight_layout()
        paths += _save(fig, out_dir, f"acc_vs_bytes_{ds}")
        plt.close(fig)
    return paths
