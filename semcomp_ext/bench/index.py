"""Benchmark of `semcomp index` / `semcomp search`: build time, peak RSS and recall@10 against
exact search, on clustered synthetic embeddings; and the recall benchmark of `semcomp search`
over compressed CLIP-like sets (`search_recall_set`, behind benchmarks/bench_search.py).

Data (`clustered`): `clusters` unit centres, each row a centre plus isotropic Gaussian noise
of norm ~`spread`, normalised (cosine ~ 1/sqrt(1 + spread²) to its centre: 0.71 at spread 1).
The centres are uniform on the sphere, or (`latent` = L) the images of Gaussian points of an
L-dimensional space, so that clusters are correlated and neighbourhoods overlap, as the
topics of an embedding collection do. Embedding collections are clustered like this (by
topic, language, source); uniform noise is not, and no IVF index finds its neighbours at a
useful nprobe. Queries are fresh rows of the same clusters, not in the collection. The
benchmark's default (10 rows a cluster, latent 32, spread 1) is the hardest of the settings
tried at 50k x 384 (IVF256,Flat needs nprobe 8 for recall@10 0.93; with 100 rows a cluster
and uniform centres, nprobe 1 gives 1.0).

The collection is written as one `.npy` input used as both modalities of `semcomp compress`
(`--keep` = all dimensions, no normalisation), so the compressed folder stores the rows
themselves (column-permuted by RFS) in the requested dtype. The index is then built by the
`semcomp` CLI's `main(["index", DIR])` in a fresh child process: wall time and CPU time (all
threads) of the call, and the child's peak RSS (VmHWM). Recall: `search(DIR, queries, 10)` against `search(..., exact=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

__all__ = ["clustered", "write_pair_input", "compress_rows", "index_in_child", "index_case", "run_index_benchmark",
           "unit_rows", "recalls", "search_recall_set", "faiss_version", "synthetic_clip", "reproduce_quick_embeddings",
           "run_search_benchmark"]

GEN_ROWS = 1 << 16


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def clustered(n: int, dim: int, *, clusters: int, spread: float = 1.0, latent: int | None = None, seed: int = 0,
              centres_seed: int = 0, dtype=np.float32) -> np.ndarray:
    """n unit rows around `clusters` random unit centres (module doc); the centres depend on
    centres_seed (and latent) only, so two calls with other seeds draw from the same clusters."""
    rc = np.random.default_rng(centres_seed)
    if latent:
        centres = unit_rows(rc.standard_normal((clusters, latent), dtype=np.float32)
                            @ rc.standard_normal((latent, dim), dtype=np.float32))
    else:
        centres = unit_rows(rc.standard_normal((clusters, dim), dtype=np.float32))
    rng = np.random.default_rng([seed, 1])
    out = np.empty((n, dim), dtype=dtype)
    scale = np.float32(spread / np.sqrt(dim))
    for s in range(0, n, GEN_ROWS):  # in blocks: memory stays ~ the output
        m = min(GEN_ROWS, n - s)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        x *= scale
        x += centres[rng.integers(0, clusters, m)]
        out[s:s + m] = unit_rows(x)
    return out


def write_pair_input(root: str, x: np.ndarray, shard_rows: int = 1 << 18) -> list:
    """x as .npy shards in ROOT/img_emb; ROOT/text_emb holds hard links to the same files
    (the pair centroid of a row with itself is the row). Returns the two folders."""
    img, txt = os.path.join(root, "img_emb"), os.path.join(root, "text_emb")
    os.makedirs(img, exist_ok=True)
    os.makedirs(txt, exist_ok=True)
    for i, s in enumerate(range(0, len(x), shard_rows)):
        name = f"emb_{i:05d}.npy"
        np.save(os.path.join(img, name), x[s:s + shard_rows])
        os.link(os.path.join(img, name), os.path.join(txt, name))
    return [img, txt]


def compress_rows(root: str, out: str, x: np.ndarray) -> str:
    """A compressed folder storing x's rows (all columns kept, dtype of x) in OUT."""
    from semcomp_ext.compress import CompressOptions, compress

    ins = write_pair_input(os.path.join(root, "input"), x)
    compress(CompressOptions(inputs=ins, out=out, keep=x.shape[1], normalize="none", quiet=True))
    shutil.rmtree(os.path.join(root, "input"))
    return out


_CHILD = """
import json, os, sys, time
from semcomp_ext.cli import main
t, c = time.perf_counter(), os.times()
rc = main(sys.argv[1:])
wall, c2 = time.perf_counter() - t, os.times()
hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))
cpu = c2.user + c2.system - c.user - c.system
print(json.dumps({"rc": rc, "seconds": wall, "cpu_seconds": cpu, "peak_rss_mb": hwm / 1024}))
"""


def index_in_child(folder: str, *args: str, echo: bool = True) -> dict:
    """`semcomp index FOLDER ARGS` (the CLI's main) in a fresh Python: its wall time, its peak
    RSS and the index.json it wrote. Progress lines go to this process's stderr when echo."""
    cmd = [sys.executable, "-c", _CHILD, "index", folder, *args]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None if echo else subprocess.DEVNULL, text=True, check=False)
    lines = p.stdout.strip().splitlines()
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"semcomp index failed (exit {p.returncode}): {' '.join(cmd[3:])}")
    res = json.loads(lines[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"semcomp index returned {res['rc']}: {' '.join(cmd[3:])}")
    with open(os.path.join(folder, "index", "index.json")) as f:
        res["index_json"] = json.load(f)
    return res


def index_case(work: str, n: int, dim: int, dtype: str, *, clusters: int, queries: int = 1000, spread: float = 1.0,
               latent: int | None = None, k: int = 10, index_args=(), seed: int = 0) -> dict:
    """One row of the index benchmark (module doc): data, compressed folder, index build in a
    child, recall@k of the default nprobe against exact search."""
    from semcomp_ext.compress.index import recall_at_k, search

    t = time.perf_counter()
    x = clustered(n, dim, clusters=clusters, spread=spread, latent=latent, seed=seed, dtype=np.dtype(dtype))
    q = clustered(queries, dim, clusters=clusters, spread=spread, latent=latent, seed=seed + 1)
    t_gen = time.perf_counter() - t
    out = os.path.join(work, f"c{n}x{dim}")
    t = time.perf_counter()
    compress_rows(work, out, x)
    t_compress = time.perf_counter() - t
    del x
    load = os.getloadavg()
    built = index_in_child(out, *index_args)
    load_after = os.getloadavg()
    info = built.pop("index_json")
    t = time.perf_counter()
    got = search(out, q, k)
    t_search = time.perf_counter() - t
    t = time.perf_counter()
    exact = search(out, q, k, exact=True)
    t_exact = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    return {
        "rows": n, "dim": dim, "dtype": dtype, "clusters": clusters, "spread": spread, "latent": latent,
        "queries": queries, "k": k,
        "index_args": list(index_args), "factory": info["factory"], "nprobe": info["nprobe"],
        "index_wall_s": round(built["seconds"], 2), "index_cpu_s": round(built["cpu_seconds"], 2),
        "index_peak_rss_mb": round(built["peak_rss_mb"], 1),
        f"recall@{k}": round(recall_at_k(got.rows, exact.rows, k), 4),
        "train_s": info["train_seconds"], "add_s": info["add_seconds"], "build_s": info["build_seconds"],
        "nprobe_tuning": info["nprobe_tuning"], "choice": info["choice"], "threads": info["threads"],
        "search_s": round(t_search, 3), "exact_search_s": round(t_exact, 3),
        "generate_s": round(t_gen, 2), "compress_s": round(t_compress, 2),
        "load_average_before": load, "load_average_after": load_after,
    }


def faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return faiss.__version__


def run_index_benchmark(cases, *, work: str, queries: int = 1000, rows_per_cluster: int = 10, spread: float = 1.0,
                        latent: int | None = 32, index_args=(), log=print) -> dict:
    """Every (rows, dim, dtype) of `cases` through `index_case` (clusters = rows //
    rows_per_cluster); the payload of benchmarks/results/index_cpu.json (environment added
    by the caller)."""
    from semcomp_ext.compress.heartbeat import usable_cores

    rows = []
    for n, dim, dtype in cases:
        r = index_case(work, n, dim, dtype, clusters=max(1, n // rows_per_cluster), queries=queries, spread=spread,
                       latent=latent, index_args=index_args)
        log(json.dumps({k: v for k, v in r.items() if k not in ("choice", "nprobe_tuning")}))
        rows.append(r)
    return {
        "what": "semcomp index (the CLI's main in a fresh child process) on a compressed folder of clustered "
                "synthetic unit rows; recall@10 of `semcomp search` at the index's default nprobe against "
                "exact search over the same stored vectors",
        "data": f"clusters = rows // {rows_per_cluster} unit centres ({'uniform' if not latent else f'from a {latent}-dim latent space'}), "
                f"noise norm {spread}, normalised; {queries} held-out queries from the same clusters",
        "faiss": faiss_version(), "usable_cores": usable_cores(), "results": rows,
    }


def recalls(got: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """10-recall@10 (overlap of the top k) and 1-recall@k (the exact nearest in the top k)."""
    overlap = np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(got, truth)])
    top1 = np.mean([b[0] in set(a[:k]) for a, b in zip(got, truth)])
    return {f"recall@{k}": round(float(overlap), 4), f"1-recall@{k}": round(float(top1), 4)}


def search_recall_set(work: str, name: str, img: np.ndarray, txt: np.ndarray, queries: np.ndarray, *,
                      indexes=("flat",), drops=(0.5, 0.9), k: int = 10, log=print) -> dict:
    """`semcomp search` over the compressed pair centroids of (img, txt) at each RFS drop rate
    (`--normalize output`), for each index kind ("flat": exact inner product over the
    compressed vectors, the loss of compression alone; "auto": `semcomp index`'s choice),
    against the top-k cosine of the queries over the normalised full-D centroids."""
    from semcomp_ext.cli import main
    from semcomp_ext.compress.index import build_index, search

    truth = np.argsort(-(queries @ unit_rows((img + txt) / 2).T), axis=1, kind="stable")[:, :k]
    src = os.path.join(work, name, "in")
    folders = []
    for mod, z in (("img", img), ("text", txt)):
        d = os.path.join(src, f"{mod}_emb")
        os.makedirs(d, exist_ok=True)
        for i, s in enumerate(range(0, len(z), 8192)):
            np.save(os.path.join(d, f"{mod}_emb_{i:04d}.npy"), np.ascontiguousarray(z[s:s + 8192], np.float32))
        folders.append(d)
    gap = float(np.linalg.norm(unit_rows(img).mean(0) - unit_rows(txt).mean(0)))
    res = {"rows": len(img), "queries": len(queries), "dim": img.shape[1], "modality_gap": round(gap, 4), "drops": {}}
    for drop in drops:
        out = os.path.join(work, name, f"drop{drop}")
        if main(["compress", src, "-o", out, "--drop-rate", str(drop), "--normalize", "output", "-q"]) != 0:
            raise RuntimeError(f"semcomp compress failed on {src}")
        row = {}
        for kind in indexes:
            t0 = time.perf_counter()
            info = build_index(out, index_factory="Flat" if kind == "flat" else None)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            hits = search(out, queries, k)
            t_search = time.perf_counter() - t0
            row[kind] = {"factory": info["factory"], "nprobe": info["nprobe"], "keep": info["dim"],
                         **recalls(hits.ids, truth, k), "build_s": round(t_build, 2), "search_s": round(t_search, 3)}
            log(f"{name} drop {drop} {kind}: {row[kind]}")
        res["drops"][str(drop)] = row
    shutil.rmtree(os.path.join(work, name), ignore_errors=True)
    return res


def synthetic_clip(rows: int, queries: int, seed: int = 0):
    """(img, txt, queries): embeddings shaped like CLIP ViT-B/32's (D = 512, unit rows, two
    modalities with a modality gap, low-rank signal: semcomp_ext.synthetic.make_multimodal);
    the queries are image embeddings of held-out concepts."""
    from semcomp_ext.synthetic import make_multimodal

    n = rows + queries
    s = make_multimodal(num_classes=100, per_class=n // 100 + 1, dim=512, latent=64, gap=0.8, noise=0.5, seed=seed)
    perm = np.random.default_rng(seed).permutation(len(s.labels))
    img, txt = (z.numpy()[perm] for z in s.zs)
    return img[:rows], txt[:rows], img[rows:n]


def reproduce_quick_embeddings(run_dir: str, tau: float = 0.07):
    """(train img, train txt, test img): the encoder pair of `semcomp reproduce --quick`'s
    configuration at temperature tau (its first dataset and seed), trained in RUN_DIR/tau_{tau}
    (reused when a finished run is there), embedding its train and test pairs."""
    import torch

    from semcomp_ext.train.data import PairDataset, load_pairs
    from semcomp_ext.train.loop import TrainConfig, train
    from semcomp_ext.train.models import embed, image_size
    from semcomp_ext.train.reproduce import QUICK, ReproduceConfig

    cfg = ReproduceConfig(out_dir=run_dir, temperatures=(tau,), quiet=True, **QUICK)
    tcfg = TrainConfig(out_dir=os.path.join(run_dir, f"tau_{tau:g}"), model=cfg.model, text_tower=cfg.text_tower,
                       dataset=cfg.dataset, data_root=cfg.data_root, limit=cfg.limit, temperature=tau, steps=cfg.steps,
                       batch_size=cfg.batch_size, lr=cfg.lr, warmup=cfg.warmup, seed=cfg.seed,
                       checkpoint_every=max(50, cfg.steps // 4), threads=cfg.threads, quiet=True)
    train_data, test_data = load_pairs(cfg.dataset, cfg.data_root, cfg.limit)
    summary = train(tcfg)
    model, preprocess, tokenizer = summary["model"], summary["preprocess"], summary["tokenizer"]
    size = image_size(model)
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        tr = embed(model, PairDataset(train_data, tokenizer, preprocess, size))
        te = embed(model, PairDataset(test_data, tokenizer, preprocess, size))
    return tr[0].numpy(), tr[1].numpy(), te[0].numpy()


def run_search_benchmark(*, work: str, rows: int = 20000, queries: int = 1000, indexes=("flat",),
                         reproduce_dir: str | None = None, skip_reproduce: bool = False, k: int = 10, log=print) -> dict:
    """The payload of benchmarks/results/search_cpu.json: `search_recall_set` on the synthetic
    CLIP-like set and (unless skip_reproduce) on the `reproduce --quick` encoders' embeddings."""
    payload = {"k": k, "normalize": "output", "sets": {}}
    img, txt, q = synthetic_clip(rows, queries)
    payload["sets"]["synthetic_clip_like"] = search_recall_set(work, "synthetic", img, txt, q, indexes=indexes, k=k, log=log)
    if not skip_reproduce:
        t0 = time.perf_counter()
        img, txt, q = reproduce_quick_embeddings(reproduce_dir or os.path.join(work, "reproduce"))
        t_embed = round(time.perf_counter() - t0, 1)
        res = search_recall_set(work, "reproduce_quick", img, txt, q, indexes=indexes, k=k, log=log)
        res["train_and_embed_s"] = t_embed
        payload["sets"]["reproduce_quick_tau0.07"] = res
    return payload
