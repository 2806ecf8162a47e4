"""PNG plots of a reproduction (matplotlib, headless Agg backend, imported lazily)."""

from __future__ import annotations

import os


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Fixed metadata so the files do not change between identical runs.
    plt.rcParams["svg.hashsalt"] = "semcomp"
    return plt


def _save(fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})


def make_plots(results, out_dir: str) -> list:
    plt = _plt()
    R = results["temperatures"]
    taus = sorted(R, key=float)
    x = [float(t) for t in taus]
    paths = []

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot(x, [R[t]["geometry"]["modality_gap"] for t in taus], "o-", label="modality gap")
    ax.plot(x, [R[t]["geometry"]["true_pair_cosine"] for t in taus], "s--", label="true-pair cosine")
    ax.set_xscale("log")
    ax.set_xlabel("temperature τ")
    ax.set_title("Modality gap vs temperature")
    ax.legend()
    ax.grid(alpha=0.3)
    paths.append(os.path.join(out_dir, "gap_vs_tau.png"))
    _save(fig, paths[-1])
    plt.close(fig)

    if not all("classification" in R[t] for t in taus):
        return paths
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, metric in zip(axes, ("probe", "knn")):
        for t in taus:
            rows = R[t]["classification"]["rfs"]
            ax.errorbar([r["drop_rate"] for r in rows], [r[metric]["mean"] for r in rows], yerr=[r[metric]["std"] for r in rows],
                        marker="o", capsize=3, label=f"τ={t}")
        ax.set_xlabel("RFS drop rate (centroid)")
        ax.set_title(f"{'Linear probe' if metric == 'probe' else 'kNN'} accuracy vs drop rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(fontsize=8)
    paths.append(os.path.join(out_dir, "acc_vs_drop.png"))
    _save(fig, paths[-1])
    plt.close(fig)

    fig, axes = plt.subplots(1, len(taus), figsize=(3.4 * len(taus), 3.6), sharey=True, squeeze=False)
    for ax, t in zip(axes[0], taus):
        cls = R[t]["classification"]
        rows = cls["rfs"]
        ax.errorbar([r["bytes"] for r in rows], [r["probe"]["mean"] for r in rows], yerr=[r["probe"]["std"] for r in rows],
                    marker="o", capsize=3, label="centroid+RFS")
        for method, style in (("pca", "s--"), ("pca+int8", "^--"), ("pq", "d--")):
            b = [r for r in R[t]["baselines"] if r["method"] == method]
            if b:
                ax.plot([r["bytes"] for r in b], [r["probe"] for r in b], style, label=method)
        for codec, style in (("int8", "o:"), ("binary", "v:"), ("pq", "x:")):
            c = [r for r in R[t].get("codecs", []) if r["codec"] == codec]
            if c:
                ax.plot([r["bytes"] for r in c], [r["probe"]["mean"] for r in c], style, label=f"centroid+RFS+{codec}")
        f = cls["forms"]
        ax.plot([f["concat"]["bytes"]], [f["concat"]["probe"]], "k*", markersize=10, label="concat (fp32)")
        ax.set_xscale("log")
        ax.set_xlabel("bytes per item")
        ax.set_title(f"τ={t}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("linear probe accuracy")
    axes[0][-1].legend(fontsize=7)
    paths.append(os.path.join(out_dir, "acc_vs_bytes.png"))
    _save(fig, paths[-1])
    plt.close(fig)
    return paths
