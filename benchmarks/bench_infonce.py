"""Fused InfoNCE forward+backward vs open_clip's ClipLoss vs the pure-PyTorch reference.

Same inputs (random unit vectors, never zeros), same process, interleaved repeats; median
wall time. Peak extra memory of one forward+backward is measured for each method in a fresh
subprocess (Linux VmHWM), minus the bytes of the gradients every method must return.

    python -m benchmarks.bench_infonce                 # CPU, N=8192 D=512 fp32 (acceptance)
    python -m benchmarks.bench_infonce --device cuda --n 4096 16384 32768 65536 --d 512 1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

try:
    from .common import cpu_peak_extra_bytes, environment, in_subprocess, median_time, write_result
except ImportError:  # run as a script
    from common import cpu_peak_extra_bytes, environment, in_subprocess, median_time, write_result

METHODS = ("semcomp", "semcomp_tile", "open_clip", "inf_cl", "reference", "compiled_reference")
# CUDA implementation selected while a method runs (forward and backward): "semcomp" is the
# default path, "semcomp_tile" the tensor-core tile kernels (bf16/fp16 only).
METHOD_IMPL = {"semcomp": "auto", "semcomp_tile": "tile"}


def select_impl(method: str) -> None:
    import semcomp_ext as sc

    sc.set_infonce_cuda_impl(METHOD_IMPL.get(method, "auto"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_loss(method: str):
    import semcomp_ext as sc
    from semcomp_ext import reference as R

    if method in ("semcomp", "semcomp_tile"):
        return lambda a, b, s: sc.infonce_loss(a, b, logit_scale=s)
    if method == "open_clip":
        from semcomp_ext._compat import import_open_clip

        loss = import_open_clip().loss.ClipLoss()
        return lambda a, b, s: loss(a, b, s)
    if method == "inf_cl":
        # Inf-CL is one-directional and computes in TF32 from fp32 inputs: two calls.
        from inf_cl import cal_inf_loss

        def inf_cl(a, b, s):
            # its `scale=` argument all-reduces the scale's gradient (needs a process group):
            # scale the rows instead, as it does itself.
            a32, b32 = a.float(), b.float()
            return 0.5 * (cal_inf_loss(s * a32, b32) + cal_inf_loss(s * b32, a32))

        return inf_cl
    if method == "reference":
        return lambda a, b, s: R.infonce_reference(a, b, s)
    if method == "compiled_reference":
        return torch.compile(lambda a, b, s: R.infonce_reference(a, b, s))
    raise ValueError(method)


def inputs(n: int, d: int, dtype, device: str, seed: int = 0):
    gen_dev = device if device.startswith("cuda") else "cpu"  # fast generation of large GPU sets
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, device=gen_dev), dim=1).to(device=device, dtype=dtype).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g, device=gen_dev), dim=1).to(device=device, dtype=dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    return a, b, s


L2_BYTES = 50 << 20  # H100's L2; rotation covers twice this


def cuda_median_time(fn, sets, repeats: int, warmup: int = 2) -> dict:
    """Median seconds by CUDA events of fn(set), cycling through the input sets."""
    import statistics

    for i in range(warmup):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(sets[i % len(sets)])
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def fwd_bwd(fn, a, b, s):
    loss = fn(a, b, s)
    return torch.autograd.grad(loss, (a, b, s))


def child(method: str, n: int, d: int, dtype: str, device: str) -> dict:
    """Peak extra memory of one fwd+bwd (after a warm-up call), minus the returned gradients."""
    fn = make_loss(method)
    select_impl(method)
    a, b, s = inputs(n, d, DTYPES[dtype], device)
    fwd_bwd(fn, a, b, s)
    grad_bytes = 2 * a.numel() * a.element_size() + s.numel() * s.element_size()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd(fn, a, b, s)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = cpu_peak_extra_bytes(lambda: fwd_bwd(fn, a, b, s))
    return {"peak_bytes": peak, "extra_bytes": max(0, peak - grad_bytes), "grad_bytes": grad_bytes}


def bench(n: int, d: int, dtype: str, device: str, methods, repeats: int) -> list[dict]:
    a, b, s = inputs(n, d, DTYPES[dtype], device)
    fns = {}
    for m in methods:
        try:
            fns[m] = make_loss(m)
        except ImportError as exc:  # a peer that is not installed: recorded as an error row
            fns[m] = exc
    # correctness before timing: every method agrees with the fp64 reference on these inputs
    from semcomp_ext import reference as R

    ad, bd, sd = a.detach().double(), b.detach().double(), s.detach().double()
    if n <= 16384:
        truth = R.infonce_reference(ad, bd, sd).item()
    else:  # the fp64 N x N matrix would not fit: the fused fp64 path (tested against it)
        import semcomp_ext as sc

        truth = sc.infonce_loss(ad, bd, logit_scale=sd).item()
    del ad, bd
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    flop = 8 * n * n * d  # fused convention: 4 matmul-equivalents fwd+bwd
    sets = [(a, b, s)]
    if device.startswith("cuda"):  # inputs rotated past the L2 cache
        per_set = 2 * n * d * a.element_size()
        sets += [inputs(n, d, DTYPES[dtype], device, seed=i) for i in range(1, min(8, -(-(2 * L2_BYTES) // per_set)))]
    rows, tol = [], (1e-3 if dtype == "float32" else 5e-2)
    for m in methods:
        row = {"method": m}
        rows.append(row)
        try:  # one method failing (out of memory, a peer's bug) must not stop the others
            if isinstance(fns[m], Exception):
                raise fns[m]
            select_impl(m)
            val = float(fns[m](a, b, s).detach())
            row["loss"] = val
            if not abs(val - truth) <= tol * max(1.0, abs(truth)):
                row["error"] = f"loss {val} vs fp64 {truth}"
                continue
            if device.startswith("cuda"):  # CUDA events; forward alone and forward+backward
                fn = fns[m]
                t = cuda_median_time(lambda x: fwd_bwd(fn, *x), sets, repeats=max(repeats, 10))
                tf = cuda_median_time(lambda x: fn(*x), sets, repeats=max(repeats, 10))
                row.update(t, fwd_median_s=tf["median_s"], bwd_median_s=t["median_s"] - tf["median_s"],
                           input_sets=len(sets))
            else:
                row.update(median_time(lambda: fwd_bwd(fns[m], a, b, s), device, repeats=repeats))
            row["tflops"] = flop / row["median_s"] / 1e12
            row.update(in_subprocess("bench_infonce", [m, str(n), str(d), dtype, device]))
        except Exception as exc:  # noqa: BLE001  (recorded in the results, printed below)
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        finally:
            select_impl("semcomp")
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    del sets
    rows = [r for r in rows if "error" not in r] + [r for r in rows if "error" in r]
    base = {r["method"]: r for r in rows if "error" not in r}
    for row in rows:
        row.update(n=n, d=d, dtype=dtype, device=device)
        if "open_clip" in base and "error" not in row:
            oc = base["open_clip"]
            row["time_vs_open_clip"] = row["median_s"] / oc["median_s"]
            row["extra_mem_vs_open_clip"] = row["extra_bytes"] / max(1, oc["extra_bytes"])
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", nargs=5, metavar=("METHOD", "N", "D", "DTYPE", "DEVICE"), help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, nargs="+", default=[8192])
    p.add_argument("--d", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--methods", nargs="+", default=["semcomp", "open_clip", "reference"], choices=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="results file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.child:
        m, n, d, dtype, device = args.child
        print(json.dumps(child(m, int(n), int(d), dtype, device)))
        return 0
    rows = []
    for n in args.n:
        for d in args.d:
            rows += bench(n, d, args.dtype, args.device, args.methods, args.repeats)
            for r in rows[-len(args.methods):]:
                if "error" in r:
                    print(f"N={n:6d} D={d:5d} {r['method']:<20} ERROR {r['error']}")
                    continue
                print(f"N={n:6d} D={d:5d} {r['method']:<20} {r['median_s'] * 1e3:10.1f} ms  {r['tflops']:7.3f} TFLOP/s  "
                      f"extra mem {r['extra_bytes'] / 2**20:9.1f} MiB  time/open_clip {r.get('time_vs_open_clip', float('nan')):.3f}  "
                      f"mem/open_clip {r.get('extra_mem_vs_open_clip', float('nan')):.4f}")
    name = args.out or f"infonce_{args.device.split(':')[0]}.json"
    path = write_result(name, {"benchmark": "infonce fwd+bwd", "flop_convention": "8*N^2*D", "env": environment(args.device), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
