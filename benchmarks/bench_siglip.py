"""Fused sigmoid (SigLIP) loss forward+backward vs open_clip's SigLipLoss, on the CPU.

Inputs: random unit vectors a, b (N, D) fp32 (never zeros), learnable logit_scale = 10 and
logit_bias = -10 (SigLIP's initialisation), all four requiring gradients. Each method's loss is
checked against the fp64 loss before timing. Methods:

    semcomp            semcomp_ext.SigLipLoss() (backward="auto": one pass, no recomputation)
    semcomp_recompute  semcomp_ext.SigLipLoss(backward="recompute") (logits recomputed in backward)
    open_clip          open_clip.loss.SigLipLoss() (materialises the N x N logits)

Time: wall time of loss + backward, median over --repeats after one warm-up (the correctness
call), all methods in this one process, the repeats interleaved round-robin across methods so
that all see the same machine load. Memory: peak extra resident memory of one forward+backward,
each method in a fresh subprocess (semcomp_ext.bench.timing.cpu_peak_extra_bytes: VmHWM reset
through /proc/self/clear_refs, glibc set to mmap every block >= 64 KiB so that the resident set
follows live allocations), above the resident set once inputs exist; it includes the returned
gradients (2 x N x D x 4 bytes, reported separately as grad_bytes).

    python -m benchmarks.bench_siglip              # N=8192 D=512 fp32 -> results/siglip_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import environment, median_time, write_result  # noqa: E402
from semcomp_ext.bench.timing import summarize  # noqa: E402

METHODS = ("semcomp", "semcomp_recompute", "open_clip")


def make_loss(method: str):
    if method == "open_clip":
        from semcomp_ext._compat import import_open_clip

        return import_open_clip().loss.SigLipLoss()
    import semcomp_ext

    return semcomp_ext.SigLipLoss(backward="recompute" if method == "semcomp_recompute" else "auto")


def make_inputs(n: int, d: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    t = torch.tensor(-10.0, requires_grad=True)
    return a, b, s, t


def fwd_bwd(loss_fn, a, b, s, t):
    for x in (a, b, s, t):
        x.grad = None
    loss = loss_fn(a, b, s, t)
    loss.backward()
    return loss


def _truth(a, b, s, t) -> float:
    from semcomp_ext.siglip import sigmoid_loss_reference

    with __import__("torch").no_grad():
        return float(sigmoid_loss_reference(a.double(), b.double(), s.double(), t.double()))


def memory_child(method: str, n: int, d: int) -> None:
    """Runs in a fresh interpreter: prints the peak extra bytes of one forward+backward."""
    from semcomp_ext.bench.timing import cpu_peak_extra_bytes, prepare_cpu_memory_measurement

    ready = prepare_cpu_memory_measurement()
    loss_fn = make_loss(method)
    fwd_bwd(loss_fn, *make_inputs(64, d, seed=1))  # loads lazily initialised code paths (not measured)
    a, b, s, t = make_inputs(n, d)
    peak = cpu_peak_extra_bytes(lambda: fwd_bwd(loss_fn, a, b, s, t))
    print(json.dumps({"peak_bytes": peak, "allocator_prepared": ready}))


def measure_memory(method: str, n: int, d: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_siglip", "--memory-child", method,
                          "--n", str(n), "--d", str(d)], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).resolve().parent.parent, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="siglip_cpu.json", help="results file name under benchmarks/results/")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        memory_child(args.memory_child, args.n, args.d)
        return 0

    import torch

    n, d = args.n, args.d
    a, b, s, t = make_inputs(n, d)
    truth = _truth(a, b, s, t)
    grad_bytes = 2 * n * d * 4
    load_before = _loadavg()
    rows, fns = [], {}
    for method in args.methods:  # correctness first (this call is also the warm-up)
        fns[method] = make_loss(method)
        got = float(fwd_bwd(fns[method], a, b, s, t).detach())
        rel = abs(got - truth) / abs(truth)
        if not rel < 1e-4:
            raise SystemExit(f"{method}: loss {got} differs from the fp64 loss {truth} (rel {rel:.2e})")
        rows.append({"method": method, "n": n, "d": d, "dtype": "float32", "loss": got, "loss_rel_err_vs_fp64": rel})
    # repeats interleaved across methods (round-robin): on a shared machine, every method sees
    # the same load over the run
    times = {m: [] for m in args.methods}
    for _ in range(args.repeats):
        for method in args.methods:
            times[method] += [median_time(lambda: fwd_bwd(fns[method], a, b, s, t), "cpu", repeats=1, warmup=0)["median_s"]]
    for row in rows:
        row.update(summarize(times[row["method"]]), times_s=times[row["method"]])
        print(f"{row['method']:<18} {row['median_s']:.3f} s (min {row['min_s']:.3f}, max {row['max_s']:.3f})", flush=True)
    load_after_timing = _loadavg()
    for row in rows:
        mem = measure_memory(row["method"], n, d, torch.get_num_threads())
        row.update(extra_bytes=mem["peak_bytes"], grad_bytes=grad_bytes,
                   extra_bytes_minus_grads=max(0, mem["peak_bytes"] - grad_bytes),
                   allocator_prepared=mem["allocator_prepared"])
        print(f"{row['method']:<18} peak extra {mem['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
    oc = next((r for r in rows if r["method"] == "open_clip"), None)
    if oc is not None:
        for row in rows:
            row["time_vs_open_clip"] = row["median_s"] / oc["median_s"]
            row["extra_mem_vs_open_clip"] = row["extra_bytes"] / max(1, oc["extra_bytes"])
            row["extra_mem_minus_grads_vs_open_clip"] = row["extra_bytes_minus_grads"] / max(1, oc["extra_bytes_minus_grads"])
    for row in rows:
        print(f"{row['method']:<18} time/open_clip {row.get('time_vs_open_clip', float('nan')):.3f}  "
              f"mem/open_clip {row.get('extra_mem_vs_open_clip', float('nan')):.4f} "
              f"(without gradients {row.get('extra_mem_minus_grads_vs_open_clip', float('nan')):.4f})")
    payload = {
        "benchmark": "sigmoid (SigLIP) loss fwd+bwd, CPU",
        "time_method": f"wall time of loss + backward, median of {args.repeats} after 1 warm-up, one process, "
                       "repeats interleaved round-robin across methods",
        "memory_method": "peak RSS (VmHWM after clear_refs) above the RSS before the call, one fresh subprocess "
                         "per method, glibc mmap threshold 64 KiB; includes the gradients (grad_bytes)",
        "loadavg_before": load_before, "loadavg_after_timing": load_after_timing, "loadavg_end": _loadavg(),
        "env": environment("cpu"), "rows": rows,
    }
    print(f"wrote {write_result(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
