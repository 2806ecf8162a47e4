"""Recall of `semcomp search` over compressed vectors against exact search on the uncompressed
centroids (numpy, full D), for RFS drop rates 0.5 and 0.9.

    python benchmarks/bench_search.py [--rows 20000] [--queries 1000] [--index flat auto]
                                      [--reproduce-dir DIR] [--skip-reproduce]

Data: (1) synthetic embeddings shaped like CLIP ViT-B/32's (D = 512, unit rows, two modalities
with a modality gap, low-rank signal: semcomp_ext.synthetic.make_multimodal); the database is
the pair centroids of `--rows` concepts, the queries the image embeddings of `--queries`
held-out concepts. (2) unless --skip-reproduce: image/text embeddings of the encoders that
`semcomp reproduce --quick` trains (tau = 0.07; the run in DIR/runs/tau_0.07 is reused when
it exists, else trained there, ~1 minute on 2 cores): database = centroids of the training
pairs, queries = test images.

Each set is written as clip-retrieval shards, compressed with `--normalize output` (cosine
search), indexed (`--index flat`: exact inner product over the compressed vectors, i.e. the
loss of compression alone; `--index auto`: the default factory of `semcomp index`, IVF-PQ
from 10 000 rows) and searched. Ground truth: top-k cosine of the queries against the
normalised full-D centroids. Reports 10-recall@10 (overlap of the top 10) and 1-recall@10
(the exact nearest neighbour in the top 10), plus index build and search time.
Writes benchmarks/results/search_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

try:
    from .common import environment, write_result
except ImportError:  # run as a script
    from common import environment, write_result

K = 10
DROPS = (0.5, 0.9)
SHARD_ROWS = 8192


def _unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def write_clip(root: str, img: np.ndarray, txt: np.ndarray) -> None:
    for name, z in (("img", img), ("text", txt)):
        os.makedirs(os.path.join(root, f"{name}_emb"), exist_ok=True)
        for i, s in enumerate(range(0, len(z), SHARD_ROWS)):
            np.save(os.path.join(root, f"{name}_emb", f"{name}_emb_{i:04d}.npy"),
                    np.ascontiguousarray(z[s:s + SHARD_ROWS], np.float32))


def recalls(got: np.ndarray, truth: np.ndarray) -> dict:
    overlap = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(got, truth)])
    top1 = np.mean([b[0] in set(a) for a, b in zip(got, truth)])
    return {f"recall@{K}": round(float(overlap), 4), f"1-recall@{K}": round(float(top1), 4)}


def modality_gap(img: np.ndarray, txt: np.ndarray) -> float:
    return float(np.linalg.norm(_unit(img).mean(0) - _unit(txt).mean(0)))


def run_set(name: str, img: np.ndarray, txt: np.ndarray, queries: np.ndarray, indexes, work: str) -> dict:
    from semcomp_ext.cli import main
    from semcomp_ext.compress.index import build_index, search

    truth = np.argsort(-(queries @ _unit((img + txt) / 2).T), axis=1, kind="stable")[:, :K]
    src = os.path.join(work, name, "in")
    write_clip(src, img, txt)
    res = {"rows": len(img), "queries": len(queries), "dim": img.shape[1],
           "modality_gap": round(modality_gap(img, txt), 4), "drops": {}}
    for drop in DROPS:
        out = os.path.join(work, name, f"drop{drop}")
        assert main(["compress", src, "-o", out, "--drop-rate", str(drop), "--normalize", "output", "-q"]) == 0
        row = {}
        for kind in indexes:
            t0 = time.perf_counter()
            info = build_index(out, index_factory="Flat" if kind == "flat" else None)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            hits = search(out, queries, K)
            t_search = time.perf_counter() - t0
            row[kind] = {"factory": info["factory"], "nprobe": info["nprobe"], "keep": info["dim"],
                         **recalls(hits.ids, truth), "build_s": round(t_build, 2), "search_s": round(t_search, 3)}
            print(f"{name} drop {drop} {kind}: {row[kind]}", flush=True)
        res["drops"][str(drop)] = row
    return res


def synthetic_clip(rows: int, queries: int, seed: int = 0):
    from semcomp_ext.synthetic import make_multimodal

    n = rows + queries
    s = make_multimodal(num_classes=100, per_class=n // 100 + 1, dim=512, latent=64, gap=0.8, noise=0.5, seed=seed)
    perm = np.random.default_rng(seed).permutation(len(s.labels))
    img, txt = (z.numpy()[perm] for z in s.zs)
    return img[:rows], txt[:rows], img[rows:n]


def reproduce_quick_embeddings(run_dir: str, tau: float = 0.07):
    """Train (or reuse) the --quick encoder pair at tau as `semcomp reproduce --quick` does
    (same TrainConfig and data), and embed its train and test pairs."""
    import torch

    from semcomp_ext.train.data import PairDataset, load_pairs
    from semcomp_ext.train.loop import TrainConfig, train
    from semcomp_ext.train.models import embed, image_size
    from semcomp_ext.train.reproduce import QUICK, ReproduceConfig, _tau_dir

    cfg = ReproduceConfig(out_dir=run_dir, temperatures=(tau,), quiet=True, **QUICK)
    tcfg = TrainConfig(out_dir=_tau_dir(run_dir, tau), model=cfg.model, text_tower=cfg.text_tower, dataset=cfg.dataset,
                       data_root=cfg.data_root, limit=cfg.limit, temperature=tau, steps=cfg.steps, batch_size=cfg.batch_size,
                       lr=cfg.lr, warmup=cfg.warmup, seed=cfg.seed, checkpoint_every=max(50, cfg.steps // 4),
                       threads=cfg.threads, quiet=True)
    train_data, test_data = load_pairs(cfg.dataset, cfg.data_root, cfg.limit)
    summary = train(tcfg)
    model, preprocess, tokenizer = summary["model"], summary["preprocess"], summary["tokenizer"]
    size = image_size(model)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        tr = embed(model, PairDataset(train_data, tokenizer, preprocess, size))
        te = embed(model, PairDataset(test_data, tokenizer, preprocess, size))
    return tr[0].numpy(), tr[1].numpy(), te[0].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--index", nargs="+", default=["flat"], choices=["flat", "auto"])
    ap.add_argument("--reproduce-dir", help="a `semcomp reproduce --quick` output folder (default: a temp folder)")
    ap.add_argument("--skip-reproduce", action="store_true")
    ap.add_argument("--out", default="search_cpu.json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench_search_")
    payload = {"environment": environment("cpu"), "k": K, "normalize": "output", "sets": {}}
    try:
        img, txt, q = synthetic_clip(args.rows, args.queries)
        payload["sets"]["synthetic_clip_like"] = run_set("synthetic", img, txt, q, args.index, work)
        if not args.skip_reproduce:
            t0 = time.perf_counter()
            img, txt, q = reproduce_quick_embeddings(args.reproduce_dir or os.path.join(work, "reproduce"))
            t_embed = round(time.perf_counter() - t0, 1)
            res = run_set("reproduce_quick", img, txt, q, args.index, work)
            res["train_and_embed_s"] = t_embed
            payload["sets"]["reproduce_quick_tau0.07"] = res
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(write_result(args.out, payload))


if __name__ == "__main__":
    main()
