"""GPU check of the "wgmma" kernels (TMA + mbarrier pipeline + wgmma, sm_90a: InfoNCE's
csrc/infonce/infonce_wgmma_cuda.cu and SigLIP's csrc/siglip/siglip_wgmma_cuda.cu, on the shared
main loop csrc/common/wgmma_mainloop.cuh), which the CPU emulator cannot run: their outputs
against the "mma" kernels (emulator-verified) and an fp64 reference, then their timing.

    python -m benchmarks.wgmma_check OUTDIR                # checks, then timing
    python -m benchmarks.wgmma_check OUTDIR --no-timing    # checks only (about 20 s)

Checks, bf16 and fp16, each case naming the implementation per call (impl=, never the
process-wide setting):
  * forward outputs of the raw ops (loss rows, row LSEs, symmetric: column LSEs), symmetric and
    rectangular with an offset, on ragged shapes (N and D tails, one and many 128-row blocks and
    column tiles, D over one and many 64-wide steps, chunked passes): wgmma vs fp64 and vs mma;
  * gradients (a, b and the logit scale through autograd, weighted rows so that every
    coefficient differs): wgmma vs fp64 (relative norm) and vs mma;
  * N = 1 at several D: loss and gradients exactly 0 (the backward recomputes the forward's
    logits bit for bit; any difference between the two kernels' dots shows here);
  * reruns are bit-identical (fixed-order merges, no atomics);
  * inputs the kernels cannot take (d % 8 != 0, a base not 16-byte aligned) are refused with a
    ValueError/RuntimeError naming wgmma, never run;
  * SigLIP (sigmoid_loss, s = 10, t = -10): per-row losses of the raw op (wgmma vs fp64 and vs
    mma), the loss of the forward alone equal bit for bit to that of the forward + backward op,
    reruns of both bit-identical; gradients of a, b, scale and bias through autograd with
    backward="recompute" (weighted rows: random upstream gradients) and "onepass" (mean), vs
    fp64 and vs mma; symmetric and negative_only with Na != Nb, ragged N, D a multiple of 8
    over one and many 64-wide steps, chunks (not multiples of 128 rows too); the same refusals.
Timing: semcomp_ext.bench.gpu_timing (CUDA events, interleaved rounds, inputs rotated past L2)
for wgmma, mma and gemm, forward+backward at 32768 x 512 bf16 (and fp16) -> OUTDIR/wgmma_timing.json.

A small forward + backward of each loss runs first in a child process with a time limit (PROBE_TIMEOUT_S), so
a kernel that never finishes is reported as a hang instead of eating the stage's time box.

OUTDIR/wgmma_check.json: every case with its errors and verdict, the device and the
environment. Exit status: 0 every check passes, 1 a check failed (or the first run hung or
raised), 2 wgmma cannot run here (a build without the CuTe headers or sm_90a code, or a device
other than compute capability 9.0: the reason is printed and recorded).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback

import torch
import torch.nn.functional as F

# (n_rows, n_keys, d, offset, chunk): symmetric cases have n_rows == n_keys and offset 0
SYM_CASES = [
    (1, 1, 8, 0, 0), (5, 5, 8, 0, 0), (70, 70, 40, 0, 0), (128, 128, 64, 0, 0), (129, 129, 72, 0, 0),
    (257, 257, 128, 0, 0), (300, 300, 136, 0, 100), (1000, 1000, 96, 0, 256), (1030, 1030, 520, 0, 0),
    (4099, 4099, 512, 0, 0), (2500, 2500, 768, 0, 1000),
]
RECT_CASES = [
    (1, 3, 8, 2, 0), (50, 130, 16, 70, 0), (127, 300, 64, 100, 0), (200, 1000, 200, 333, 64),
    (2049, 4099, 512, 1500, 0),
]
ONE_ROW_D = (8, 64, 72, 520, 1024)
ATOL_FWD = 1e-4  # fp32 logits of unit rows at s = 14.3: errors are ~1e-6 (one dropped column at
                 # N = 4099 moves an LSE by ~1e-4 or more; at the small N by ~1e-2)
GRAD_REL = 2e-2  # vs fp64: s*G is rounded once to the input dtype before the cuBLAS products
MMA_REL = 1e-2   # vs mma: the same roundings; only logits a last bit apart can round differently

# SigLIP: (na, nb, d, negative_only, chunk); na == nb unless negative_only
SIG_CASES = [
    (1, 1, 8, False, 0), (5, 5, 8, False, 0), (70, 70, 40, False, 0), (129, 129, 72, False, 0),
    (257, 257, 128, False, 0), (300, 300, 136, False, 100), (1000, 1000, 96, False, 256),
    (1030, 1030, 520, False, 0), (4099, 4099, 512, False, 0), (2500, 2500, 768, False, 1000),
    (1, 3, 8, True, 0), (50, 130, 16, True, 0), (127, 300, 64, True, 0), (200, 1000, 200, True, 64),
    (700, 260, 48, True, 300), (2049, 4099, 512, True, 0),
]
SIG_SCALE, SIG_BIAS = 10.0, -10.0  # SigLIP's initialisation
SIG_FWD_REL = 1e-4  # row losses, relative to max(1, max |row loss|): fp32 dots and sums


def unit(n, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return F.normalize(torch.randn(n, d, device="cuda", generator=g), dim=1).to(dtype)


def max_err(x, y):
    x, y = x.double(), y.double()
    both_nan = torch.isnan(x) & torch.isnan(y)
    d = (x - y).abs().masked_fill(both_nan, 0.0)
    return float(d.max()) if d.numel() else 0.0


def rel_norm(x, y):
    y = y.double()
    return float((x.double() - y).norm() / y.norm().clamp_min(1e-300))


def fwd_outputs(impl_code, q, k, s, offset, chunk, sym):
    ops = torch.ops.semcomp
    if sym:
        return ops.infonce_fwd(q, k, s, chunk, impl_code)
    return ops.infonce_rect_fwd(q, k, s, offset, chunk, impl_code)


def grads(impl, q, k, s, offset, chunk, sym):
    import semcomp_ext as sc

    q, k, s = (t.detach().clone().requires_grad_() for t in (q, k, s))
    if sym:
        loss = sc.infonce_loss(q, k, logit_scale=s, chunk_size=chunk, impl=impl)
    else:
        rows = sc.infonce_rect_loss(q, k, s, offset=offset, chunk_size=chunk, impl=impl)
        loss = (rows * torch.linspace(0.5, 1.5, rows.shape[0], device="cuda")).sum()
    return (loss.detach(), *torch.autograd.grad(loss, (q, k, s)))


def reference_grads(q, k, s, offset, sym):
    from semcomp_ext import reference as R

    q, k, s = (t.detach().double().requires_grad_() for t in (q, k, s))
    if sym:
        loss = R.infonce_reference(q, k, s)
    else:
        rows = R.infonce_rect_reference(q, k, s, offset)
        loss = (rows * torch.linspace(0.5, 1.5, rows.shape[0], device="cuda", dtype=torch.float64)).sum()
    return (loss.detach(), *torch.autograd.grad(loss, (q, k, s)))


def check_case(dtype, nq, nk, d, offset, chunk, sym, seed):
    from semcomp_ext.kernel_choice import IMPL_CODES
    from semcomp_ext.reference import infonce_lse_reference

    q, k = unit(nq, d, dtype, seed), unit(nk, d, dtype, seed + 1)
    s = torch.tensor(14.3, device="cuda")
    rec = {"form": "sym" if sym else "rect", "dtype": str(dtype).replace("torch.", ""), "nq": nq, "nk": nk,
           "d": d, "offset": offset, "chunk": chunk}
    w = fwd_outputs(IMPL_CODES["wgmma"], q, k, s, offset, chunk, sym)
    w2 = fwd_outputs(IMPL_CODES["wgmma"], q, k, s, offset, chunk, sym)
    m = fwd_outputs(IMPL_CODES["mma"], q, k, s, offset, chunk, sym)
    ref = infonce_lse_reference(q, k, s, offset, symmetric=sym)
    names = ("loss", "rlse", "clse")[: len(ref)]
    rec["fwd_vs_fp64"] = {n: max_err(x, y) for n, x, y in zip(names, w, ref)}
    rec["fwd_vs_mma"] = {n: max_err(x, y) for n, x, y in zip(names, w, m)}
    rec["rerun_identical"] = all(torch.equal(x, y) for x, y in zip(w, w2))
    gw = grads("wgmma", q, k, s, offset, chunk, sym)
    gm = grads("mma", q, k, s, offset, chunk, sym)
    gr = reference_grads(q, k, s, offset, sym)
    rec["grad_rel_vs_fp64"] = {n: rel_norm(x, y) for n, x, y in zip(("gq", "gk"), gw[1:3], gr[1:3])}
    rec["gscale_vs_fp64"] = abs(float(gw[3]) - float(gr[3])) / max(abs(float(gr[3])), 1e-6)
    rec["grad_rel_vs_mma"] = {n: rel_norm(x, y) for n, x, y in zip(("loss", "gq", "gk", "gs"), gw, gm)}
    finite = all(bool(torch.isfinite(t).all()) for t in (*w, *gw))
    rec["ok"] = bool(
        finite
        and rec["rerun_identical"]
        and max(rec["fwd_vs_fp64"].values()) <= ATOL_FWD
        and max(rec["fwd_vs_mma"].values()) <= ATOL_FWD
        and max(rec["grad_rel_vs_fp64"].values()) <= GRAD_REL
        and rec["gscale_vs_fp64"] <= GRAD_REL
        and max(rec["grad_rel_vs_mma"].values()) <= MMA_REL
    )
    return rec


def check_one_row(dtype, d, seed):
    """N = 1: the loss and every gradient exactly 0 (wgmma's forward and backward dots agree)."""
    q = unit(1, d, dtype, seed)
    s = torch.tensor(14.3, device="cuda")
    out = grads("wgmma", q, q.clone(), s, 0, 0, True)
    exact = all(float(t.abs().max()) == 0.0 for t in out)
    return {"form": "one_row", "dtype": str(dtype).replace("torch.", ""), "d": d, "ok": exact,
            "max_abs": {n: float(t.abs().max()) for n, t in zip(("loss", "gq", "gk", "gs"), out)}}


def check_refusals(dtype):
    """Inputs the TMA path cannot take are refused for an exact wgmma request."""
    import semcomp_ext as sc

    out = []
    s = torch.tensor(14.3, device="cuda")
    ragged = unit(64, 33, dtype, 7)  # d % 8 != 0
    buf = torch.empty(64 * 64 + 1, device="cuda", dtype=dtype)
    misaligned = buf[1:].view(64, 64).copy_(unit(64, 64, dtype, 8))  # base 2 bytes off
    for name, x in (("d=33", ragged), ("misaligned base", misaligned)):
        try:
            loss = sc.infonce_loss(x, x, logit_scale=s, impl="wgmma")
            torch.cuda.synchronize()
        except (ValueError, RuntimeError) as exc:
            out.append({"form": "refusal", "case": name, "ok": "wgmma" in str(exc), "error": str(exc)[:300]})
            continue
        # it ran: only right if the API handed the kernels an aligned copy (a misaligned base
        # cannot be encoded as a TMA map); d = 33 must always be refused
        from semcomp_ext.reference import infonce_reference

        err = abs(float(loss) - float(infonce_reference(x.double(), x.double(), s.double())))
        out.append({"form": "refusal", "case": name, "ok": name != "d=33" and err <= ATOL_FWD,
                    "error": f"ran (|loss - fp64| = {err:.3g})"})
    return out


# ---- SigLIP ------------------------------------------------------------------------------------


def sig_grads(impl, a, b, s, t, neg, chunk, backward):
    """The loss and the gradients of a, b, scale, bias through sigmoid_loss: "recompute" on
    weighted per-row losses (the backward op gets random upstream gradients), "onepass" on the
    mean (the forward + backward op)."""
    import semcomp_ext as sc

    a, b, s, t = (x.detach().clone().requires_grad_() for x in (a, b, s, t))
    if backward == "onepass":
        loss = sc.sigmoid_loss(a, b, s, t, negative_only=neg, chunk_size=chunk, impl=impl, backward="onepass")
    else:
        rows = sc.sigmoid_loss(a, b, s, t, negative_only=neg, chunk_size=chunk, impl=impl, reduction="none",
                               backward="recompute")
        loss = (rows * torch.linspace(0.5, 1.5, rows.shape[0], device="cuda")).sum()
    return (loss.detach(), *torch.autograd.grad(loss, (a, b, s, t)))


def sig_reference_grads(a, b, s, t, neg, backward):
    from semcomp_ext.reference import sigmoid_loss_reference

    a, b, s, t = (x.detach().double().requires_grad_() for x in (a, b, s, t))
    if backward == "onepass":
        loss = sigmoid_loss_reference(a, b, s, t, negative_only=neg)
    else:
        rows = sigmoid_loss_reference(a, b, s, t, negative_only=neg, reduction="none")
        loss = (rows * torch.linspace(0.5, 1.5, rows.shape[0], device="cuda", dtype=torch.float64)).sum()
    return (loss.detach(), *torch.autograd.grad(loss, (a, b, s, t)))


def sig_rel(x, y):
    """Relative error of x against y (a tensor: the norm; a scalar: against max(|y|, 1e-6))."""
    if x.numel() == 1:
        return abs(float(x) - float(y)) / max(abs(float(y)), 1e-6)
    return rel_norm(x, y)


def check_sigmoid_case(dtype, na, nb, d, neg, chunk, seed):
    from semcomp_ext.kernel_choice import IMPL_CODES
    from semcomp_ext.reference import sigmoid_loss_reference

    ops = torch.ops.semcomp
    a, b = unit(na, d, dtype, seed), unit(nb, d, dtype, seed + 1)
    s = torch.tensor(SIG_SCALE, device="cuda")
    t = torch.tensor(SIG_BIAS, device="cuda")
    rec = {"form": "sigmoid", "dtype": str(dtype).replace("torch.", ""), "na": na, "nb": nb, "d": d,
           "negative_only": neg, "chunk": chunk}
    W, M = IMPL_CODES["wgmma"], IMPL_CODES["mma"]
    w = ops.sigmoid_fwd(a, b, s, t, neg, chunk, W)
    w2 = ops.sigmoid_fwd(a, b, s, t, neg, chunk, W)
    m = ops.sigmoid_fwd(a, b, s, t, neg, chunk, M)
    ref = sigmoid_loss_reference(a.double(), b.double(), s.double(), t.double(), negative_only=neg, reduction="none")
    scale = max(1.0, float(ref.abs().max()))
    rec["fwd_vs_fp64"] = max_err(w, ref) / scale
    rec["fwd_vs_mma"] = max_err(w, m) / scale
    fb = ops.sigmoid_fwd_bwd(a, b, s, t, neg, chunk, W)
    fb2 = ops.sigmoid_fwd_bwd(a, b, s, t, neg, chunk, W)
    # the forward alone and the forward + backward run the same chunks, splits and dots
    rec["fwd_bwd_loss_identical"] = torch.equal(fb[0], w.sum())
    rec["rerun_identical"] = torch.equal(w, w2) and all(torch.equal(x, y) for x, y in zip(fb, fb2))
    names = ("loss", "ga", "gb", "gs", "gt")
    finite = all(bool(torch.isfinite(x).all()) for x in (w, *fb))
    grad_ok = True
    for backward in ("recompute", "onepass"):
        gw = sig_grads("wgmma", a, b, s, t, neg, chunk, backward)
        gm = sig_grads("mma", a, b, s, t, neg, chunk, backward)
        gr = sig_reference_grads(a, b, s, t, neg, backward)
        vs_ref = {n: sig_rel(x, y) for n, x, y in zip(names, gw, gr)}
        vs_mma = {n: sig_rel(x, y) for n, x, y in zip(names, gw, gm)}
        rec[f"{backward}_vs_fp64"] = vs_ref
        rec[f"{backward}_vs_mma"] = vs_mma
        finite = finite and all(bool(torch.isfinite(x).all()) for x in gw)
        grad_ok = grad_ok and max(vs_ref.values()) <= GRAD_REL and max(vs_mma.values()) <= MMA_REL
    rec["ok"] = bool(
        finite
        and rec["rerun_identical"]
        and rec["fwd_bwd_loss_identical"]
        and rec["fwd_vs_fp64"] <= SIG_FWD_REL
        and rec["fwd_vs_mma"] <= SIG_FWD_REL
        and grad_ok
    )
    return rec


def check_sigmoid_refusals(dtype):
    """Inputs the TMA path cannot take are refused for an exact wgmma request (sigmoid_loss)."""
    import semcomp_ext as sc

    out = []
    s = torch.tensor(SIG_SCALE, device="cuda")
    t = torch.tensor(SIG_BIAS, device="cuda")
    ragged = unit(64, 33, dtype, 7)  # d % 8 != 0
    buf = torch.empty(64 * 64 + 1, device="cuda", dtype=dtype)
    misaligned = buf[1:].view(64, 64).copy_(unit(64, 64, dtype, 8))  # base 2 bytes off
    for name, x in (("d=33", ragged), ("misaligned base", misaligned)):
        try:
            loss = sc.sigmoid_loss(x, x, s, t, impl="wgmma")
            torch.cuda.synchronize()
        except (ValueError, RuntimeError) as exc:
            out.append({"form": "sigmoid_refusal", "case": name, "ok": "wgmma" in str(exc), "error": str(exc)[:300]})
            continue
        from semcomp_ext.reference import sigmoid_loss_reference

        err = abs(float(loss) - float(sigmoid_loss_reference(x.double(), x.double(), s.double(), t.double())))
        out.append({"form": "sigmoid_refusal", "case": name, "ok": name != "d=33" and err <= SIG_FWD_REL * 64,
                    "error": f"ran (|loss - fp64| = {err:.3g})"})
    return out


# A first run in a child process, so that a kernel that never finishes (a pipeline deadlock)
# costs PROBE_TIMEOUT_S and a clear verdict instead of the stage's whole time box.
PROBE_TIMEOUT_S = 90
PROBE = """
import sys, torch, torch.nn.functional as F, semcomp_ext as sc
x = F.normalize(torch.randn(300, 72, device="cuda"), dim=1).to(torch.bfloat16).requires_grad_()
try:
    sc.infonce_loss(x, x.detach(), logit_scale=torch.tensor(14.3, device="cuda"), impl="wgmma").backward()
    torch.cuda.synchronize()
except ValueError as exc:  # cannot run here (the build, the device)
    print(exc)
    sys.exit(2)
# SigLIP's wgmma kernels follow the same rules: an error here is a failure, not "cannot run"
sc.sigmoid_loss(x, x.detach(), torch.tensor(10.0, device="cuda"), -10.0, impl="wgmma").backward()
torch.cuda.synchronize()
"""


def probe():
    """("ok" | "unavailable" | "hang" | "error", message) of a small forward + backward."""
    import semcomp_ext as sc

    if not torch.cuda.is_available():
        return "unavailable", "no CUDA device"
    if "wgmma" not in sc.infonce_cuda_impls():
        return "unavailable", "this semcomp_ext has no wgmma implementation"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        r = subprocess.run([sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True,
                           timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return "hang", f"a 300 x 72 bf16 forward + backward (InfoNCE, SigLIP) did not finish in {PROBE_TIMEOUT_S} s"
    if r.returncode == 2:
        return "unavailable", r.stdout.strip()
    if r.returncode != 0:
        return "error", (r.stderr or r.stdout).strip()[-1000:]
    return "ok", ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outdir")
    p.add_argument("--no-timing", action="store_true")
    args = p.parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    from semcomp_ext.bench.timing import environment

    result = {"env": environment("cuda" if torch.cuda.is_available() else "cpu"), "cases": []}
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name()
        result["capability"] = "%d.%d" % torch.cuda.get_device_capability()
    status, message = probe()
    path = os.path.join(args.outdir, "wgmma_check.json")
    if status != "ok":
        result["skipped" if status == "unavailable" else "probe_failed"] = f"{status}: {message}"
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        if status == "unavailable":
            print(f"wgmma_check: wgmma cannot run here: {message}")
            return 2
        print(f"wgmma_check: the first wgmma run failed ({status}): {message}")
        return 1
    seed = 0
    for dtype in (torch.bfloat16, torch.float16):
        cases = [(c, True) for c in SYM_CASES] + [(c, False) for c in RECT_CASES]
        for (nq, nk, d, offset, chunk), sym in cases:
            seed += 2
            try:
                rec = check_case(dtype, nq, nk, d, offset, chunk, sym, seed)
            except Exception as exc:  # a failing kernel must not hide the other cases
                rec = {"form": "sym" if sym else "rect", "dtype": str(dtype), "nq": nq, "nk": nk, "d": d,
                       "offset": offset, "chunk": chunk, "ok": False, "error": "".join(
                           traceback.format_exception_only(type(exc), exc)).strip()[:500]}
            result["cases"].append(rec)
            print(("ok  " if rec["ok"] else "FAIL") + " " + json.dumps(rec))
        for d in ONE_ROW_D:
            rec = check_one_row(dtype, d, seed)
            result["cases"].append(rec)
            print(("ok  " if rec["ok"] else "FAIL") + " " + json.dumps(rec))
        for rec in check_refusals(dtype):
            result["cases"].append(rec)
            print(("ok  " if rec["ok"] else "FAIL") + " " + json.dumps(rec))
        for na, nb, d, neg, chunk in SIG_CASES:
            seed += 2
            try:
                rec = check_sigmoid_case(dtype, na, nb, d, neg, chunk, seed)
            except Exception as exc:
                rec = {"form": "sigmoid", "dtype": str(dtype), "na": na, "nb": nb, "d": d, "negative_only": neg,
                       "chunk": chunk, "ok": False, "error": "".join(
                           traceback.format_exception_only(type(exc), exc)).strip()[:500]}
            result["cases"].append(rec)
            print(("ok  " if rec["ok"] else "FAIL") + " " + json.dumps(rec))
        for rec in check_sigmoid_refusals(dtype):
            result["cases"].append(rec)
            print(("ok  " if rec["ok"] else "FAIL") + " " + json.dumps(rec))
        # a CUDA error (a trap, an illegal address) poisons the context: stop here
        torch.cuda.synchronize()
    failed = [c for c in result["cases"] if not c["ok"]]
    result["failed"] = len(failed)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wgmma_check: {len(result['cases']) - len(failed)} of {len(result['cases'])} checks pass -> {path}")
    rc = 1 if failed else 0
    if not args.no_timing:
        from semcomp_ext.bench.gpu_timing import main as timing_main

        out = os.path.join(args.outdir, "wgmma_timing.json")
        rc = max(rc, timing_main(["--impls", "wgmma", "mma", "gemm", "--shapes", "32768x512:bfloat16",
                                  "32768x512:float16", "--siglip", "--out", out]) or 0)
    return rc


if __name__ == "__main__":
    sys.exit(main())
