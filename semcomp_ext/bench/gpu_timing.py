"""The GPU window's timing stage: InfoNCE forward+backward per CUDA implementation (gemm, tile,
and mma when this build has it) and SigLIP forward+backward, at the shapes that decide the
`auto` choice, in one run with interleaved rounds (one call of each method per round), inputs
rotated past L2, CUDA events, medians.

    python -m benchmarks.gpu_timing --out OUT/timing.json                  # the window's shapes
    python -m benchmarks.gpu_timing --impls mma gemm --out OUT/mma.json    # the mma slot
    python -m benchmarks.gpu_timing --device cpu --shapes 64x16:bfloat16   # a CPU run (CI)

(benchmarks/gpu_timing.py is the entry point; this module is the implementation, timed by
semcomp_ext.bench.timing.interleaved_times.)

Each record also has extra_mib: what one untimed call allocates beyond the memory in use before
it and beyond the two input gradients (the loss's workspace; None on the CPU).

Shapes: N x D : dtype (symmetric InfoNCE, N x N logits). SigLIP runs at --siglip shapes, per
SigLIP implementation (gemm, mma), and is compared with InfoNCE (gemm) at the same shape: the
SigLIP/InfoNCE ratio in the JSON. Every call names its implementation (impl=, never the
process-wide setting), and an implementation that cannot run here (a build without it, an older
device) is left out after a probe, so each row's "impl" is what ran; the JSON records the
device's compute capability. `python -m benchmarks.impl_table` turns such files into the table
behind impl="auto" (semcomp_ext/kernel_choice.py).
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.nn.functional as F

from semcomp_ext.bench.timing import environment, interleaved_times, peak_extra_bytes
from semcomp_ext.kernel_choice import LOWP

WINDOW_SHAPES = ("32768x512:bfloat16", "65536x768:bfloat16", "32768x512:float16")
WINDOW_SIGLIP = ("32768x512:bfloat16",)


def parse_shape(text: str) -> tuple[int, int, torch.dtype]:
    try:
        nd, dt = text.split(":")
        n, d = (int(v) for v in nd.lower().split("x"))
        dtype = getattr(torch, dt)
        assert isinstance(dtype, torch.dtype) and n > 0 and d > 0
    except (ValueError, AttributeError, AssertionError):
        raise argparse.ArgumentTypeError(f"shape must be NxD:dtype (e.g. 32768x512:bfloat16), got {text!r}") from None
    return n, d, dtype


def input_sets(n, d, dtype, device, count):
    """`count` independent (a, b) pairs of unit rows: rotating among them keeps L2 honest."""
    return [tuple(F.normalize(torch.randn(n, d, device=device), dim=1).to(dtype).requires_grad_() for _ in range(2))
            for _ in range(count)]


def infonce_step(impl, sets, s, device):
    import semcomp_ext as sc

    state = {"i": 0}
    impl = "auto" if device == "cpu" else impl

    def step():
        a, b = sets[state["i"] % len(sets)]
        state["i"] += 1
        loss = sc.infonce_loss(a, b, logit_scale=s, impl=impl)
        loss.backward()
        a.grad = b.grad = None
    return step


def siglip_step(sets, device, impl="gemm"):
    import semcomp_ext as sc

    state = {"i": 0}
    impl = "auto" if device == "cpu" else impl

    def step():
        a, b = sets[state["i"] % len(sets)]
        state["i"] += 1
        loss = sc.sigmoid_loss(a, b, 10.0, -10.0, impl=impl)
        loss.backward()
        a.grad = b.grad = None
    return step


def interleaved_ms(fns: dict, device: str, rounds: int, warmup: int) -> dict:
    """Median (and spread) in milliseconds of each fn over `rounds` interleaved rounds of one
    call each, after warm-up (CUDA events on a GPU); a method that raises stops the run."""
    times, errors = interleaved_times(fns, device, rounds, warmup)
    for name, exc in errors.items():
        raise RuntimeError(f"gpu_timing: {name} failed: {exc}") from exc
    return {name: {"median_ms": r["median_s"] * 1e3, "min_ms": r["min_s"] * 1e3, "max_ms": r["max_s"] * 1e3,
                   "rounds": r["repeats"]} for name, r in times.items()}


def peak_extra_mib(step, device: str, grads_bytes: int) -> float | None:
    """Memory one untimed call allocates beyond what was allocated before it and beyond the
    gradients it returns (grads_bytes: the two N x D input gradients), in MiB: the loss's own
    workspace. None on the CPU."""
    if device == "cpu":
        return None
    return (peak_extra_bytes(step, device) - grads_bytes) / 2**20


def why_not_here(op: str, impl: str, device: str) -> str:
    """Why a named implementation cannot run a small bf16 problem of op ("infonce" or "sigmoid")
    on this device, "" when it can: the ops refuse an exact request with a ValueError saying why
    (the build, the device)."""
    import semcomp_ext as sc

    x = F.normalize(torch.randn(64, 64, device=device), dim=1).to(torch.bfloat16)
    try:
        if op == "infonce":
            sc.infonce_loss(x, x, logit_scale=10.0, impl=impl)
        else:
            sc.sigmoid_loss(x, x, 10.0, -10.0, impl=impl)
    except ValueError as exc:
        return str(exc)
    return ""


def runs_here(op: str, impl: str, device: str) -> bool:
    why = why_not_here(op, impl, device)
    if why:
        print(f"gpu_timing: {op} {impl} left out: {why}")
    return not why


def available_impls(device: str, wanted, op: str = "infonce") -> list[str]:
    if device == "cpu":
        return ["cpu"]
    from semcomp_ext.kernel_choice import IMPLS

    have = IMPLS[op]
    return [i for i in (wanted or have) if i in have and runs_here(op, i, device)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="*", type=parse_shape, default=[parse_shape(s) for s in WINDOW_SHAPES])
    p.add_argument("--siglip", nargs="*", type=parse_shape, default=[parse_shape(s) for s in WINDOW_SIGLIP])
    p.add_argument("--impls", nargs="*", default=None, help="InfoNCE CUDA implementations (default: all built)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sets", type=int, default=3, help="input sets rotated through (L2)")
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = args.device
    impls = available_impls(device, args.impls)
    siglip_impls = available_impls(device, None, "sigmoid")
    name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    result = {"device": name, "env": environment(device), "infonce": [], "siglip": []}
    if device != "cpu":
        result["capability"] = "%d.%d" % torch.cuda.get_device_capability(device)
    s = torch.tensor(14.3, device=device)
    lines = []
    for n, d, dtype in args.shapes:
        sets = input_sets(n, d, dtype, device, args.sets)
        here = [i for i in impls if dtype in LOWP or i in ("gemm", "cpu")]  # fp32/fp64: gemm only
        steps = {i: infonce_step(i, sets, s, device) for i in here}
        t = interleaved_ms(steps, device, args.rounds, args.warmup)
        flops = 8.0 * n * n * d  # fwd 2 N^2 D, bwd 3 x 2 N^2 D (recompute, dq, dk)
        grads_bytes = 2 * n * d * sets[0][0].element_size()
        for impl, rec in t.items():
            rec.update(n=n, d=d, dtype=str(dtype).replace("torch.", ""), impl=impl,
                       tflops=flops / rec["median_ms"] / 1e9,
                       extra_mib=peak_extra_mib(steps[impl], device, grads_bytes))
            result["infonce"].append(rec)
            mem = "" if rec["extra_mib"] is None else f", {rec['extra_mib']:.0f} MiB extra"
            lines.append(f"infonce {n}x{d} {rec['dtype']:>8} {impl:>5}: {rec['median_ms']:9.2f} ms"
                         f" ({rec['tflops']:.0f} TFLOP/s{mem})")
        del sets
    for n, d, dtype in args.siglip:
        sets = input_sets(n, d, dtype, device, args.sets)
        here = [i for i in siglip_impls if dtype in LOWP or i in ("gemm", "cpu")]
        # each SigLIP implementation against InfoNCE on the same implementation (gemm where
        # InfoNCE has no such one), interleaved in the same rounds
        peer = {i: (i if i in impls else ("gemm" if "gemm" in impls else impls[0])) for i in here}
        fns = {f"siglip_{i}": siglip_step(sets, device, i) for i in here}
        fns.update({f"infonce_{j}": infonce_step(j, sets, s, device) for j in sorted(set(peer.values()))})
        t = interleaved_ms(fns, device, args.rounds, args.warmup)
        grads_bytes = 2 * n * d * sets[0][0].element_size()
        for i in here:
            base = peer[i]
            rec = dict(t[f"siglip_{i}"], n=n, d=d, dtype=str(dtype).replace("torch.", ""), impl=i,
                       infonce_impl=base, infonce_median_ms=t[f"infonce_{base}"]["median_ms"],
                       extra_mib=peak_extra_mib(fns[f"siglip_{i}"], device, grads_bytes))
            rec["ratio_to_infonce"] = rec["median_ms"] / rec["infonce_median_ms"]
            result["siglip"].append(rec)
            lines.append(f"siglip  {n}x{d} {rec['dtype']:>8} {i:>5}: {rec['median_ms']:9.2f} ms"
                         f" = {rec['ratio_to_infonce']:.2f} x infonce[{base}]")
        del sets
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"device: {name}")
    for line in lines:
        print(line)
    return 0

