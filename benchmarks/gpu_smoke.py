"""Small run of every semcomp op and implementation, forward and backward, in every dtype:
the workload that `benchmarks/gpu_check.sh` runs under compute-sanitizer (memcheck, racecheck,
synccheck).

Each case is checked against the fp64 pure-PyTorch reference, so a sanitizer run also says
whether the results were right. Sizes are ragged (N in {5, 67, 130}, D in {7, 33, 40}: not
multiples of the vector widths or tiles), chunk sizes cross chunk boundaries, and bad indices
are exercised on the error path. Groups (``--only``):

    infonce_gemm  InfoNCE, symmetric and rectangular with an offset (every dtype)
    infonce_tile  the same on the WMMA tile kernels (bf16/fp16; CUDA only)
    infonce_mma   the same on the mma.sync kernels (bf16/fp16; CUDA sm_80+)
    infonce_wgmma the same on the wgmma/TMA kernels (bf16/fp16, D a multiple of 8; sm_90a builds
                  on an H100/H200; "cannot run here" with the reason otherwise)
    sigmoid       SigLIP forward, backward and the one-pass forward+backward (gemm path)
    sigmoid_mma   the same on the mma.sync kernels (bf16/fp16; CUDA sm_80+)
    sigmoid_wgmma the same on the wgmma/TMA kernels (bf16/fp16, D a multiple of 8; sm_90a builds
                  on an H100/H200; "cannot run here" with the reason otherwise)
    pair_mean     the row-aligned mean of M = 9 modalities with a column gather
    segment       segment (centroid) means, sorted and unsorted ids, with features
    gather        column gather and its backward

    python -m benchmarks.gpu_smoke --device cuda [--only infonce_tile sigmoid pair_mean]
    python -m benchmarks.gpu_smoke --device cpu        # the same cases on the CPU backend
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
LOW = (torch.bfloat16, torch.float16)
# (N, D, chunk): ragged sizes; a chunk below N crosses chunk boundaries
SHAPES = ((5, 7, 0), (67, 33, 16), (130, 40, 0))
# the same for TMA loads, whose rows must be 16-byte multiples (D % 8 == 0 in bf16/fp16)
SHAPES_TMA = ((5, 8, 0), (67, 40, 16), (130, 72, 0))
GROUPS = ("infonce_gemm", "infonce_tile", "infonce_mma", "infonce_wgmma", "sigmoid", "sigmoid_mma",
          "sigmoid_wgmma", "pair_mean", "segment", "gather")


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().cpu().double(), ref.detach().cpu().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _check(failures: list, tag: str, pairs, dtype) -> None:
    for name, x, y in pairs:
        e = _rel(x, y)
        if not e <= TOL[dtype]:  # NaN fails
            failures.append(f"{tag} {name}: rel err {e:.2e}")


def _ref(x: torch.Tensor) -> torch.Tensor:
    """An fp64 CPU leaf copy for the reference (under a sanitizer only semcomp's kernels and
    the few copies run on the GPU)."""
    return x.detach().cpu().double().requires_grad_()


def _unit(n, d, device, dtype):
    return F.normalize(torch.randn(n, d, device=device), dim=1).to(dtype)


def _impl_arg(device: str, impl: str) -> str:
    return "auto" if device == "cpu" else impl


def infonce_cases(device: str, impl: str) -> list[str]:
    import semcomp_ext as sc
    from semcomp_ext import reference as R

    failures = []
    use = _impl_arg(device, impl)  # every call names its implementation
    for dtype in (DTYPES if impl == "gemm" else LOW):
        for n, d, chunk in (SHAPES_TMA if impl == "wgmma" else SHAPES):
            a = _unit(n, d, device, dtype).requires_grad_()
            b = _unit(n, d, device, dtype).requires_grad_()
            s = torch.tensor(14.3, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                             requires_grad=True)
            loss = sc.infonce_loss(a, b, logit_scale=s, chunk_size=chunk, impl=use)
            grads = torch.autograd.grad(loss, (a, b, s))
            ad, bd = (_ref(x) for x in (a, b))
            sd = _ref(s)
            ref = R.infonce_reference(ad, bd, sd)
            refs = torch.autograd.grad(ref, (ad, bd, sd))
            _check(failures, f"infonce[{impl}] {dtype} n={n} d={d} chunk={chunk}",
                   zip(("loss", "grad_a", "grad_b", "grad_s"), (loss,) + grads, (ref,) + refs), dtype)
            # rectangular form with an offset (the distributed local loss)
            off = n // 3
            q = a.detach()[: n - off].clone().requires_grad_()
            k = b.detach().clone().requires_grad_()
            out = sc.infonce_rect_loss(q, k, s, offset=off, chunk_size=chunk, impl=use)
            gq, gk = torch.autograd.grad(out.sum(), (q, k))
            qd, kd = _ref(q), _ref(k)
            refr = R.infonce_rect_reference(qd, kd, s.detach().cpu().double(), off)
            rq, rk = torch.autograd.grad(refr.sum(), (qd, kd))
            _check(failures, f"infonce_rect[{impl}] {dtype} n={n} d={d} offset={off}",
                   zip(("loss", "grad_q", "grad_k"), (out, gq, gk), (refr, rq, rk)), dtype)
    return failures


def sigmoid_cases(device: str, impl: str = "gemm") -> list[str]:
    import semcomp_ext as sc
    from semcomp_ext.siglip import sigmoid_loss_reference

    failures = []
    use = _impl_arg(device, impl)
    for dtype in (DTYPES if impl == "gemm" else LOW):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for n, d, chunk in (SHAPES_TMA if impl == "wgmma" else SHAPES):
            for neg in (False, True):
                nb = n + 3 if neg else n
                a = _unit(n, d, device, dtype).requires_grad_()
                b = _unit(nb, d, device, dtype).requires_grad_()
                s = torch.tensor(10.0, device=device, dtype=acc, requires_grad=True)
                t = torch.tensor(-10.0, device=device, dtype=acc, requires_grad=True)
                xd = [_ref(x) for x in (a, b, s, t)]
                ref = sigmoid_loss_reference(*xd, negative_only=neg)
                refs = torch.autograd.grad(ref, xd)
                for backward in ("recompute", "onepass"):  # sigmoid_fwd + sigmoid_bwd, sigmoid_fwd_bwd
                    loss = sc.sigmoid_loss(a, b, s, t, negative_only=neg, backward=backward, chunk_size=chunk,
                                           impl=use)
                    grads = torch.autograd.grad(loss, (a, b, s, t))
                    _check(failures, f"sigmoid[{impl} {backward}] {dtype} n={n} d={d} chunk={chunk} neg={neg}",
                           zip(("loss", "grad_a", "grad_b", "grad_scale", "grad_bias"), (loss,) + grads,
                               (ref,) + refs), dtype)
    return failures


def _expect_refused(failures: list, message: str, device: str, call) -> None:
    """Bad input must raise (an index error found on the device raises at the next sync);
    `message` is recorded when it does not."""
    try:
        call()
        if device != "cpu":
            torch.cuda.synchronize()
        failures.append(message)
    except (ValueError, RuntimeError, IndexError):
        pass


def pair_mean_cases(device: str) -> list[str]:
    from semcomp_ext._ops import ops

    failures = []
    m = 9
    for dtype in DTYPES:
        for n, d, _ in SHAPES:
            zs = [torch.randn(n, d, device=device).to(dtype) for _ in range(m)]
            zs[1] = torch.randn(d, n, device=device).to(dtype).t()  # a strided modality
            if n > 2:
                zs[m - 1][1, d // 2] = float("nan")
                zs[0][2, d - 1] = float("inf")
            for feats in (None, torch.tensor([d - 1, 0, d // 2, d // 2], device=device)):
                out, finite = ops.pair_mean(zs, feats)
                ref = torch.stack([z.cpu().double() for z in zs]).mean(0)
                ref_finite = torch.stack([z.cpu().isfinite().all(1) for z in zs]).all(0)
                if feats is not None:
                    ref = ref[:, feats.cpu()]
                tag = f"pair_mean {dtype} n={n} d={d} m={m} feats={feats is not None}"
                if not torch.equal(finite.cpu(), ref_finite):
                    failures.append(f"{tag}: finite flags differ")
                rows = ref_finite
                acc = torch.float64 if dtype == torch.float64 else torch.float32  # the op's output dtype
                if out.dtype != acc or out.shape != ref.shape:
                    failures.append(f"{tag}: {out.dtype} {tuple(out.shape)}")
                elif rows.any():
                    _check(failures, tag, [("mean", out.cpu()[rows], ref[rows])], dtype)
    _expect_refused(failures, "pair_mean: bad feature index was accepted", device,
                    lambda: ops.pair_mean([torch.randn(3, 4, device=device)], torch.tensor([0, 4], device=device)))
    return failures


def segment_cases(device: str) -> list[str]:
    import semcomp_ext as sc

    failures = []
    for dtype in DTYPES:
        for n, d, g in ((5, 7, 3), (67, 33, 7), (130, 40, 64)):
            x = torch.randn(n, d, device=device).to(dtype).requires_grad_()
            ids = torch.randint(0, g, (n,), device=device)
            feats = torch.tensor([d - 1, 0, 3, 3], device=device)
            for sorted_ in (False, True):
                use = ids.sort().values if sorted_ else ids
                for f in (None, feats):
                    out = sc.centroids(x, use, g, features=f)
                    w = torch.randn_like(out)
                    (gx,) = torch.autograd.grad((out * w).sum(), x)
                    xd, uc = _ref(x), use.cpu()
                    cnt = torch.bincount(uc, minlength=g).clamp(min=1).double().unsqueeze(1)
                    ref = torch.zeros(g, d, dtype=torch.float64).index_add_(0, uc, xd) / cnt
                    if f is not None:
                        ref = ref[:, f.cpu()]
                    (rg,) = torch.autograd.grad((ref * w.cpu().double()).sum(), xd)
                    _check(failures, f"segment {dtype} n={n} d={d} g={g} sorted={sorted_} feats={f is not None}",
                           (("mean", out, ref), ("grad", gx, rg)), dtype)
    x = torch.randn(10, 4, device=device)
    _expect_refused(failures, "segment: bad ids were accepted", device,
                    lambda: sc.centroids(x, torch.tensor([0] * 9 + [5], device=device), 3))
    return failures


def gather_cases(device: str) -> list[str]:
    import semcomp_ext as sc

    failures = []
    for dtype in DTYPES:
        for n, d, _ in SHAPES:
            x = torch.randn(n, d, device=device).to(dtype).requires_grad_()
            idx = torch.tensor([d - 1, 0, 5 % d, 5 % d, 1], device=device)
            out = sc.select_features(x, idx)
            (gx,) = torch.autograd.grad((out * out.detach()).sum(), x)
            ref = x.detach().cpu().index_select(1, idx.cpu())
            rg = torch.zeros(n, d, dtype=torch.float64).index_add_(1, idx.cpu(), out.detach().cpu().double())
            if _rel(out, ref) != 0.0:
                failures.append(f"gather {dtype} n={n} d={d}: values differ")
            _check(failures, f"gather bwd {dtype} n={n} d={d}", [("grad", gx, rg)], dtype)
    x = torch.randn(10, 4, device=device)
    _expect_refused(failures, "gather: bad index was accepted", device,
                    lambda: sc.select_features(x, torch.tensor([0, 4], device=device)))
    return failures


def run_group(group: str, device: str) -> tuple[list[str], str]:
    """(failures, note); note says why a group did not run."""
    if group.startswith(("infonce_", "sigmoid")):
        op, _, impl = group.partition("_")
        impl = impl or "gemm"
        cases = infonce_cases if op == "infonce" else sigmoid_cases
        if device == "cpu":
            return (cases(device, impl), "") if impl == "gemm" else ([], "CUDA only")
        from semcomp_ext.bench.gpu_timing import why_not_here

        why = why_not_here(op, impl, device)
        if why:
            return [], f"cannot run here: {why}"
        return cases(device, impl), ""
    fn = {"pair_mean": pair_mean_cases, "segment": segment_cases, "gather": gather_cases}[group]
    return fn(device), ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS), metavar="GROUP",
                   help=f"groups to run (default: all): {', '.join(GROUPS)}")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    failures = []
    for group in args.only:
        t0 = time.perf_counter()
        fails, note = run_group(group, args.device)
        if args.device != "cpu":
            torch.cuda.synchronize()
        failures += fails
        status = note or ("OK" if not fails else f"{len(fails)} failures")
        print(f"  {group}: {status} ({time.perf_counter() - t0:.1f}s)", flush=True)
    for f in failures:
        print("FAIL", f)
    print(f"gpu_smoke on {args.device}: {'OK' if not failures else f'{len(failures)} failures'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
