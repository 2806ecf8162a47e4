"""InfoNCE forward+backward: semcomp's fused loss against open_clip's ClipLoss, Inf-CL, the
pure-PyTorch reference and torch.compile of that reference.

Same inputs for every method (random unit vectors, never zeros), checked against the fp64
loss before timing. FLOP convention 8 N^2 D (four N x N x D products: logits forward, and
dA, dB plus the recomputed logits backward).
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .results import INFONCE_METHODS as METHODS
from .timing import L2_BYTES, cuda_median_time, interleaved_times, is_cuda, peak_extra_bytes

# The implementation each semcomp method names per call (impl=): "semcomp" is the default path
# ("auto": the measured table, else gemm), the others one CUDA implementation exactly (bf16/fp16;
# a device or build that cannot run it gives the row an error saying why). Every semcomp row
# records the implementation that ran ("impl"), which benchmarks.impl_table reads.
METHOD_IMPL = {"semcomp": "auto", "semcomp_tile": "tile", "semcomp_mma": "mma", "semcomp_wgmma": "wgmma"}
TENSOR_CORE_METHODS = ("semcomp_tile", "semcomp_mma", "semcomp_wgmma")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
FLOP_CONVENTION = "8*N^2*D"


def flop(n: int, d: int) -> int:
    return 8 * n * n * d


def default_methods(device: str, dtype: str, compile_reference: bool | None = None) -> list[str]:
    """semcomp and every installed peer that runs on the device; torch.compile of the reference
    by default on CUDA only (its compile time dominates a short CPU run)."""
    cuda = is_cuda(device)
    methods = ["semcomp"]
    if cuda and dtype in ("bfloat16", "float16"):
        methods += TENSOR_CORE_METHODS
    if importlib.util.find_spec("open_clip") is not None:
        methods.append("open_clip")
    if cuda and importlib.util.find_spec("inf_cl") is not None:  # Triton kernels: GPU only
        methods.append("inf_cl")
    methods.append("reference")
    if compile_reference if compile_reference is not None else cuda:
        methods.append("compiled_reference")
    return methods


def impl_that_runs(method: str, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """The implementation a semcomp method runs on these inputs ("cpu" off CUDA), None for peers."""
    if method not in METHOD_IMPL:
        return None
    if not is_cuda(a.device):
        return "cpu"
    impl = METHOD_IMPL[method]
    if impl == "auto":
        from semcomp_ext.kernel_choice import choose_cuda_impl

        return choose_cuda_impl("infonce", a, b)
    return impl


def make_loss(method: str):
    """loss(a, b, logit_scale) for a method name (ImportError when its peer is missing)."""
    import semcomp_ext as sc
    from semcomp_ext import reference as R

    if method in METHOD_IMPL:
        impl = METHOD_IMPL[method]
        return lambda a, b, s: sc.infonce_loss(a, b, logit_scale=s, impl=impl if is_cuda(a.device) else "auto")
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
    raise ValueError(f"unknown InfoNCE method {method!r}; expected one of {', '.join(METHODS)}")


def inputs(n: int, d: int, dtype, device: str, seed: int = 0):
    gen_dev = device if is_cuda(device) else "cpu"  # fast generation of large GPU sets
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    a = F.normalize(torch.randn(n, d, generator=g, device=gen_dev), dim=1).to(device=device, dtype=dtype).requires_grad_()
    b = F.normalize(torch.randn(n, d, generator=g, device=gen_dev), dim=1).to(device=device, dtype=dtype).requires_grad_()
    s = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    return a, b, s


def fwd_bwd(fn, a, b, s):
    loss = fn(a, b, s)
    return torch.autograd.grad(loss, (a, b, s))


def _truth(a, b, s) -> float:
    from semcomp_ext import reference as R

    ad, bd, sd = a.detach().double(), b.detach().double(), s.detach().double()
    if a.shape[0] <= 16384:
        return R.infonce_reference(ad, bd, sd).item()
    import semcomp_ext as sc  # the fp64 N x N matrix would not fit: the fused fp64 path (tested against it)

    return sc.infonce_loss(ad, bd, logit_scale=sd).item()


def bench_case(n: int, d: int, dtype: str, device: str, methods, repeats: int, *, memory: bool = True,
               progress=None) -> list[dict]:
    """One (N, D, dtype) case for every method: correctness against the fp64 loss, median
    forward+backward time, TFLOP/s and peak extra memory (minus the gradients every method
    returns). A method that fails (peer missing, out of memory, wrong result) gives a row with
    "error" and does not stop the others. `progress(method)` is called after each method."""
    a, b, s = inputs(n, d, DTYPES[dtype], device)
    truth = _truth(a, b, s)
    cuda = is_cuda(device)
    if cuda:
        torch.cuda.empty_cache()
    sets = [(a, b, s)]
    if cuda:  # inputs rotated past the L2 cache
        per_set = 2 * n * d * a.element_size()
        sets += [inputs(n, d, DTYPES[dtype], device, seed=i) for i in range(1, min(8, -(-(2 * L2_BYTES) // per_set)))]
    grad_bytes = 2 * a.numel() * a.element_size() + s.numel() * s.element_size()
    rows, tol = [], (1e-3 if dtype in ("float32", "float64") else 5e-2)
    fns = {}  # methods that gave the right loss

    def fail(row, exc):
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"

    for m in methods:  # correctness first (also the first, compiling, call); on CUDA the timing too
        row = {"op": "infonce", "method": m, "n": n, "d": d, "dtype": dtype, "device": device}
        rows.append(row)
        try:  # one method failing (out of memory, a peer's bug) must not stop the others
            fn = make_loss(m)
            impl = impl_that_runs(m, a, b)
            if impl is not None:
                row["impl"] = impl
            val = float(fn(a, b, s).detach())
            row["loss"] = val
            if not abs(val - truth) <= tol * max(1.0, abs(truth)):
                row["error"] = f"loss {val} vs fp64 {truth}"
                continue
            if cuda:  # CUDA events; forward alone and forward+backward
                t = cuda_median_time(lambda x: fwd_bwd(fn, *x), sets, repeats=max(repeats, 10))
                tf = cuda_median_time(lambda x: fn(*x), sets, repeats=max(repeats, 10))
                row.update(t, fwd_median_s=tf["median_s"], bwd_median_s=t["median_s"] - tf["median_s"],
                           input_sets=len(sets))
            fns[m] = fn
        except Exception as exc:  # noqa: BLE001  (recorded in the results and the table)
            fail(row, exc)
        finally:
            if cuda:
                torch.cuda.empty_cache()
    by_method = {r["method"]: r for r in rows}
    if not cuda:  # CPU: every method timed in the same rounds (a shared machine's load falls on all alike)
        timed, errors = interleaved_times({m: (lambda f=f: fwd_bwd(f, a, b, s)) for m, f in fns.items()},
                                          device, repeats)
        for m, exc in errors.items():
            fail(by_method[m], exc)
            del fns[m]
        for m, t in timed.items():
            by_method[m].update(t)
    for m in methods:
        row = by_method[m]
        try:
            if m in fns:
                row["tflops"] = flop(n, d) / row["median_s"] / 1e12
                if memory:
                    peak = peak_extra_bytes(lambda: fwd_bwd(fns[m], a, b, s), device)
                    if peak is not None:
                        row.update(peak_bytes=peak, extra_bytes=max(0, peak - grad_bytes), grad_bytes=grad_bytes)
        except Exception as exc:  # noqa: BLE001
            fail(row, exc)
        finally:
            if cuda:
                torch.cuda.empty_cache()
            if progress is not None:
                progress(m)
    del sets
    add_open_clip_ratios(rows)
    return rows


def add_open_clip_ratios(rows: list[dict]) -> None:
    """time_vs_open_clip and extra_mem_vs_open_clip on every timed row (the README's columns)."""
    oc = next((r for r in rows if r["method"] == "open_clip" and "error" not in r), None)
    if oc is None:
        return
    for row in rows:
        if "error" in row:
            continue
        row["time_vs_open_clip"] = row["median_s"] / oc["median_s"]
        if "extra_bytes" in row and "extra_bytes" in oc:
            row["extra_mem_vs_open_clip"] = row["extra_bytes"] / max(1, oc["extra_bytes"])
