"""`semcomp compress` against a real S3 endpoint on 127.0.0.1: moto's server mode + s3fs.

    python -m benchmarks.bench_compress_s3 [--mb 256] [--rows-per-shard 8192] [--repeats 3] [--workers 2]

(benchmarks/bench_compress_s3.py is the entry point; this module is the implementation.)

* Builds a clip-retrieval folder on local disk (`img_emb/`, `text_emb/` fp32 `.npy` shards of
  D=512, random normal values; `metadata/` parquet with a caption and a row number per row),
  reads it once (page cache), starts moto's `ThreadedMotoServer` on a free port of 127.0.0.1 and
  uploads the folder to `s3://semcomp-bench/in` with s3fs.
* Times, in `--repeats` interleaved rounds (medians reported), three jobs, each a fresh child
  process of the CLI as a user would run it:
  `semcomp compress SRC -o OUT --drop-rate 0.5 --workers N -q [--storage-options JSON]`
  (the endpoint and the credentials only in `--storage-options`): (a) local → local,
  (b) bucket → local, (c) bucket → bucket. Wall time of the whole child (interpreter start-up
  and imports included; `cli_startup` records a 2-row local job for scale), CPU time of the
  child (wait4's rusage) and CPU time of this process over the same span (that is moto's
  server threads: this process does nothing else meanwhile). GB/s are of the input
  embeddings (both modalities' `.npy` bytes). moto is a Python server sharing the machine's
  cores with the job: the figures are the client path plus moto's cost, not S3's.
* Kill -9 and resume, bucket → bucket: the job runs with SEMCOMP_TEST_SLEEP_PER_SHARD (the
  pipeline's test hook: a sleep after each finished shard, so the kill lands mid-run) and is
  SIGKILLed once `--kill-after` journal objects (`OUT/manifest.journal/shards-*.json`, one per
  committed shard) are on the store; then `semcomp compress ... --resume` (no sleep, timed)
  and `semcomp verify`. Every object of the resumed output must be byte-identical (sha256)
  to the bucket → local folder (manifest included) and every shard and metadata file to the
  local → local folder (whose manifest names the inputs by path instead of URL, with other
  mtimes: compared with the input folder written as one placeholder and the mtimes removed).
  Exit status 1 if any byte differs, the kill did not land mid-run or verify fails.

Writes benchmarks/results/compress_s3.json (`-o PATH` elsewhere); everything lives under a temp folder,
deleted at the end, and the moto server is stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .results import write_json

BUCKET = "semcomp-bench"
KEY, SECRET = "AKIAsemcompBENCHKEY1", "semcompBenchSecret/0123456789abcdefNOTREAL"
MODS = ("img", "text")


def make_input(root: str, mb: float, dim: int, rows: int) -> dict:
    """clip-retrieval layout: `mb` MiB of fp32 embeddings in all (both modalities)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_shards = max(1, round(mb * (1 << 20) / (len(MODS) * rows * dim * 4)))
    rng = np.random.default_rng(0)
    for m in MODS:
        os.makedirs(os.path.join(root, f"{m}_emb"))
    os.makedirs(os.path.join(root, "metadata"))
    for i in range(n_shards):
        for m in MODS:
            np.save(os.path.join(root, f"{m}_emb", f"{m}_emb_{i:04d}.npy"),
                    rng.standard_normal((rows, dim), dtype=np.float32))
        pq.write_table(pa.table({"caption": [f"a photo, shard {i} row {j}" for j in range(rows)],
                                 "row": np.arange(i * rows, (i + 1) * rows)}),
                       os.path.join(root, "metadata", f"metadata_{i:04d}.parquet"))
    emb = sum(os.path.getsize(os.path.join(root, f"{m}_emb", f)) for m in MODS for f in os.listdir(os.path.join(root, f"{m}_emb")))
    meta = sum(os.path.getsize(os.path.join(root, "metadata", f)) for f in os.listdir(os.path.join(root, "metadata")))
    return {"shards_per_modality": n_shards, "rows_per_shard": rows, "rows": n_shards * rows,
            "embedding_bytes": emb, "metadata_bytes": meta}


def warm(root: str) -> None:
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                while fh.read(1 << 24):
                    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def semcomp_cmd(*args) -> list:
    return [os.path.join(os.path.dirname(sys.executable), "semcomp"), *map(str, args)]


def run_timed(cmd: list, env: dict | None = None) -> dict:
    """Run a CLI child to completion: wall seconds, the child's CPU seconds, this process's
    CPU seconds meanwhile (moto's server threads), the exit code and stderr."""
    c0, t0 = _self_cpu(), time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate()  # reaps the child: its CPU time is then in RUSAGE_CHILDREN
    wall = time.perf_counter() - t0
    return {"seconds": wall, "moto_cpu_seconds": _self_cpu() - c0, "rc": p.returncode,
            "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace")}


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def local_tree_sha(root: str) -> dict:
    res = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                res[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return res


def remote_tree(fs, key: str) -> dict:
    """relative key -> object bytes of every object under s3://key."""
    fs.invalidate_cache()
    base = key.rstrip("/") + "/"
    return {k[len(base):]: fs.cat(k) for k in fs.find(base)}


def manifest_normalised(blob: bytes, src: str) -> dict:
    """The manifest with the input folder `src` (a path or a URL) written as "<in>" and the
    inputs' mtimes removed: what a local and a bucket run of the same job should share."""
    m = json.loads(blob.decode().replace(json.dumps(src)[1:-1], "<in>"))
    for s in m.get("sources", []):
        s.pop("mtime_ns", None)
    return m


def compare(remote: dict, local_root: str, with_manifest: bool) -> dict:
    """Per-file sha256 of the objects vs the local folder's files."""
    loc = local_tree_sha(local_root)
    rem = {k: hashlib.sha256(v).hexdigest() for k, v in remote.items()}
    if not with_manifest:
        rem.pop("manifest.json", None), loc.pop("manifest.json", None)
    differ = sorted(k for k in set(rem) | set(loc) if rem.get(k) != loc.get(k))
    return {"files": len(loc), "objects": len(rem), "identical": not differ, "differing": differ[:20]}


@dataclass
class _Run:
    """What the steps of one benchmark run share."""

    args: argparse.Namespace
    tmp: str
    fs: object
    env: dict
    sojson: str
    root: str = ""
    src_url: str = ""
    gb: float = 0.0
    n_shards: int = 0
    starts: list = field(default_factory=list)
    failures: list = field(default_factory=list)

    @property
    def common_args(self) -> list:
        return ["--drop-rate", "0.5", "--workers", self.args.workers, "-q"]

    @staticmethod
    def check(r: dict, what: str) -> dict:
        if r["rc"] != 0:
            raise RuntimeError(f"{what}: exit code {r['rc']}: {r['stderr'][-2000:]}")
        return r

    def job(self, src: str, out: str, url: bool, extra=(), job_env=None) -> dict:
        cmd = semcomp_cmd("compress", src, "-o", out, *self.common_args, *extra,
                          *(["--storage-options", self.sojson] if url else []))
        c0 = child_cpu()
        r = run_timed(cmd, env=job_env or self.env)
        r["cpu_seconds"] = child_cpu() - c0
        return r


def parser(default_out: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=256, help="input embeddings, MiB (both modalities)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rows-per-shard", type=int, default=8192)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three jobs (medians)")
    ap.add_argument("--kill-sleep", type=float, default=0.5,
                    help="SEMCOMP_TEST_SLEEP_PER_SHARD of the job that is killed (seconds after each shard)")
    ap.add_argument("--kill-after", type=int, default=None,
                    help="SIGKILL once this many shards are committed (default: half the shards)")
    ap.add_argument("--tmp", default=tempfile.gettempdir())
    ap.add_argument("-o", "--out", dest="out", default=default_out, help="result JSON")
    return ap


def prepare(c: _Run) -> dict:
    """The input folder, its upload to the bucket, and the CLI's start-up time (a 2-row local
    job, median of 3). Returns the input's sizes."""
    args = c.args
    c.fs.mkdir(BUCKET)
    c.root = os.path.join(c.tmp, "in")
    sizes = make_input(c.root, args.mb, args.dim, args.rows_per_shard)
    warm(c.root)
    c.gb = sizes["embedding_bytes"] / 1e9
    t0 = time.perf_counter()
    c.fs.put(c.root, f"{BUCKET}/in", recursive=True)
    upload_s = time.perf_counter() - t0
    c.src_url = f"s3://{BUCKET}/in"
    c.n_shards = sizes["shards_per_modality"]
    print(f"input: {c.n_shards} shards x {args.rows_per_shard} rows x 2 modalities, {c.gb:.3f} GB; "
          f"upload {upload_s:.2f} s", flush=True)
    two = os.path.join(c.tmp, "two")
    os.makedirs(two)
    for m in MODS:
        np.save(os.path.join(two, f"{m}.npy"), np.random.default_rng(1).standard_normal((2, args.dim), dtype=np.float32))
    for i in range(3):
        r = c.check(run_timed(semcomp_cmd("compress", os.path.join(two, "img.npy"), os.path.join(two, "text.npy"), "-o",
                                          os.path.join(two, f"out{i}"), "--drop-rate", "0.5", "-q"), c.env), "2-row job")
        c.starts.append(r["seconds"])
    shutil.rmtree(two)
    return dict(sizes, embedding_gb=c.gb, upload_seconds=upload_s)


def timed_rounds(c: _Run) -> tuple[dict, str, str]:
    """(a) local -> local, (b) bucket -> local, (c) bucket -> bucket in interleaved rounds;
    returns the results and the first round's local outputs (references for the kill test)."""
    results = {}
    # (a) local -> local, (b) bucket -> local, (c) bucket -> bucket: interleaved rounds
    kinds = ("local_to_local", "bucket_to_local", "bucket_to_bucket")
    runs = {k: [] for k in kinds}
    ref_ll, ref_bl = os.path.join(c.tmp, "ref-ll"), os.path.join(c.tmp, "ref-bl")
    b2b_identical = []
    for rnd in range(c.args.repeats):
        for kind in kinds:
            if kind == "local_to_local":
                out = os.path.join(c.tmp, "out-ll")
                warm(c.root)
                r = c.check(c.job(c.root, out, url=False), kind)
                if rnd == 0:
                    os.rename(out, ref_ll)
                else:
                    shutil.rmtree(out)
            elif kind == "bucket_to_local":
                out = os.path.join(c.tmp, "out-bl")
                r = c.check(c.job(c.src_url, out, url=True), kind)
                if rnd == 0:
                    os.rename(out, ref_bl)
                else:
                    shutil.rmtree(out)
            else:
                out = f"{BUCKET}/out-b2b-{rnd}"
                r = c.check(c.job(c.src_url, f"s3://{out}", url=True), kind)
                b2b_identical.append(compare(remote_tree(c.fs, out), ref_bl, with_manifest=True)["identical"])
                c.fs.rm(out, recursive=True)
            print(f"round {rnd} {kind}: {r['seconds']:.2f} s wall, {r['cpu_seconds']:.2f} s CPU, "
                  f"moto {r['moto_cpu_seconds']:.2f} s CPU", flush=True)
            runs[kind].append({k: r[k] for k in ("seconds", "cpu_seconds", "moto_cpu_seconds")})
    for kind in kinds:
        med = lambda key: statistics.median(x[key] for x in runs[kind])  # noqa: E731
        results[kind] = {"seconds_median": med("seconds"), "gb_per_s": c.gb / med("seconds"),
                         # rough: minus the 2-row local job's wall time (URL jobs also import s3fs)
                         "gb_per_s_excluding_cli_startup": c.gb / max(1e-9, med("seconds") - statistics.median(c.starts)),
                         "cpu_seconds_median": med("cpu_seconds"), "moto_cpu_seconds_median": med("moto_cpu_seconds"),
                         "all_seconds": [x["seconds"] for x in runs[kind]],
                         "all_cpu_seconds": [x["cpu_seconds"] for x in runs[kind]],
                         "all_moto_cpu_seconds": [x["moto_cpu_seconds"] for x in runs[kind]]}
    results["bucket_to_bucket"]["identical_to_bucket_to_local_every_round"] = b2b_identical
    if not all(b2b_identical):
        c.failures.append("an uninterrupted bucket -> bucket output differs from bucket -> local")
    # bucket -> local vs local -> local: every shard file (the manifests' sources differ)
    bl_vs_ll = compare({k: open(os.path.join(ref_bl, k), "rb").read() for k in local_tree_sha(ref_bl)}, ref_ll,
                       with_manifest=False)
    results["bucket_to_local"]["identical_to_local_to_local_except_manifest"] = bl_vs_ll["identical"]

    return results, ref_ll, ref_bl


def kill_and_resume(c: _Run, ref_ll: str, ref_bl: str) -> dict:
    """kill -9 mid-run bucket -> bucket, --resume, verify, byte comparison with the references."""
    # kill -9 mid-run, then --resume, bucket -> bucket
    out_key = f"{BUCKET}/out-kill"
    out_url = f"s3://{out_key}"
    kill_after = c.args.kill_after or max(1, c.n_shards // 2)
    kenv = dict(c.env, SEMCOMP_TEST_SLEEP_PER_SHARD=str(c.args.kill_sleep))
    cmd = semcomp_cmd("compress", c.src_url, "-o", out_url, *c.common_args, "--storage-options", c.sojson)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=kenv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    committed, deadline = 0, time.time() + 300
    while time.time() < deadline and p.poll() is None:
        c.fs.invalidate_cache()
        committed = sum("/manifest.journal/shards-" in k for k in c.fs.find(out_key))
        if committed >= kill_after:
            break
        time.sleep(0.05)
    exited_before_kill = p.poll() is not None
    if not exited_before_kill:
        os.kill(p.pid, signal.SIGKILL)
    _, kerr = p.communicate()
    killed_at = time.perf_counter() - t0
    c.fs.invalidate_cache()
    keys = c.fs.find(out_key)
    journal = sorted(k for k in keys if "/manifest.journal/shards-" in k)
    centroid_objs = [k for k in keys if "/centroids/" in k]
    manifest_status = json.loads(c.fs.cat(f"{out_key}/manifest.json")).get("status")
    kill = {"sleep_per_shard_s": c.args.kill_sleep, "kill_after_committed": kill_after,
            "killed_after_s": killed_at, "job_had_exited_before_kill": exited_before_kill,
            "shards_committed_at_kill": len(journal), "centroid_objects_at_kill": len(centroid_objs),
            "total_shards": c.n_shards, "manifest_status_after_kill": manifest_status,
            "tmp_objects_after_kill": sum(".tmp-" in k for k in keys)}
    print(f"killed after {killed_at:.2f} s: {len(journal)}/{c.n_shards} shards committed, manifest {manifest_status}",
          flush=True)
    if exited_before_kill or not 0 < len(journal) < c.n_shards or manifest_status != "in_progress":
        c.failures.append(f"the kill did not land mid-run: {kill}")
    if kill["tmp_objects_after_kill"]:
        c.failures.append("temp objects on the store after the kill")

    r = c.job(c.src_url, out_url, url=True, extra=["--resume"])
    kill["resume_rc"] = r["rc"]
    kill["resume_seconds"], kill["resume_cpu_seconds"], kill["resume_moto_cpu_seconds"] = (
        r["seconds"], r["cpu_seconds"], r["moto_cpu_seconds"])
    if r["rc"]:
        c.failures.append(f"--resume failed ({r['rc']}): {r['stderr'][-500:]}")
    v = run_timed(semcomp_cmd("verify", out_url, "--storage-options", c.sojson), c.env)
    kill["verify_rc"], kill["verify_seconds"], kill["verify_output"] = v["rc"], v["seconds"], (v["stdout"] + v["stderr"]).strip()
    if v["rc"]:
        c.failures.append(f"semcomp verify on the bucket failed: {kill['verify_output'][-500:]}")
    remote = remote_tree(c.fs, out_key)
    vs_bl = compare(remote, ref_bl, with_manifest=True)
    vs_ll = compare(remote, ref_ll, with_manifest=False)
    with open(os.path.join(ref_ll, "manifest.json"), "rb") as f:
        ll_manifest = manifest_normalised(f.read(), c.root)
    manifest_same = manifest_normalised(remote.get("manifest.json", b"{}"), c.src_url) == ll_manifest
    secret_seen = any(SECRET.encode() in b or KEY.encode() in b for b in [*remote.values(), kerr,
                                                                            r["stderr"].encode(), v["stdout"].encode()])
    kill.update(objects=vs_bl["objects"], identical_to_bucket_to_local_with_manifest=vs_bl["identical"],
                identical_to_local_to_local_shards=vs_ll["identical"],
                manifest_equal_to_local_to_local_except_input_paths_and_mtimes=manifest_same,
                differing=sorted(set(vs_bl["differing"]) | set(vs_ll["differing"])),
                credentials_in_any_object_or_output=secret_seen)
    kill["identical"] = vs_bl["identical"] and vs_ll["identical"] and manifest_same
    print(f"resume {r['seconds']:.2f} s; verify rc {v['rc']}; identical {kill['identical']}", flush=True)
    if not kill["identical"]:
        c.failures.append(f"resumed bucket output differs: {kill['differing']}")
    if secret_seen:
        c.failures.append("the credentials appear in an object or an output")
    c.fs.rm(out_key, recursive=True)
    return kill


def run(args) -> dict:
    """The whole benchmark against a moto server started here; returns the result document."""
    import s3fs
    from moto.server import ThreadedMotoServer

    from .timing import environment

    load_start = os.getloadavg()
    tmp = tempfile.mkdtemp(prefix="semcomp-bench-s3-", dir=args.tmp)
    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request (it costs the server's CPU too)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    so = {"key": KEY, "secret": SECRET, "endpoint_url": f"http://127.0.0.1:{port}"}
    env = dict(os.environ)
    for k in [k for k in env if k.startswith(("AWS_", "FSSPEC_S3"))]:
        del env[k]  # only --storage-options reaches the store
    c = _Run(args, tmp, s3fs.S3FileSystem(**so), env, json.dumps(so))
    try:
        sizes = prepare(c)
        results, ref_ll, ref_bl = timed_rounds(c)
        results["kill9_resume_bucket_to_bucket"] = kill_and_resume(c, ref_ll, ref_bl)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.stop()
    return {
        "env": environment(),
        "what": "semcomp compress CLI, fresh child per job, vs a moto S3 server (ThreadedMotoServer, in this "
                "benchmark's process, same cores) through s3fs; credentials and endpoint via --storage-options",
        "note": "moto is a Python server sharing the machine's cores with the job: the client path plus moto's cost, "
                "not S3's speed. Wall times include the CLI's start-up (see cli_startup_s).",
        "dim": args.dim, "modalities": 2, "in_dtype": "float32", "drop_rate": 0.5, "workers": args.workers,
        "input": sizes, "repeats": args.repeats,
        "cli_startup_s": {"two_row_local_job_median": statistics.median(c.starts), "all": c.starts},
        "usable_cores": len(os.sched_getaffinity(0)),
        "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(),
        "results": results, "failures": c.failures, "ok": not c.failures,
    }


def main(argv=None, default_out: str | None = None) -> int:
    args = parser(default_out).parse_args(argv)
    if not args.out:
        raise SystemExit("bench_compress_s3: -o/--out PATH is required")
    doc = run(args)
    path = write_json(doc, Path(args.out))
    print(json.dumps(doc["results"], indent=1))
    print(f"wrote {path}; {'ok' if doc['ok'] else 'FAILED: ' + '; '.join(doc['failures'])}")
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
