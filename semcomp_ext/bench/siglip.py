"""Sigmoid (SigLIP) loss forward+backward: semcomp's fused loss (both backward strategies)
against open_clip's SigLipLoss, which builds the N x N logits.

Inputs: random unit vectors a, b (N, D) (never zeros), logit_scale = 10 and logit_bias = -10
(SigLIP's initialisation), all four requiring gradients. Every method's loss is checked against
the fp64 loss before timing; all methods are timed in the same interleaved rounds
(:func:`.timing.interleaved_times`). Memory: peak extra resident memory of one
forward+backward, each method in a fresh interpreter (``python -m semcomp_ext.bench.siglip
--memory-child METHOD``) so that one method's freed blocks do not hide another's peak; it
includes the returned gradients (2 x N x D elements, reported as grad_bytes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from .timing import cpu_peak_extra_bytes, interleaved_times, prepare_cpu_memory_measurement

METHODS = ("semcomp", "semcomp_recompute", "open_clip")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def make_loss(method: str):
    """loss(a, b, logit_scale, logit_bias) for a method name (ImportError when its peer is missing)."""
    if method == "open_clip":
        from semcomp_ext._compat import import_open_clip

        return import_open_clip().loss.SigLipLoss()
    if method not in METHODS:
        raise ValueError(f"unknown SigLIP method {method!r}; expected one of {', '.join(METHODS)}")
    import semcomp_ext

    return semcomp_ext.SigLipLoss(backward="recompute" if method == "semcomp_recompute" else "auto")


def make_inputs(n: int, d: int, dtype: str = "float32", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DTYPES[dtype]).requires_grad_()
    b = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(DTYPES[dtype]).requires_grad_()
    return a, b, torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)


def fwd_bwd(loss_fn, a, b, s, t):
    loss = loss_fn(a, b, s, t)
    torch.autograd.grad(loss, (a, b, s, t))
    return loss


def _truth(a, b, s, t) -> float:
    from semcomp_ext.reference import sigmoid_loss_reference

    with torch.no_grad():
        return float(sigmoid_loss_reference(a.double(), b.double(), s.double(), t.double()))


def memory_child(method: str, n: int, d: int, dtype: str) -> dict:
    """In a fresh interpreter: the peak extra bytes of one forward+backward."""
    ready = prepare_cpu_memory_measurement()
    loss_fn = make_loss(method)
    fwd_bwd(loss_fn, *make_inputs(64, d, dtype, seed=1))  # lazily initialised code paths (not measured)
    a, b, s, t = make_inputs(n, d, dtype)
    return {"peak_bytes": cpu_peak_extra_bytes(lambda: fwd_bwd(loss_fn, a, b, s, t)), "allocator_prepared": ready}


def measure_memory(method: str, n: int, d: int, dtype: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, "-m", "semcomp_ext.bench.siglip", "--memory-child", method, str(n), str(d),
                          dtype], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_case(n: int, d: int, methods=METHODS, repeats: int = 5, *, dtype: str = "float32",
               memory: bool = True, tol: float | None = None) -> list[dict]:
    """One (N, D) case for every method: correctness against the fp64 loss, median
    forward+backward time (interleaved rounds), peak extra memory, ratios to open_clip."""
    a, b, s, t = make_inputs(n, d, dtype)
    truth = _truth(a, b, s, t)
    tol = tol if tol is not None else (1e-4 if dtype != "bfloat16" else 2e-2)
    rows, fns = {}, {}
    for m in methods:  # correctness first (this call is also each method's first, lazily initialising call)
        row = rows[m] = {"op": "siglip", "method": m, "n": n, "d": d, "dtype": dtype, "device": "cpu"}
        try:
            fn = make_loss(m)
            got = float(fwd_bwd(fn, a, b, s, t).detach())
            row.update(loss=got, loss_rel_err_vs_fp64=abs(got - truth) / abs(truth))
            if not row["loss_rel_err_vs_fp64"] < tol:
                row["error"] = f"loss {got} vs fp64 {truth}"
                continue
            fns[m] = fn
        except Exception as exc:  # noqa: BLE001  (one method failing must not stop the others)
            row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    timed, errors = interleaved_times({m: (lambda f=f: fwd_bwd(f, a, b, s, t)) for m, f in fns.items()}, "cpu",
                                      repeats, warmup=0)
    for m, exc in errors.items():
        rows[m]["error"] = f"{type(exc).__name__}: {exc}"
    grad_bytes = 2 * n * d * a.element_size()
    for m, tm in timed.items():
        rows[m].update(tm)
        if memory:
            mem = measure_memory(m, n, d, dtype)
            rows[m].update(extra_bytes=mem["peak_bytes"], grad_bytes=grad_bytes,
                           extra_bytes_minus_grads=max(0, mem["peak_bytes"] - grad_bytes),
                           allocator_prepared=mem["allocator_prepared"])
    oc = rows.get("open_clip")
    if oc is not None and "median_s" in oc:
        for r in rows.values():
            if "median_s" in r:
                r["time_vs_open_clip"] = r["median_s"] / oc["median_s"]
                if "extra_bytes" in r and "extra_bytes" in oc:
                    r["extra_mem_vs_open_clip"] = r["extra_bytes"] / max(1, oc["extra_bytes"])
    return list(rows.values())


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--memory-child":
    print(json.dumps(memory_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])))
