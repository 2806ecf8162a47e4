"""`semcomp reproduce`: train one encoder pair per temperature, embed, measure, and write
results.json, CSV tables, PNG plots and report.md into one folder.

results.json holds only quantities that are a function of the seed (no timings, no paths), so
two runs with the same settings write byte-identical files; timings go to timings.json.
Training runs live in OUT/runs/tau_<t>/ and are resumed (or reused when finished)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

import torch

from .data import PairDataset, load_pairs
from .evaluate import CODECS
from .loop import TrainConfig, train
from .models import TINY, embed, image_size

__all__ = ["ReproduceConfig", "reproduce", "QUICK"]

PAPER_TEMPERATURES = (0.01, 0.07, 0.1, 0.2, 0.4)
DROP_RATES = (0.0, 0.5, 0.75, 0.9, 0.95)


@dataclass
class ReproduceConfig:
    out_dir: str
    temperatures: tuple = PAPER_TEMPERATURES
    model: str = TINY
    text_tower: str = "open_clip"
    dataset: str = "mnist"
    data_root: str | None = None
    limit: int | None = None
    steps: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 30
    seed: int = 0
    drop_rates: tuple = DROP_RATES
    rfs_seeds: tuple = (0, 1, 2)
    codecs: tuple = CODECS  # storage codecs of centroid + RFS (evaluate.rfs_codecs)
    knn_k: int = 10
    probe_iter: int = 200
    threads: int | None = None
    quiet: bool = False
    extra: dict = field(default_factory=dict)


# --quick: every artefact, all five temperatures, within ~5 minutes on a shared 2-core CPU.
QUICK = {"steps": 120, "limit": 2000, "probe_iter": 30, "warmup": 10}


def _round(x, nd=6):
    """Round floats for the JSON so last-bit noise cannot make equal runs differ."""
    if isinstance(x, float):
        return round(x, nd)
    if isinstance(x, dict):
        return {str(k): _round(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    return x


def _tau_dir(out: str, tau: float) -> str:
    return os.path.join(out, "runs", f"tau_{tau:g}")


def evaluate_run(cfg: ReproduceConfig, model, tokenizer, preprocess, train_data, test_data) -> dict:
    from . import evaluate as E

    size = image_size(model)
    tr = embed(model, PairDataset(train_data, tokenizer, preprocess, size))
    te = embed(model, PairDataset(test_data, tokenizer, preprocess, size))
    labels = test_data.labels if test_data.has_labels else None
    out = {"geometry": E.geometry(*te, labels), "retrieval": E.retrieval(*te)}
    if labels is not None:
        kw = dict(k=cfg.knn_k, probe_iter=cfg.probe_iter, seed=cfg.seed)
        cls = E.classification(tr, te, train_data.labels, labels, drop_rates=cfg.drop_rates, rfs_seeds=cfg.rfs_seeds, **kw)
        out["classification"] = cls
        from ..functional import pair_centroids

        budgets = [r["bytes"] for r in cls["rfs"]]
        ctr, cte = pair_centroids(list(tr)), pair_centroids(list(te))
        with E.faiss_threads(torch.get_num_threads()):
            out["baselines"] = E.baselines(ctr, cte, train_data.labels, labels, budgets=budgets, **kw)
            out["codecs"] = E.rfs_codecs(ctr, cte, train_data.labels, labels, drop_rates=cfg.drop_rates,
                                         rfs_seeds=cfg.rfs_seeds, codecs=cfg.codecs, **kw)
    return out


def reproduce(cfg: ReproduceConfig) -> dict:
    from tqdm.auto import tqdm

    os.makedirs(cfg.out_dir, exist_ok=True)
    timings = {"train_s": {}, "eval_s": {}}
    t_all = time.perf_counter()
    train_data, test_data = load_pairs(cfg.dataset, cfg.data_root, cfg.limit)
    per_tau = {}
    for tau in tqdm(cfg.temperatures, desc="temperatures", disable=cfg.quiet, leave=False):
        tcfg = TrainConfig(out_dir=_tau_dir(cfg.out_dir, tau), model=cfg.model, text_tower=cfg.text_tower, dataset=cfg.dataset, data_root=cfg.data_root,
                           limit=cfg.limit, temperature=tau, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                           warmup=cfg.warmup, seed=cfg.seed, checkpoint_every=max(50, cfg.steps // 4),
                           threads=cfg.threads, quiet=cfg.quiet)
        t0 = time.perf_counter()
        summary = train(tcfg)
        timings["train_s"][f"{tau:g}"] = time.perf_counter() - t0
        model, preprocess, tokenizer = summary["model"], summary["preprocess"], summary["tokenizer"]
        t0 = time.perf_counter()
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            res = evaluate_run(cfg, model, tokenizer, preprocess, train_data, test_data)
        timings["eval_s"][f"{tau:g}"] = time.perf_counter() - t0
        hist = summary["history"]
        res["train"] = {"steps": summary["step"], "first_loss": hist[0], "final_loss": hist[-1],
                        "final_loss_avg10": sum(hist[-10:]) / len(hist[-10:])}
        per_tau[f"{tau:g}"] = res
    conf = dataclasses.asdict(cfg)
    conf.pop("out_dir")
    conf.pop("quiet")
    results = _round({"config": conf, "num_train": len(train_data), "num_test": len(test_data),
                      "dim": _dim(per_tau), "temperatures": per_tau})
    from .report import claims, codec_compression, write_report, write_tables

    results["claims"] = _round(claims(results))
    results["codec_compression"] = _round(codec_compression(results))
    with open(os.path.join(cfg.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    write_tables(results, cfg.out_dir, csv)
    from .plots import make_plots

    make_plots(results, cfg.out_dir)
    timings["total_s"] = time.perf_counter() - t_all
    with open(os.path.join(cfg.out_dir, "timings.json"), "w", encoding="utf-8") as f:
        json.dump(timings, f, indent=2)
    write_report(results, timings, cfg.out_dir)
    return results


def _dim(per_tau: dict) -> int | None:
    for res in per_tau.values():
        cls = res.get("classification")
        if cls:
            return cls["forms"]["centroid"]["bytes"] // 4
    return None
