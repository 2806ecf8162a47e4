"""The InfoNCE "mma" kernels (csrc/infonce/infonce_mma_cuda.cu: cp.async + ldmatrix +
mma.sync.m16n8k16, implementation 3 of set_infonce_cuda_impl) on the CPU CUDA emulator
(shared/tools/cuda-emu), against the emulated gemm path, the CPU ops, an fp64 reference and
plain PyTorch in the same dtype. A development aid, not part of the pytest suite (the emulator
lives outside the repository):

    PY=.venv/bin/python $EMU/build.sh . build/emu_fib.so -DEMU_FIBERS
    .venv/bin/python tools/emu/test_infonce_mma_emu.py build/emu_fib.so [--quick | --races]

(--races: three cases for the threads and ASan builds, whose runs are 10-30x slower.)

Checks, for bf16 and fp16, symmetric and rectangular (offset) forms, forward and backward
(random coefficients = reduction "none" with random upstream grads, and "mean"):
  * mma vs gemm path and vs CPU op: fp32-logit tolerances (both compute exact products in
    fp32; s*G is rounded once to the input dtype before the cuBLAS products in both);
  * mma vs fp64 reference: max error <= 2 x the error of plain PyTorch in the same dtype
    (logits, cross-entropies and autograd in bf16/fp16) + a small floor;
  * N = 1: loss and "mean" gradients exactly 0; NaN input rows: NaN exactly where the fp64
    reference has NaN; a non-positive scale poisons the LSEs; scale 100; ragged N and D
    (masked tails, unaligned rows through the plain-load path), chunked passes, one column
    split per row block (several column tiles through one cp.async pipeline); reruns are
    bit-identical; zero emulator errors;
  * impl per call (the ops' last argument: 3 exactly mma, -3 mma as a preference, 1 gemm, 2
    tile, 4 wgmma) against the process-wide setter: the per-call choice wins over the setting
    and gives the setter's bits; exact requests that cannot run (fp32 inputs, wgmma, which the
    emulator does not run) are ValueErrors naming the implementation, preferences fall back to
    gemm.
Exit status 0 when every check passes.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F

lib = sys.argv[1]
quick = "--quick" in sys.argv
torch.ops.load_library(lib)
import semcomp_ext  # noqa: E402,F401  (CPU ops under torch.ops.semcomp)
from semcomp_ext.reference import infonce_lse_reference  # noqa: E402
from emu_checks import chk, chk_exact, chk_within, counters, finish, refused  # noqa: E402

E, C = torch.ops.semcomp_emu, torch.ops.semcomp
cl = counters(lib)
MMA, GEMM, TILE, WGMMA = 3, 1, 2, 4
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def run(impl, f, *args):
    cl.emu_set_impl(impl)
    return f(*args)


def ref_fwd(q, k, s, off, sym):
    return infonce_lse_reference(q, k, s, off, symmetric=sym)


def ref_bwd(q, k, s, r, c, rc, cc, dc, off, sym):
    """fp64 gradients from the coefficient form, and the sum of |terms| of each (error scale)."""
    q, k = q.double(), k.double()
    W = q @ k.T
    S = s * W
    P = rc.double()[:, None] * torch.exp(S - r.double()[:, None])
    if sym:
        P = P + cc.double()[None, :] * torch.exp(S - c.double()[None, :])
    idx = torch.arange(q.shape[0])
    G, Ga = P.clone(), P.abs()
    G[idx, idx + off] -= dc.double()
    Ga[idx, idx + off] += dc.double().abs()
    grads = (s * G @ k, s * G.T @ q, (G * W).sum())
    mags = (s * Ga @ k.abs(), s * Ga.T @ q.abs(), (Ga * W.abs()).sum())
    return grads, mags


def torch_loss(q, k, s, off, sym):
    """Per-row losses computed by plain PyTorch in q's dtype (the dtype criterion's peer)."""
    logits = (s.to(q.dtype) * (q @ k.T)).float().to(q.dtype)
    tgt = torch.arange(q.shape[0]) + off
    lr = F.cross_entropy(logits.float().to(q.dtype), tgt, reduction="none") if q.dtype == torch.float32 else \
        _ce_dtype(logits, tgt)
    if not sym:
        return lr
    return 0.5 * (lr + _ce_dtype(logits.T, tgt))


def _ce_dtype(logits, tgt):
    # log-softmax in the dtype itself (CPU cross_entropy upcasts internally for bf16/fp16)
    m = logits.max(1, keepdim=True).values
    z = logits - m
    lse = z.exp().sum(1, keepdim=True).log()
    return (lse - z).gather(1, tgt[:, None])[:, 0]


def torch_mean_grads(q, k, s_val, off, sym):
    qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
    ss = torch.tensor(s_val, dtype=q.dtype, requires_grad=True)
    logits = ss * (qq @ kk.T)
    tgt = torch.arange(q.shape[0]) + off
    loss = _ce_dtype(logits, tgt).mean()
    if sym:
        loss = 0.5 * (loss + _ce_dtype(logits.T, tgt).mean())
    loss.backward()
    return qq.grad, kk.grad, ss.grad.reshape(1)


def mean_coefs(n, sym):
    g = torch.full((n,), 1.0 / n)
    return (0.5 * g, 0.5 * g, g) if sym else (g, None, g)


def case(dt, n, d, chunk=0, s_val=14.3, nq=None, off=None):
    eps = EPS[dt]
    a = F.normalize(torch.randn(n, d), dim=1).to(dt)
    b = F.normalize(torch.randn(n, d), dim=1).to(dt)
    s = torch.tensor(s_val)
    tag = f"{str(dt)[6:]} n={n} d={d} chunk={chunk} s={s_val}"
    ftol = 1e-5 * s_val + 1e-6  # fp32 logits of exact products: dots differ in the last bits
    # ---- symmetric ----
    fm = run(MMA, E.infonce_fwd, a, b, s, chunk)
    fm2 = run(MMA, E.infonce_fwd, a, b, s, chunk)
    chk_exact(f"sym {tag}", all(torch.equal(x, y) for x, y in zip(fm, fm2)), "rerun not bit-identical")
    fg = run(GEMM, E.infonce_fwd, a, b, s, chunk)
    fc = C.infonce_fwd(a, b, s, chunk)
    fr = ref_fwd(a, b, s_val, 0, True)
    for nm, x, y, z, r in zip(("loss", "rlse", "clse"), fm, fg, fc, fr):
        chk(f"sym fwd mma-vs-gemm {nm} {tag}", x, y, ftol)
        chk(f"sym fwd mma-vs-CPU {nm} {tag}", x, z, ftol)
        chk(f"sym fwd mma-vs-fp64 {nm} {tag}", x, r, ftol)
    chk_within(f"sym fwd mma-vs-fp64/torch loss {tag}", fm[0], fr[0], torch_loss(a, b, s, 0, True), 1e-6 * s_val, peer_name="torch")
    if n == 1:
        chk_exact(f"sym {tag}", fm[0].abs().max().item() == 0, f"N=1 loss not exactly 0 ({fm[0].tolist()})")
    for kind in ("none", "mean"):
        if kind == "none":
            rc, cc, dc = torch.rand(n), torch.rand(n), torch.rand(n)
        else:
            rc, cc, dc = mean_coefs(n, True)
        gm = run(MMA, E.infonce_bwd, a, b, s, fm[1], fm[2], rc, cc, dc, chunk)
        gg = run(GEMM, E.infonce_bwd, a, b, s, fg[1], fg[2], rc, cc, dc, chunk)
        gc = C.infonce_bwd(a, b, s, fc[1], fc[2], rc, cc, dc, chunk)
        grads, mags = ref_bwd(a, b, s_val, fr[1], fr[2], rc, cc, dc, 0, True)
        for nm, x, y, z, ref, mg in zip(("ga", "gb", "gs"), gm, gg, gc, grads, mags):
            tol = (4 * eps if nm != "gs" else 1e-4) * mg + 1e-6
            chk_exact(f"sym bwd {nm} {tag}", x.dtype == y.dtype and x.shape == y.shape, f"dtype/shape {x.dtype} {y.dtype}")
            chk(f"sym bwd[{kind}] mma-vs-gemm {nm} {tag}", x, y, tol)
            chk(f"sym bwd[{kind}] mma-vs-CPU {nm} {tag}", x, z, 2 * tol)  # two independent roundings of s*G
            chk(f"sym bwd[{kind}] mma-vs-fp64 {nm} {tag}", x, ref, tol)
        if kind == "mean":
            tg = torch_mean_grads(a, b, s_val, 0, True)
            for nm, x, ref, t in zip(("ga", "gb", "gs"), gm, grads, tg):
                chk_within(f"sym bwd[mean] mma-vs-fp64/torch {nm} {tag}", x, ref, t, 1e-7, peer_name="torch")
            if n == 1:
                chk_exact(f"sym {tag}", all(x.abs().max().item() == 0 for x in gm), "N=1 gradients not exactly 0")
    # ---- rectangular: q = rows [1, 1 + nq) of a (a view: unaligned rows for most d), positives at k[i + off] ----
    nq = nq if nq is not None else max(1, n // 2)
    off = off if off is not None else n // 3
    if n < 2:
        q = a
        nq, off = n, 0
    else:
        nq = min(nq, n - 1)
        off = min(off, n - nq)
        q = a[1:1 + nq]
    rt = f"{tag} nq={nq} off={off}"
    rm = run(MMA, E.infonce_rect_fwd, q, b, s, off, chunk)
    rg = run(GEMM, E.infonce_rect_fwd, q, b, s, off, chunk)
    rcpu = C.infonce_rect_fwd(q, b, s, off, chunk)
    rr = ref_fwd(q, b, s_val, off, False)
    for nm, x, y, z, r in zip(("loss", "lse"), rm, rg, rcpu, rr):
        chk(f"rect fwd mma-vs-gemm {nm} {rt}", x, y, ftol)
        chk(f"rect fwd mma-vs-CPU {nm} {rt}", x, z, ftol)
        chk(f"rect fwd mma-vs-fp64 {nm} {rt}", x, r, ftol)
    chk_within(f"rect fwd mma-vs-fp64/torch loss {rt}", rm[0], rr[0], torch_loss(q, b, s, off, False), 1e-6 * s_val, peer_name="torch")
    for kind in ("none", "mean"):
        if kind == "none":
            rc, dc = torch.rand(nq), torch.rand(nq)
        else:
            rc, _, dc = mean_coefs(nq, False)
        bm = run(MMA, E.infonce_rect_bwd, q, b, s, rm[1], rc, dc, off, chunk)
        bg = run(GEMM, E.infonce_rect_bwd, q, b, s, rg[1], rc, dc, off, chunk)
        bc = C.infonce_rect_bwd(q, b, s, rcpu[1], rc, dc, off, chunk)
        grads, mags = ref_bwd(q, b, s_val, rr[1], None, rc, None, dc, off, False)
        for nm, x, y, z, ref, mg in zip(("gq", "gk", "gs"), bm, bg, bc, grads, mags):
            tol = (4 * eps if nm != "gs" else 1e-4) * mg + 1e-6
            chk(f"rect bwd[{kind}] mma-vs-gemm {nm} {rt}", x, y, tol)
            chk(f"rect bwd[{kind}] mma-vs-CPU {nm} {rt}", x, z, 2 * tol)  # two independent roundings of s*G
            chk(f"rect bwd[{kind}] mma-vs-fp64 {nm} {rt}", x, ref, tol)
        if kind == "mean":
            tg = torch_mean_grads(q, b, s_val, off, False)
            for nm, x, ref, t in zip(("gq", "gk", "gs"), bm, grads, tg):
                chk_within(f"rect bwd[mean] mma-vs-fp64/torch {nm} {rt}", x, ref, t, 1e-7, peer_name="torch")


def chk_nan(tag, x, ref, peer=None):
    """NaN in x exactly where the fp64 reference has NaN. peer: the gemm path's output from the
    same cuBLAS stand-in; the CPU bf16 torch.mm that stands in for cuBLAS here also spreads a
    NaN row of its left operand to a neighbouring output row (a CPU kernel artefact, absent in
    fp32), so a superset of the reference is accepted only when the gemm path shows the same."""
    xn, rn = torch.isnan(x), torch.isnan(ref)
    ok = torch.equal(xn, rn)
    if not ok and peer is not None and x.dtype == torch.bfloat16:
        ok = bool((xn | ~rn).all()) and torch.equal(xn, torch.isnan(peer))
    chk_exact(tag, ok, f"NaN pattern differs: {int(xn.sum())} vs reference {int(rn.sum())}")


def nan_case(dt, n, d, bad_row, in_k=False):
    """A NaN input row: NaN outputs exactly where the fp64 reference has them."""
    a = F.normalize(torch.randn(n, d), dim=1).to(dt)
    b = F.normalize(torch.randn(n, d), dim=1).to(dt)
    (b if in_k else a)[bad_row] = float("nan")
    s_val = 14.3
    s = torch.tensor(s_val)
    tag = f"nan {str(dt)[6:]} n={n} d={d} row={bad_row} in_{'k' if in_k else 'q'}"
    fm = run(MMA, E.infonce_fwd, a, b, s, 0)
    fr = ref_fwd(a, b, s_val, 0, True)
    for nm, x, r in zip(("loss", "rlse", "clse"), fm, fr):
        chk_nan(f"{tag} fwd {nm}", x, r)
        chk(f"{tag} fwd {nm} mma-vs-fp64", x, r, 1e-5 * s_val)
    rc, cc, dc = mean_coefs(n, True)
    gm = run(MMA, E.infonce_bwd, a, b, s, fm[1], fm[2], rc, cc, dc, 0)
    grads, _ = ref_bwd(a, b, s_val, fr[1], fr[2], rc, cc, dc, 0, True)
    for nm, x, r in zip(("ga", "gb", "gs"), gm, grads):
        chk_nan(f"{tag} bwd {nm}", x, r)
    nq = n - 1
    q = a[:nq]
    rm = run(MMA, E.infonce_rect_fwd, q, b, s, 1, 0)
    rr = ref_fwd(q, b, s_val, 1, False)
    for nm, x, r in zip(("loss", "lse"), rm, rr):
        chk_nan(f"{tag} rect fwd {nm}", x, r)
        chk(f"{tag} rect fwd {nm} mma-vs-fp64", x, r, 1e-5 * s_val)
    rc, _, dc = mean_coefs(nq, False)
    bm = run(MMA, E.infonce_rect_bwd, q, b, s, rm[1], rc, dc, 1, 0)
    rg = run(GEMM, E.infonce_rect_fwd, q, b, s, 1, 0)
    bg = run(GEMM, E.infonce_rect_bwd, q, b, s, rg[1], rc, dc, 1, 0)
    grads, _ = ref_bwd(q, b, s_val, rr[1], None, rc, None, dc, 1, False)
    for nm, x, r, p in zip(("gq", "gk", "gs"), bm, grads, bg):
        chk_nan(f"{tag} rect bwd {nm}", x, r, p)


def same(tag, got, want):
    chk_exact(tag, all(torch.equal(x, y) for x, y in zip(got, want)), "not bit-identical")


def per_call_case(dt, n=67, d=40, off=9):
    """The ops' impl argument against the process-wide setting (emu_set_impl)."""
    a = F.normalize(torch.randn(n, d), dim=1).to(dt)
    b = F.normalize(torch.randn(n, d), dim=1).to(dt)
    s = torch.tensor(14.3)
    tag = f"per-call {str(dt)[6:]} n={n} d={d}"
    want = run(MMA, E.infonce_fwd, a, b, s, 0)
    tiles = cl.emu_mma_tiles()
    same(f"{tag} fwd impl=3 under setting gemm", run(GEMM, E.infonce_fwd, a, b, s, 0, MMA), want)
    chk_exact(tag, cl.emu_mma_tiles() > tiles, "impl=3 per call did not run mma.sync tiles")
    same(f"{tag} fwd impl=-3 under setting gemm", run(GEMM, E.infonce_fwd, a, b, s, 0, -MMA), want)
    gemm = run(GEMM, E.infonce_fwd, a, b, s, 0)
    tiles = cl.emu_mma_tiles()
    same(f"{tag} fwd impl=1 under setting mma", run(MMA, E.infonce_fwd, a, b, s, 0, GEMM), gemm)
    chk_exact(tag, cl.emu_mma_tiles() == tiles, "impl=1 per call ran mma.sync tiles")
    same(f"{tag} fwd impl=2 under setting gemm", run(GEMM, E.infonce_fwd, a, b, s, 0, TILE),
         run(TILE, E.infonce_fwd, a, b, s, 0))
    rc, cc, dc = torch.rand(n), torch.rand(n), torch.rand(n)
    same(f"{tag} bwd impl=3 under setting gemm",
         run(GEMM, E.infonce_bwd, a, b, s, want[1], want[2], rc, cc, dc, 0, MMA),
         run(MMA, E.infonce_bwd, a, b, s, want[1], want[2], rc, cc, dc, 0))
    q = a[1:1 + n // 2]
    rw = run(MMA, E.infonce_rect_fwd, q, b, s, off, 0)
    same(f"{tag} rect fwd impl=3", run(GEMM, E.infonce_rect_fwd, q, b, s, off, 0, MMA), rw)
    rc = torch.rand(q.shape[0])
    same(f"{tag} rect bwd impl=-3", run(GEMM, E.infonce_rect_bwd, q, b, s, rw[1], rc, rc, off, 0, -MMA),
         run(MMA, E.infonce_rect_bwd, q, b, s, rw[1], rc, rc, off, 0))
    # the emulator does not run wgmma: an exact request is refused, a preference runs gemm
    refused(f"{tag} impl=4", "impl=4 (wgmma) cannot run these inputs", run, GEMM, E.infonce_fwd, a, b, s, 0, WGMMA)
    same(f"{tag} fwd impl=-4", run(MMA, E.infonce_fwd, a, b, s, 0, -WGMMA), gemm)
    refused(f"{tag} fp32 impl=3", "impl=3 (mma) cannot run these inputs: it needs bf16/fp16 inputs", run, GEMM,
            E.infonce_fwd, a.float(), b.float(), s, 0, MMA)
    f32 = run(GEMM, E.infonce_fwd, a.float(), b.float(), s, 0)
    same(f"{tag} fp32 impl=-3 falls back to gemm", run(GEMM, E.infonce_fwd, a.float(), b.float(), s, 0, -MMA), f32)
    refused(f"{tag} impl=5", "impl must be 0", run, GEMM, E.infonce_fwd, a, b, s, 0, 5)


torch.manual_seed(0)
t0 = time.time()
e0 = cl.emu_errors()
cl.emu_reset_counters()
races = "--races" in sys.argv  # for the threads / ASan builds: few cases, the pipeline's hazards
if races:
    shapes = [(67, 7)]
elif quick:
    shapes = [(5, 33), (130, 40)]
else:  # every N in {1, 5, 67, 130, 257} and every D in {7, 33, 40, 64, 130}, both dtypes
    shapes = [(1, 7), (5, 33), (67, 40), (130, 64), (257, 130), (67, 7), (130, 33), (5, 64), (257, 40)]
n_cases = 0
for dt in (torch.bfloat16, torch.float16):
    for n, d in shapes:
        case(dt, n, d)
        n_cases += 1
    print(f"{dt}: {n_cases} cases, {time.time() - t0:.0f}s", flush=True)
if races:  # one column split: 3 column tiles per CTA through one cp.async pipeline
    os.environ["EMU_SMS"] = "1"
    case(torch.bfloat16, 257, 40, nq=200, off=57)
    del os.environ["EMU_SMS"]
    n_cases += 1
if not quick and not races:
    case(torch.bfloat16, 67, 40, s_val=100.0)           # scale 100
    case(torch.float16, 130, 33, s_val=100.0, nq=40, off=90)
    case(torch.bfloat16, 130, 40, chunk=50)             # ragged backward chunks, one-block forward passes
    case(torch.float16, 257, 64, chunk=128)             # three forward passes of column partials
    os.environ["EMU_SMS"] = "1"  # one column split per row block: 3 column tiles through one pipeline
    case(torch.bfloat16, 257, 33)
    case(torch.float16, 257, 40, nq=200, off=57)
    del os.environ["EMU_SMS"]
    n_cases += 6
    for dt in (torch.bfloat16, torch.float16):
        nan_case(dt, 67, 40, 3)
        nan_case(dt, 130, 33, 129, in_k=True)
    print(f"special cases: {time.time() - t0:.0f}s", flush=True)
for dt in (torch.bfloat16, torch.float16):
    per_call_case(dt)
print(f"per-call impl: {time.time() - t0:.0f}s", flush=True)
for dt in (torch.bfloat16, torch.float16):  # non-positive scale: NaN LSEs, not silently finite
    a = torch.randn(9, 8).to(dt)
    bad = run(MMA, E.infonce_fwd, a, a, torch.tensor(-1.0), 0)
    chk_exact(f"mma {dt} scale -1", torch.isnan(bad[1]).all() and torch.isnan(bad[2]).all(),
              "non-positive scale did not poison the LSEs")
finish("mma", n_cases, t0, cl, e0, "no mma.sync tile ran (the mma path was not selected)")
