"""Checks of the CUDA host code and kernels on the CPU, through the CUDA emulator (a development
aid outside the project: ../shared/tools/cuda-emu). Covers what the emulator's own op tests do
not: SigLIP's mixed-precision path, d = 0 on the tile implementation, the tile forward's
chunked column partials, and the gemm path's forward/backward chunk agreement.

Build the emulated library with tiny workspace budgets, so that small cases span several
chunks (the budgets are compile-time constants of csrc/infonce/infonce_chunks.h):

    PY=.venv/bin/python ../shared/tools/cuda-emu/build.sh . build/emu_chk.so -DEMU_FIBERS \\
        -DSEMCOMP_INFONCE_BUDGET_BYTES=262144 -DSEMCOMP_TILE_COL_BUDGET_BYTES=1024
    .venv/bin/python tools/emu_check_cuda.py build/emu_chk.so --gemm-budget 262144 --tile-col-budget 1024

Exit status 0 when every check passes (and the emulator counted no error).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time

import torch
import torch.nn.functional as F

GEMM, TILE = 1, 2
LOW = (torch.bfloat16, torch.float16)


class Checks:
    def __init__(self):
        self.n, self.fails = 0, []

    def ok(self, cond: bool, tag: str):
        self.n += 1
        if not cond:
            self.fails.append(tag)

    def close(self, tag, got, want, rtol, atol=0.0):
        got, want = got.double(), want.double()
        same = got.shape == want.shape and torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True)
        err = (got - want).abs().max().item() if got.shape == want.shape and got.numel() else float("nan")
        self.ok(same, f"{tag}: max abs err {err:.3e}")


def unit(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1).to(dtype)


# ---- SigLIP ------------------------------------------------------------------------------------


def siglip_fp64(a, b, s, t, neg, g):
    """Loss rows and the gradients (with per-row upstream g) in fp64 autograd."""
    a, b = a.double().requires_grad_(), b.double().requires_grad_()
    s, t = torch.tensor(float(s), dtype=torch.float64, requires_grad=True), torch.tensor(float(t), dtype=torch.float64, requires_grad=True)
    z = s * a @ b.T + t
    y = -torch.ones_like(z)
    if not neg:
        y = y + 2 * torch.eye(z.shape[0], z.shape[1], dtype=torch.float64)
    rows = F.softplus(-y * z).sum(1)
    grads = torch.autograd.grad((rows * g.double()).sum(), (a, b, s, t))
    return rows.detach(), grads


def siglip_plain(a, b, s, t, neg, g):
    """Plain PyTorch in the inputs' dtype (logits and their gradient in that dtype)."""
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    z = float(s) * a @ b.T + float(t)
    y = -torch.ones_like(z)
    if not neg:
        y = y + 2 * torch.eye(z.shape[0], z.shape[1], dtype=z.dtype)
    rows = F.softplus(-y * z).sum(1)
    ga, gb = torch.autograd.grad((rows * g.to(rows.dtype)).sum(), (a, b))
    return rows.detach(), (ga, gb)


def check_siglip(E, C, ck: Checks):
    """bf16/fp16 run mixed (bf16/fp16 GEMM operands, fp32 accumulation): losses and
    gradients within twice plain PyTorch's error in the same dtype (max abs against fp64),
    and close to the CPU op (fp32 arithmetic on the same inputs); fp32 against fp64."""
    cases = ((5, 5, 7, 0, False), (67, 67, 33, 0, False), (67, 67, 40, 16, False),
             (130, 130, 33, 50, False), (20, 130, 40, 6, True))
    for dt in (torch.float32,) + LOW:
        for na, nb, d, chunk, neg in cases:
            a, b = unit(na, d, dt, na + d), unit(nb, d, dt, nb + 7 * d)
            # fp16 at mean-sized upstream gradients: unscaled s*G entries fall below fp16's
            # smallest subnormal here, so this checks the power-of-two pre-scale too
            g = torch.full((na,), 1.0 / 32768, dtype=torch.float32) * (1 + torch.rand(na, generator=torch.Generator().manual_seed(na)))
            s, t = torch.tensor(10.0), torch.tensor(-10.0)
            tag = f"siglip {dt} {na}x{nb} d={d} chunk={chunk} neg={neg}"
            rows = E.sigmoid_fwd(a, b, s, t, neg, chunk)
            ck.close(tag + " fwd vs CPU op", rows, C.sigmoid_fwd(a, b, s, t, neg, chunk), 2e-6, 1e-6)
            truth_rows, truth = siglip_fp64(a, b, s, t, neg, g)
            ga, gb, gs, gt = E.sigmoid_bwd(a, b, s, t, g, neg, chunk)
            ck.ok(ga.dtype == dt and gb.dtype == dt, f"{tag}: gradient dtypes {ga.dtype} {gb.dtype}")
            ca, cb, cs, ct = C.sigmoid_bwd(a, b, s, t, g, neg, chunk)
            if dt == torch.float32:
                ck.close(tag + " fwd vs fp64", rows, truth_rows, 1e-5, 1e-6)
                for nm, x, w in zip(("ga", "gb", "gs", "gt"), (ga, gb, gs, gt), truth):
                    ck.close(f"{tag} {nm} vs fp64", x, w, 1e-4, 1e-8)
                continue
            plain_rows, plain = siglip_plain(a, b, s, t, neg, g)
            err = lambda x, w: (x.double() - w).abs().max().item()  # noqa: E731
            ck.ok(err(rows, truth_rows) <= 2 * err(plain_rows, truth_rows) + 1e-12,
                  f"{tag} loss: {err(rows, truth_rows):.3g} vs plain {err(plain_rows, truth_rows):.3g}")
            for nm, x, p, w in zip(("ga", "gb"), (ga, gb), plain, truth[:2]):
                ck.ok(err(x, w) <= 2 * err(p, w) + 1e-12, f"{tag} {nm}: {err(x, w):.3g} vs plain {dt} {err(p, w):.3g}")
                ck.ok(bool((x != 0).any()), f"{tag} {nm}: all zero (flushed)")
            # d scale and d bias come from the fp32 W and G: as accurate as the CPU op
            for nm, x, c in (("gs", gs, cs), ("gt", gt, ct)):
                ck.close(f"{tag} {nm} vs CPU op", x, c, 1e-4, 1e-9)
            fe = E.sigmoid_fwd_bwd(a, b, s, t, neg, chunk)
            ck.ok(fe[1].dtype == torch.float32, f"{tag}: fwd_bwd gradients kept in fp32, got {fe[1].dtype}")
            # the mixed path ran: its fp32 gradients carry the rounding of s*G to the input
            # dtype, which the CPU op (fp32 throughout) does not
            fc = C.sigmoid_fwd_bwd(a, b, s, t, neg, chunk)
            rel = ((fe[1] - fc[1]).norm() / fc[1].norm()).item()
            ck.ok(1e-5 < rel < 2e-2, f"{tag}: fwd_bwd grad_a {rel:.2e} from the fp32 CPU op")
            ck.close(tag + " fwd_bwd total vs fwd", fe[0], rows.sum(), 1e-6)
        a = unit(4, 3, dt, 1)
        bad = E.sigmoid_fwd(a, a, torch.tensor(float("inf")), torch.tensor(0.0), False, 0)
        ck.ok(bool(torch.isnan(bad).all()), f"siglip {dt}: an inf scale does not poison the loss")


# ---- InfoNCE -----------------------------------------------------------------------------------


def infonce_fp64(q, k, s, off, sym):
    from semcomp_ext.reference import infonce_lse_reference

    return infonce_lse_reference(q, k, float(s), off, symmetric=sym)


def run_infonce(E, q, k, s, off, sym, chunk):
    """Forward and backward of the symmetric (off = 0) or rectangular op, with the mean
    loss's coefficients."""
    n = q.shape[0]
    if sym:
        loss, r, c = E.infonce_fwd(q, k, s, chunk)
        coef = torch.full_like(r, 0.5 / n)
        grads = E.infonce_bwd(q, k, s, r, c, coef, coef, coef * 2, chunk)
        return (loss, r, c), grads
    loss, r = E.infonce_rect_fwd(q, k, s, off, chunk)
    coef = torch.full_like(r, 1.0 / n)
    grads = E.infonce_rect_bwd(q, k, s, r, coef, coef, off, chunk)
    return (loss, r), grads


def counted(lib, fn):
    """(result, kernel launches, blocks) of fn() in the emulator."""
    lib.emu_reset_counters()
    out = fn()
    return out, lib.emu_launches(), lib.emu_blocks()


def check_tile_d0(E, lib, ck: Checks):
    """d = 0 with the tile implementation selected runs the gemm path's kernels (the same
    launches and blocks as with gemm selected; at d = 8 the two differ, so the count tells the
    paths apart). Every logit is 0: loss = log N (symmetric), every gradient 0."""
    import math

    for dt in LOW:
        for n, sym in ((5, True), (67, True), (9, False)):
            nk = n if sym else n + 3
            per_impl = {}
            for d in (0, 8):
                q, k = unit(n, d, dt, 1) if d else torch.empty(n, 0, dtype=dt), unit(nk, d, dt, 2) if d else torch.empty(nk, 0, dtype=dt)
                for impl in (TILE, GEMM):
                    lib.emu_set_impl(impl)
                    per_impl[d, impl] = counted(lib, lambda: run_infonce(E, q, k, torch.tensor(14.3), 2, sym, 0))
                lib.emu_set_impl(GEMM)
            tag = f"d=0 {dt} n={n} sym={sym}"
            (fwd, grads), *tile_counts = per_impl[0, TILE]
            ck.ok(tile_counts == list(per_impl[0, GEMM][1:]),
                  f"{tag}: tile selected ran {tile_counts}, the gemm path runs {list(per_impl[0, GEMM][1:])}")
            ck.ok(per_impl[8, TILE][1:] != per_impl[8, GEMM][1:], f"{tag}: launch counts do not tell the paths apart")
            want = math.log(nk)
            ck.close(tag + " row lse", fwd[1], torch.full((n,), want), 1e-6)
            ck.close(tag + " loss", fwd[0], torch.full((n,), want), 1e-6)
            ck.ok(all(g.numel() == 0 or bool((g == 0).all()) for g in grads[:2]), f"{tag}: non-zero gradient")
            ck.ok(float(grads[2]) == 0.0, f"{tag}: d scale {float(grads[2])}")


def tile_col_chunk(n_k, budget):
    """Rows per chunk of the tile forward's column partials (infonce_chunks.h)."""
    return max(1, budget // (8 * n_k)) * 64


def check_tile_chunked(E, lib, ck: Checks, budget):
    """Tile forward with the column partials in several chunks (tiny budget): one tile launch
    and one column merge per chunk (counted), results equal to the gemm path's within fp32
    rounding and to fp64, at ragged N and D."""
    for dt in LOW:
        for n, d in ((130, 33), (200, 40), (67, 7)):
            chunks = -(-n // min(n, tile_col_chunk(n, budget)))
            q, k = unit(n, d, dt, 3 * n + d), unit(n, d, dt, 5 * n + d)
            s = torch.tensor(14.3)
            lib.emu_set_impl(TILE)
            tf, launches, _ = counted(lib, lambda: E.infonce_fwd(q, k, s, 0))
            tiles = lib.emu_mma_tiles()
            tf, tg = run_infonce(E, q, k, s, 0, True, 0)
            lib.emu_set_impl(GEMM)
            gf, gg = run_infonce(E, q, k, s, 0, True, 0)
            tag = f"tile chunked {dt} n={n} d={d} ({chunks} column-partial chunks)"
            ck.ok(tiles > 0, f"{tag}: no tensor-core tile ran")
            # per chunk: tile_fwd_kernel + col_merge_kernel; then the row and symmetric finish
            ck.ok(chunks >= 2 and launches == 2 * chunks + 2, f"{tag}: {launches} launches in the forward")
            truth = infonce_fp64(q, k, s, 0, True)
            for nm, x, y, w in zip(("loss", "rlse", "clse"), tf, gf, truth):
                ck.close(f"{tag} {nm} vs gemm", x, y, 1e-5, 1e-5)
                ck.close(f"{tag} {nm} vs fp64", x, w, 1e-3, 1e-3)
            for nm, x, y in zip(("dq", "dk", "ds"), tg, gg):
                ck.close(f"{tag} {nm} vs gemm", x, y, 2e-2, 1e-4)


def gemm_chunk(rows, cols, bytes_per_elem, budget):
    c = budget // (max(cols, 1) * bytes_per_elem)
    return min(max(c // 64 * 64, 64), 8192, rows)


def check_gemm_chunks_agree(E, ck: Checks, budget):
    """The gemm path's automatic chunks follow infonce_chunks.h (W fp32 + G 2 bytes per logit
    for bf16/fp16, in the forward and the backward): automatic chunking gives the same bits as
    an explicit chunk_size of that split. Only the backward's split is observable here (dk
    accumulates chunk by chunk in fp32: another split changes its fp32 bits, checked too); the
    forward's W blocks differ by split on a GPU only, where cuBLAS may pick another algorithm
    per shape (tests/test_cuda_chunking.py runs that check there)."""
    for dt in LOW + (torch.float32,):
        n, d = 512, 16
        q, k = unit(n, d, dt, 11), unit(n, d, dt, 12)
        s = torch.tensor(20.0)
        c = gemm_chunk(n, n, 4 + (2 if dt in LOW else 0), budget)
        tag = f"gemm chunks {dt} n={n} chunk={c}"
        auto_f, auto_g = run_infonce(E, q, k, s, 0, True, 0)
        expl_f, expl_g = run_infonce(E, q, k, s, 0, True, c)
        _, other_g = run_infonce(E, q, k, s, 0, True, 3 * c)
        ck.ok(c < n, f"{tag}: a single chunk, nothing checked")
        for nm, x, y in zip(("loss", "rlse", "clse", "dq", "dk", "ds"), auto_f + auto_g, expl_f + expl_g):
            ck.ok(torch.equal(x, y), f"{tag}: auto != chunk_size={c} in {nm}")
        if dt == torch.float32:  # bf16/fp16 dk is rounded to the input dtype at the end, hiding the split
            ck.ok(not torch.equal(auto_g[1], other_g[1]), f"{tag}: dk does not depend on the split, nothing checked")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("lib")
    p.add_argument("--gemm-budget", type=int, required=True, help="SEMCOMP_INFONCE_BUDGET_BYTES of the build")
    p.add_argument("--tile-col-budget", type=int, required=True, help="SEMCOMP_TILE_COL_BUDGET_BYTES of the build")
    p.add_argument("--only", nargs="*", default=["siglip", "d0", "tile_chunks", "gemm_chunks"])
    args = p.parse_args(argv)
    torch.ops.load_library(args.lib)
    import semcomp_ext  # noqa: F401  (the CPU ops under torch.ops.semcomp)

    E, C = torch.ops.semcomp_emu, torch.ops.semcomp
    lib = ctypes.CDLL(args.lib)
    for f in ("emu_errors", "emu_launches", "emu_blocks", "emu_mma_tiles"):
        getattr(lib, f).restype = ctypes.c_longlong
    ck = Checks()
    t0 = time.time()
    steps = {"siglip": lambda: check_siglip(E, C, ck), "d0": lambda: check_tile_d0(E, lib, ck),
             "tile_chunks": lambda: check_tile_chunked(E, lib, ck, args.tile_col_budget),
             "gemm_chunks": lambda: check_gemm_chunks_agree(E, ck, args.gemm_budget)}
    for name in args.only:
        t1 = time.time()
        steps[name]()
        print(f"{name}: {time.time() - t1:.1f}s", flush=True)
    errors = lib.emu_errors()
    print(f"checks {ck.n}, failures {len(ck.fails)}, emulator errors {errors}, {time.time() - t0:.1f}s")
    for f in ck.fails[:40]:
        print("FAIL", f)
    return 1 if ck.fails or errors else 0


if __name__ == "__main__":
    sys.exit(main())
