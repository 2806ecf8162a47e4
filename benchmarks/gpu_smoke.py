"""Small run of every semcomp op, forward and backward, in every dtype: the workload that
`benchmarks/gpu_check.sh` runs under compute-sanitizer (memcheck, racecheck, synccheck).

Each case is checked against the fp64 pure-PyTorch reference, so a sanitizer run also says
whether the results were right. Sizes are ragged (not multiples of the vector widths or
tiles) and include the chunk boundaries; bad indices are exercised on the error path.

    python -m benchmarks.gpu_smoke --device cuda
    python -m benchmarks.gpu_smoke --device cpu        # the same cases on the CPU backend
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    x, ref = x.detach(), ref.detach()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def infonce_cases(device: str) -> list[str]:
    import semcomp_ext as sc
    from semcomp_ext import reference as R

    failures = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for n, d, chunk in ((67, 40, 0), (130, 64, 64), (33, 7, 5)):
            a32 = F.normalize(torch.randn(n, d, device=device), dim=1)
            b32 = F.normalize(torch.randn(n, d, device=device), dim=1)
            a = a32.to(dtype).requires_grad_()
            b = b32.to(dtype).requires_grad_()
            s = torch.tensor(14.3, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                             requires_grad=True)
            loss = sc.infonce_loss(a, b, logit_scale=s, chunk_size=chunk)
            ga, gb, gs = torch.autograd.grad(loss, (a, b, s))
            ad, bd = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
            sd = s.detach().double().requires_grad_()
            ref = R.infonce_reference(ad, bd, sd)
            ra, rb, rs = torch.autograd.grad(ref, (ad, bd, sd))
            for name, x, y in (("loss", loss, ref), ("grad_a", ga, ra), ("grad_b", gb, rb), ("grad_s", gs, rs)):
                e = _rel(x, y)
                if not e <= TOL[dtype]:
                    failures.append(f"infonce {dtype} n={n} d={d} chunk={chunk} {name}: rel err {e:.2e}")
            # rectangular form with an offset (the distributed local loss)
            q = a.detach()[: n // 2].clone().requires_grad_()
            k = b.detach().clone().requires_grad_()
            out = sc.infonce_rect_loss(q, k, s, offset=n // 3, chunk_size=chunk)
            gq, gk = torch.autograd.grad(out.sum(), (q, k))
            qd, kd = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
            refr = R.infonce_rect_reference(qd, kd, s.detach().double(), n // 3)
            rq, rk = torch.autograd.grad(refr.sum(), (qd, kd))
            for name, x, y in (("rect loss", out, refr), ("rect grad_q", gq, rq), ("rect grad_k", gk, rk)):
                e = _rel(x, y)
                if not e <= TOL[dtype]:
                    failures.append(f"infonce_rect {dtype} n={n} d={d} {name}: rel err {e:.2e}")
    return failures


def segment_gather_cases(device: str) -> list[str]:
    import semcomp_ext as sc

    failures = []
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for n, d, g in ((301, 37, 7), (64, 128, 64), (1000, 8, 3)):
            x = torch.randn(n, d, device=device).to(dtype).requires_grad_()
            ids = torch.randint(0, g, (n,), device=device)
            feats = torch.tensor([d - 1, 0, 3, 3], device=device)
            for sorted_ in (False, True):
                use = ids.sort().values if sorted_ else ids
                for f in (None, feats):
                    out = sc.centroids(x, use, g, features=f)
                    w = torch.randn_like(out)
                    (gx,) = torch.autograd.grad((out * w).sum(), x)
                    xd = x.detach().double().requires_grad_()
                    cnt = torch.bincount(use, minlength=g).clamp(min=1).double().unsqueeze(1)
                    ref = torch.zeros(g, d, dtype=torch.float64, device=device).index_add_(0, use, xd) / cnt
                    if f is not None:
                        ref = ref[:, f]
                    (rg,) = torch.autograd.grad((ref * w.double()).sum(), xd)
                    for name, a_, b_ in (("mean", out, ref), ("grad", gx, rg)):
                        e = _rel(a_, b_)
                        if not e <= TOL[dtype]:
                            failures.append(f"segment {dtype} n={n} d={d} g={g} sorted={sorted_} feats={f is not None} {name}: {e:.2e}")
            idx = torch.tensor([d - 1, 0, 5 % d, 5 % d, 1], device=device)
            out = sc.select_features(x, idx)
            (gx,) = torch.autograd.grad((out * out.detach()).sum(), x)
            ref = x.detach().index_select(1, idx)
            rg = torch.zeros_like(x, dtype=torch.float64).index_add_(1, idx, out.detach().double())
            if _rel(out, ref) != 0.0:
                failures.append(f"gather {dtype} n={n} d={d}: values differ")
            if not _rel(gx, rg) <= TOL[dtype]:
                failures.append(f"gather bwd {dtype} n={n} d={d}: {_rel(gx, rg):.2e}")
    # bad indices must raise with the position, never read out of bounds
    x = torch.randn(10, 4, device=device)
    for fn, what in ((lambda: sc.centroids(x, torch.tensor([0] * 9 + [5], device=device), 3), "ids"),
                     (lambda: sc.select_features(x, torch.tensor([0, 4], device=device)), "index")):
        try:
            fn()
            if device != "cpu":
                torch.cuda.synchronize()
            failures.append(f"bad {what} was accepted")
        except (ValueError, RuntimeError, IndexError):
            pass
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    failures = infonce_cases(args.device) + segment_gather_cases(args.device)
    if args.device != "cpu":
        torch.cuda.synchronize()
    for f in failures:
        print("FAIL", f)
    print(f"gpu_smoke on {args.device}: {'OK' if not failures else f'{len(failures)} failures'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
