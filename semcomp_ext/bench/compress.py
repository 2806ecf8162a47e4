"""Throughput, CPU time and peak RSS of `semcomp compress` on synthetic fp32 shards (page cache).

    python -m benchmarks.bench_compress [--gb 2] [--workers 1 2] [--tiny 1000 10000] [--engines local ray]

(benchmarks/bench_compress.py is the entry point; this module is the implementation, and each
measured job runs in a fresh `python -m semcomp_ext.bench.compress --worker` child.)

* **Large input** (`--gb`, GiB; `--repeats` interleaved rounds, medians; M=2 modality folders of fp32 D=512 `.npy` shards of 65536 rows,
  read once first so they are in the page cache): pair centroids + RFS at drop 0.5 for each
  `--workers` N, each in a fresh child process. Wall time is measured from the call of
  compress() (which opens the first shard) to its return (manifest complete and fsynced);
  CPU time (user+sys of the child, every thread) over the same span; peak RSS is the child's
  own VmHWM. Then the same job on `--rss-scale` times the input (hard links, no extra disk):
  its peak RSS must not grow with the input.
  In the same run: a plain numpy load of the same files (np.load of each shard, one process)
  for the CPU-time-per-GB reference, and the PyPI peer `embedding-reader` reading the same
  folders if it is installed.
* **Tiny shards** (`--tiny`): N shards of 10 rows each; wall time per shard of the whole job
  (default workers) — flat in N means O(1) per shard. Run once per `--tiny-storage` folder
  (input and output there): on a disk each shard costs three fsyncs (its file, its folder,
  its journal line); on a tmpfs (/dev/shm) what remains is the software overhead.
* **Start-up** (`--startup` repeats): `semcomp compress --help` and the whole job on a 2-row input.
* `--concept-gb`: concept mode (≈4 rows per id), optional.

Writes benchmarks/results/compress_cpu.json (`-o PATH` elsewhere) and deletes the data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .results import write_json

ROWS_PER_SHARD = 65536
GIB = 1 << 30


def make_input(root: str, gb: float, dim: int, rows: int = ROWS_PER_SHARD, concepts: bool = False,
               n_shards: int | None = None, link_from: str | None = None) -> int:
    """Two modalities; the shard contents repeat one random block (content does not matter
    for throughput, only that it is finite). `gb` is the total input in GiB. With `link_from`
    (a folder made by this function) every shard is a hard link to that folder's first shard
    of its modality: a large input that costs no disk and no extra page cache."""
    shard_bytes = rows * dim * 4
    n_shards = n_shards or max(1, round(gb * GIB / (2 * shard_bytes)))
    block = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    for mod in ("img_emb", "text_emb"):
        os.makedirs(os.path.join(root, mod), exist_ok=True)
        for i in range(n_shards):
            path = os.path.join(root, mod, f"{mod}_{i:05d}.npy")
            if link_from:
                os.link(os.path.join(link_from, mod, f"{mod}_00000.npy"), path)
            else:
                np.save(path, block)
    if concepts:
        os.makedirs(os.path.join(root, "concepts"), exist_ok=True)
        rng = np.random.default_rng(1)
        n_ids = n_shards * rows // 4  # many concepts: ~4 rows each
        for i in range(n_shards):
            np.save(os.path.join(root, "concepts", f"c_{i:05d}.npy"), rng.integers(0, n_ids, rows))
    return n_shards


def warm(root: str) -> int:
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                while b := fh.read(1 << 24):
                    total += len(b)
    return total


def _emb_files(root: str) -> list:
    return [os.path.join(root, m, f) for m in ("img_emb", "text_emb") for f in sorted(os.listdir(os.path.join(root, m)))]


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _meminfo_kb(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM, since its exec; every thread). Not wait4's
    ru_maxrss: Linux starts a child's ru_maxrss from its parent's resident set at fork."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args) -> None:
    """Runs in a fresh child: one measured job, result as a JSON line on stdout."""
    import atexit

    atexit.register(lambda: print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True))
    if args.task == "numpy":
        t, c = time.perf_counter(), _cpu()
        n = 0
        for p in _emb_files(args.root):
            n += np.load(p).nbytes
        print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": _cpu() - c, "bytes_read": n}))
        return
    if args.task == "embedding-reader":
        from embedding_reader import EmbeddingReader

        t, c = time.perf_counter(), _cpu()
        n = 0
        for m in ("img_emb", "text_emb"):
            reader = EmbeddingReader(os.path.join(args.root, m), file_format="npy")
            for emb, _ in reader(batch_size=ROWS_PER_SHARD, show_progress=False):
                n += emb.nbytes
        print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": _cpu() - c, "bytes_read": n}))
        return
    import torch

    from semcomp_ext.compress import CompressOptions, compress

    if args.engine == "ray":
        import ray

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ins = [os.path.join(args.root, "img_emb"), os.path.join(args.root, "text_emb")]
    opts = CompressOptions(inputs=ins, out=args.job_out, drop_rate=0.5, engine=args.engine, quiet=True,
                           workers=args.workers, concepts=os.path.join(args.root, "concepts") if args.concept else None)
    t, c = time.perf_counter(), _cpu()
    m = compress(opts)
    print(json.dumps({"seconds": time.perf_counter() - t, "cpu_seconds": _cpu() - c, "threads": torch.get_num_threads(),
                      "shards": m["num_shards"]}))


def run_child(root: str, out: str | None, task: str = "compress", engine: str = "local", workers: int | None = None,
              concept: bool = False) -> dict:
    if out:
        shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "semcomp_ext.bench.compress", "--worker", "--task", task, "--root", root, "--engine", engine]
    if out:
        cmd += ["--job-out", out]
    if workers:
        cmd += ["--workers-n", str(workers)]
    if concept:
        cmd.append("--concept")
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    stdout = p.stdout.read()
    _, status, _ = os.wait4(p.pid, 0)
    if status != 0:
        raise RuntimeError(f"worker failed: {cmd}")
    lines = stdout.strip().splitlines()
    res = json.loads(lines[-2])
    res.update(json.loads(lines[-1]))  # peak_rss_mb of the child (Ray's worker processes not included)
    if out:
        shutil.rmtree(out, ignore_errors=True)
    return res


def startup(tmp: str, repeats: int) -> dict:
    """Wall time of `semcomp compress --help` and of the whole CLI job on a 2-row input
    (median of `repeats` runs each, fresh processes)."""
    exe = os.path.join(os.path.dirname(sys.executable), "semcomp")
    root = os.path.join(tmp, "two-rows")
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    for m in ("img", "text"):
        np.save(os.path.join(root, f"{m}.npy"), rng.standard_normal((2, 512), dtype=np.float32))
    ins = [os.path.join(root, "img.npy"), os.path.join(root, "text.npy")]

    def wall(cmd):
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t

    helps = sorted(wall([exe, "compress", "--help"]) for _ in range(repeats))
    jobs = sorted(wall([exe, "compress", *ins, "-o", os.path.join(root, "out"), "--drop-rate", "0.5", "--overwrite", "-q"])
                  for _ in range(repeats))
    shutil.rmtree(root)
    return {"kind": "startup", "repeats": repeats, "help_s_median": helps[len(helps) // 2],
            "two_row_job_s_median": jobs[len(jobs) // 2], "help_s": helps, "two_row_job_s": jobs}


def _peer_available() -> str | None:
    try:
        import embedding_reader  # noqa: F401
    except ImportError as exc:
        return f"not installed ({exc})"
    return None


def parser(default_out: str | None = None) -> argparse.ArgumentParser:
    """The options of the benchmark (and of its --worker children)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--task", default="compress")
    ap.add_argument("--root"), ap.add_argument("--job-out"), ap.add_argument("--engine", default="local")
    ap.add_argument("--workers-n", type=int, default=None)
    ap.add_argument("--concept", action="store_true")
    ap.add_argument("--gb", type=float, default=2.0, help="large input, GiB")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=["local"])
    ap.add_argument("--tiny", type=int, nargs="*", default=[1000, 10000], help="shard counts of the 10-row runs")
    ap.add_argument("--concept-gb", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=3, help="rounds of the large-input runs (medians reported)")
    ap.add_argument("--rss-scale", type=int, default=10, help="also run on this many times the input (hard links); 1: skip")
    ap.add_argument("--startup", type=int, default=5, help="repeats of the start-up timings (--help, 2-row job); 0: skip")
    ap.add_argument("--tmp", default="/tmp", help="where inputs and outputs are written")
    ap.add_argument("--tiny-storage", nargs="+", default=["/tmp", "/dev/shm"], help="folders for the tiny-shard runs")
    ap.add_argument("-o", "--out", dest="out", default=default_out,
                    help="result JSON (default: benchmarks/results/compress_cpu.json of the entry point)")
    return ap


def _summary(rs: list) -> dict:
    """Medians over rounds, and every round's value."""
    med = lambda key: float(np.median([r[key] for r in rs]))  # noqa: E731
    out = {k: med(k) for k in ("seconds", "cpu_seconds", "peak_rss_mb")}
    out.update(rounds=len(rs), all_seconds=[r["seconds"] for r in rs], all_cpu_seconds=[r["cpu_seconds"] for r in rs],
               all_peak_rss_mb=[r["peak_rss_mb"] for r in rs])
    return out


def large_input(args, tmp: str, record) -> int | None:
    """Interleaved rounds on the large input (numpy load, then compress for each engine and
    worker count, so that each round's jobs share the machine's conditions; medians), the
    same job on --rss-scale times the input, the embedding-reader peer. Returns the page
    cache's large-folio kB after the input was written."""
    out = os.path.join(tmp, "out")
    root = os.path.join(tmp, "large")
    make_input(root, args.gb, args.dim)
    nbytes = warm(root)
    huge_kb = _meminfo_kb("FileHugePages")
    gb = nbytes / 1e9
    configs = [(e, w) for e in args.engines for w in (args.workers if e == "local" else [None])]
    runs = {("numpy", None): [], **{c: [] for c in configs}}
    for _ in range(args.repeats):
        runs[("numpy", None)].append(run_child(root, None, task="numpy"))
        for engine, w in configs:
            warm(root)
            runs[(engine, w)].append(run_child(root, out, engine=engine, workers=w))
    ref = _summary(runs[("numpy", None)])
    ref.update(kind="numpy-load", input_gb=gb, gb_per_s=gb / ref["seconds"], cpu_s_per_gb=ref["cpu_seconds"] / gb)
    record(ref)
    for engine, w in configs:
        r = _summary(runs[(engine, w)])
        per_round = [c["cpu_seconds"] / n["cpu_seconds"] for c, n in zip(runs[(engine, w)], runs[("numpy", None)])]
        r.update(kind="compress", mode="pairs", engine=engine, workers=w, input_gb=gb, gb_per_s=gb / r["seconds"],
                 cpu_s_per_gb=r["cpu_seconds"] / gb, cpu_vs_numpy_load=r["cpu_seconds"] / ref["cpu_seconds"],
                 cpu_vs_numpy_load_per_round=per_round)
        record(r)
    if args.rss_scale > 1:  # peak RSS must not grow with the input: the same job on N x the shards
        big = os.path.join(tmp, "large_x")
        n = make_input(big, args.gb * args.rss_scale, args.dim, link_from=root)
        r = run_child(big, out, workers=args.workers[-1])
        r.update(kind="compress", mode="pairs", engine="local", workers=args.workers[-1], input_gb=gb * args.rss_scale,
                 input_note=f"{n} shards per modality, hard links to the first shard (page cache)",
                 gb_per_s=gb * args.rss_scale / r["seconds"], cpu_s_per_gb=r["cpu_seconds"] / (gb * args.rss_scale))
        record(r)
        shutil.rmtree(big)
    why = _peer_available()
    if why is None:
        warm(root)
        r = run_child(root, None, task="embedding-reader")
        r.update(kind="embedding-reader", input_gb=gb, gb_per_s=gb / r["seconds"], cpu_s_per_gb=r["cpu_seconds"] / gb)
    else:
        r = {"kind": "embedding-reader", "skipped": why}
    record(r)
    shutil.rmtree(root)
    return huge_kb


def tiny_shards(args, record) -> None:
    """N shards of 10 rows in each --tiny-storage folder: wall time per shard of the whole job."""
    for storage in args.tiny_storage:
        tiny = tempfile.mkdtemp(prefix="semcomp-bench-tiny-", dir=storage)
        try:
            for n in args.tiny:
                root = os.path.join(tiny, f"tiny{n}")
                make_input(root, 0, args.dim, rows=10, n_shards=n)
                gb = warm(root) / 1e9
                r = run_child(root, os.path.join(tiny, "out"))
                r.update(kind="tiny-shards", storage=storage, rows_per_shard=10, n_shards=n, input_gb=gb,
                         ms_per_shard=r["seconds"] / n * 1e3, cpu_ms_per_shard=r["cpu_seconds"] / n * 1e3)
                record(r)
                shutil.rmtree(root)
        finally:
            shutil.rmtree(tiny, ignore_errors=True)


def concept_mode(args, tmp: str, record) -> None:
    root = os.path.join(tmp, "concept")
    make_input(root, args.concept_gb, args.dim, concepts=True)
    gb = (warm(os.path.join(root, "img_emb")) + warm(os.path.join(root, "text_emb"))) / 1e9
    warm(os.path.join(root, "concepts"))
    r = run_child(root, os.path.join(tmp, "out"), concept=True)
    r.update(kind="compress", mode="concepts", engine="local", input_gb=gb, gb_per_s=gb / r["seconds"])
    record(r)


def run(args) -> dict:
    """The whole benchmark (module doc); returns the result document."""
    from .timing import environment

    results = []
    load_start = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="semcomp-bench-", dir=args.tmp)

    def record(r):
        print(json.dumps(r), flush=True)
        results.append(r)

    try:
        huge_kb = large_input(args, tmp, record)
        tiny_shards(args, record)
        if args.startup:
            record(startup(tmp, args.startup))
        if args.concept_gb:
            concept_mode(args, tmp, record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "env": environment(),
        "dim": args.dim, "modalities": 2, "drop_rate": 0.5, "in_dtype": "float32", "rows_per_shard": ROWS_PER_SHARD,
        "input_gib": args.gb, "storage": args.tmp, "usable_cores": len(os.sched_getaffinity(0)),
        "load_average_at_start": load_start,
        # page cache in large folios (ext4 on recent kernels): mapping such pages costs far less
        # than 4 KiB ones, and the compressor maps its input (see docs/compress.md)
        "file_huge_pages_kb_after_input_written": huge_kb,
        "load_average_at_end": os.getloadavg(), "results": results,
    }


def main(argv=None, default_out: str | None = None) -> None:
    """Parse options; a --worker child runs one measured job, the parent the whole benchmark."""
    args = parser(default_out).parse_args(argv)
    if args.worker:
        args.workers = args.workers_n
        worker(args)
        return
    if not args.out:
        raise SystemExit("bench_compress: -o/--out PATH is required")
    print(write_json(run(args), Path(args.out)))


if __name__ == "__main__":
    main()
