"""`semcomp reproduce`: the paper's claims tested on the bundled labelled datasets.

Protocol (docs/reproduce.md): for each dataset and each training seed (shared across τ: the
same initialisation and data order at every temperature) train one encoder pair per τ, embed
the train and test splits, and measure per test item (`evaluate.evaluate_pair`); then combine
training seeds, RFS seeds and test items into intervals and apply the verdict rules fixed in
`analysis` (held / not held / inconclusive). Writes results.json, CSV tables, plots (PNG and
SVG) and report.md into one folder; timings go to timings.json.

results.json holds only quantities that are a function of the settings (no timings, no
paths): on one machine two runs with the same settings write byte-identical files. Training
runs live in OUT/runs/<dataset>/seed_<s>/tau_<t>/ and are resumed (or reused when finished)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch

from .analysis import CLAIM_TAU, TARGETS, combine_datasets, summarize_dataset
from .data import PairDataset, load_pairs
from .loop import TrainConfig, train
from .models import TINY, embed, embedding_width_check, image_size, tower_widths

__all__ = ["ReproduceConfig", "reproduce", "QUICK", "FULL"]

PAPER_TEMPERATURES = (0.01, 0.07, 0.1, 0.2, 0.4)
DROP_RATES = (0.0, 0.5, 0.75, 0.9, 0.95)


@dataclass
class ReproduceConfig:
    out_dir: str
    temperatures: tuple = PAPER_TEMPERATURES
    model: str = TINY
    text_tower: str = "open_clip"
    image_tower: str = "open_clip"
    datasets: tuple = ("mnist", "digits")
    data_root: str | None = None
    limit: int | None = None
    steps: int = 400
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 30
    seeds: tuple = (0, 1, 2, 3, 4)          # training seeds, shared across τ
    drop_rates: tuple = DROP_RATES
    targets: tuple = TARGETS                # compression targets of claim (d), vs both fp32 embeddings
    claim_tau: float = CLAIM_TAU
    rfs_seeds: tuple = tuple(range(10))
    codec_seeds: int = 3                    # RFS seeds used by the int8 / binary equal-byte rows
    knn_k: int = 10
    reps: int = 2000                        # bootstrap replicates
    threads: int | None = None
    quiet: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def dataset(self) -> str:  # the first dataset (single-dataset callers)
        return self.datasets[0]

    @property
    def seed(self) -> int:
        return self.seeds[0]


# --quick: every artefact and statistic, all five temperatures, 2 training seeds on a
# stratified half of MNIST; within ~5 minutes on a quiet 2-core CPU. Verdicts whose interval
# allows either outcome read "inconclusive".
QUICK = {"datasets": ("mnist",), "limit": 2000, "steps": 120, "warmup": 10, "seeds": (0, 1), "rfs_seeds": tuple(range(5)),
         "codec_seeds": 2, "reps": 1000}
FULL = {}


def _round(x, nd=6):
    """Round floats for the JSON so last-bit noise cannot make equal runs differ."""
    if isinstance(x, float):
        return round(x, nd)
    if isinstance(x, dict):
        return {str(k): _round(v, nd) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v, nd) for v in x]
    if hasattr(x, "item") and getattr(x, "ndim", 1) == 0:
        return _round(x.item(), nd)
    return x


def _load():
    """1-minute load average (None where the OS has none): wall times mean little without it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _tau_dir(out: str, tau: float, dataset: str = "mnist", seed: int = 0) -> str:
    return os.path.join(out, "runs", dataset, f"seed_{seed}", f"tau_{tau:g}")


def check_config(cfg: ReproduceConfig) -> None:
    """Refuse settings that bias or break the protocol, before any training."""
    w = tower_widths(cfg.model)
    if w["embed_dim"]:
        embedding_width_check(w["embed_dim"], w["image"] if cfg.image_tower == "open_clip" else None,
                              w["text"] if cfg.text_tower == "open_clip" else None, refuse=True)
    if not cfg.seeds or not cfg.rfs_seeds or not cfg.temperatures or not cfg.datasets:
        raise ValueError("reproduce: need at least one seed, RFS seed, temperature and dataset")
    if len(set(cfg.seeds)) != len(cfg.seeds) or len(set(cfg.rfs_seeds)) != len(cfg.rfs_seeds):
        raise ValueError("reproduce: --seeds and --rfs-seeds must not repeat a seed")
    if 0.0 not in cfg.drop_rates:
        raise ValueError("reproduce: --drop-rates must include 0 (the reference of claim (c))")


def _run_one(cfg: ReproduceConfig, ds: str, seed: int, tau: float, splits, labelled: bool, rs, dim, keeps,
             timings: dict, key: str):
    """Train (or reuse) one encoder pair, embed both splits and measure it: (result, dim, keeps);
    dim and keeps are fixed by the first run of a dataset."""
    from .evaluate import evaluate_pair, faiss_threads, rfs_keeps

    train_data, test_data = splits
    tcfg = TrainConfig(out_dir=_tau_dir(cfg.out_dir, tau, ds, seed), model=cfg.model, text_tower=cfg.text_tower,
                       image_tower=cfg.image_tower, dataset=ds, data_root=cfg.data_root, limit=cfg.limit,
                       temperature=tau, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                       warmup=cfg.warmup, seed=seed, checkpoint_every=max(50, cfg.steps // 4),
                       threads=cfg.threads, quiet=True)
    t0 = time.perf_counter()
    summary = train(tcfg)
    timings["train_s"][key] = time.perf_counter() - t0
    model, preprocess, tokenizer = summary["model"], summary["preprocess"], summary["tokenizer"]
    t0 = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        size = image_size(model)
        tr = embed(model, PairDataset(train_data, tokenizer, preprocess, size))
        te = embed(model, PairDataset(test_data, tokenizer, preprocess, size))
        if dim is None:
            dim = tr[0].shape[1]
            keeps = rfs_keeps(dim, cfg.drop_rates, cfg.targets)
        with faiss_threads(torch.get_num_threads()):
            res = evaluate_pair(tr, te, train_data.labels if labelled else None,
                                test_data.labels if labelled else None, keeps=keeps,
                                rfs_seeds=list(cfg.rfs_seeds), codec_seeds=cfg.codec_seeds, k=cfg.knn_k,
                                seed=0, w_item=rs.w_item)
    timings["eval_s"][key] = time.perf_counter() - t0
    hist = summary["history"]
    res["train"] = {"steps": summary["step"], "final_loss_avg10": sum(hist[-10:]) / len(hist[-10:])}
    return res, dim, keeps


def reproduce(cfg: ReproduceConfig) -> dict:
    from tqdm.auto import tqdm

    from ..eval.intervals import Resampler

    check_config(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    timings = {"train_s": {}, "eval_s": {}, "cpu_count": os.cpu_count(), "load_avg_start": _load()}
    t_all = time.perf_counter()
    taus = [f"{t:g}" for t in sorted(cfg.temperatures)]
    per_dataset, meta = {}, {}
    jobs = [(ds, s, t) for ds in cfg.datasets for s in cfg.seeds for t in sorted(cfg.temperatures)]
    tty = sys.stderr.isatty()  # elsewhere (a log file, a pipe) one log line per training run
    bar = tqdm(total=len(jobs), desc="reproduce", disable=cfg.quiet or not tty, leave=False)
    for ds in cfg.datasets:
        train_data, test_data = load_pairs(ds, cfg.data_root, cfg.limit)
        labelled = train_data.has_labels and test_data.has_labels
        rs = Resampler(len(cfg.seeds), len(cfg.rfs_seeds), len(test_data), reps=cfg.reps, seed=0)
        runs, dim, keeps = {}, None, None
        for seed in cfg.seeds:
            runs[seed] = {}
            for tau in sorted(cfg.temperatures):
                key = f"{ds}/seed_{seed}/tau_{tau:g}"
                res, dim, keeps = _run_one(cfg, ds, seed, tau, (train_data, test_data), labelled, rs, dim, keeps,
                                           timings, key)
                runs[seed][f"{tau:g}"] = res
                bar.update(1)
                if not cfg.quiet and not tty:
                    print(f"semcomp reproduce: {bar.n}/{len(jobs)} runs ({key})", file=sys.stderr, flush=True)
        per_dataset[ds] = summarize_dataset(runs, cfg.seeds, taus, rs, dim=dim, keeps=keeps, targets=cfg.targets,
                                            claim_tau=cfg.claim_tau)
        meta[ds] = {"num_train": len(train_data), "num_test": len(test_data), "dim": dim, "keeps": keeps,
                    "classes": int(train_data.labels.max()) + 1 if labelled else None}
        per_dataset[ds].update(meta[ds])
    bar.close()
    conf = dataclasses.asdict(cfg)
    for k in ("out_dir", "quiet", "threads", "extra"):
        conf.pop(k)
    results = _round({"config": conf, "datasets": per_dataset, "claims": combine_datasets(per_dataset),
                      "protocol": {"quick": bool(cfg.extra.get("quick")), "bootstrap_replicates": cfg.reps,
                                   "probe": "ridge least-squares classifier, centred + one global scale, L2 by 5-fold CV "
                                            "on train per storage form, exact solve",
                                   "retrieval_ties": "pessimistic (tied keys rank above the match)"}})
    with open(os.path.join(cfg.out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    from .plots import make_plots
    from .report import write_report, write_tables

    write_tables(results, cfg.out_dir, csv)
    make_plots(results, cfg.out_dir)
    timings["total_s"] = time.perf_counter() - t_all
    timings["load_avg_end"] = _load()
    with open(os.path.join(cfg.out_dir, "timings.json"), "w", encoding="utf-8") as f:
        json.dump(timings, f, indent=2)
    write_report(results, timings, cfg.out_dir)
    return results
