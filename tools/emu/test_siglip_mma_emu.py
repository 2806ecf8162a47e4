"""The SigLIP "mma" implementation (csrc/siglip/siglip_mma_cuda.cu: cp.async + ldmatrix +
mma.sync.m16n8k16 mainloop, sigmoid epilogue of siglip_mma_epilogue.cuh, cuBLAS products) on the
CPU CUDA emulator (shared/tools/cuda-emu), against the emulated gemm path (siglip_cuda.cu), the
fp64 reference (semcomp_ext.reference.sigmoid_loss_reference and its autograd) and plain PyTorch
in the same dtype. A development aid, not part of the pytest suite (the emulator lives outside
the repository):

    EMU_JOBS=1 PY=.venv/bin/python $EMU/build.sh . build/emu_siglip.so -DEMU_FIBERS
    .venv/bin/python tools/emu/test_siglip_mma_emu.py build/emu_siglip.so [--quick]

The mma path is reached through torch.ops.semcomp_siglip_mma_emu.run (registered by
siglip_mma_cuda.cu in emulator builds only: it calls siglip_mma::run directly, and also takes
keep_acc with upstream gradients, which no op does) and through the ops with impl=3; the gemm
path through torch.ops.semcomp_emu.sigmoid_fwd / _bwd / _fwd_bwd (impl=1 when the ops have it).

Checks, for bf16 and fp16, forward, backward (random upstream row gradients) and forward +
backward (ones, fp32 gradients), paired (Na = Nb, positives on the diagonal) and
negative_only (Na != Nb):
  * mma vs fp64 and vs the gemm path elementwise: loss rows within 2^-22 of the row's sum of
    |terms| (fp32 logits of exact products: the dots differ in the last bits), ga / gb within
    4 eps of their sum of |terms| (s*G is rounded once to the input dtype on both paths),
    d scale / d bias within 2^-19 of theirs;
  * the dtype criterion: max error vs fp64 <= 2 x the gemm path's max error + floor, and
    <= 2 x plain PyTorch's (logits, logsigmoid and autograd in the dtype) + floor, floor a few
    fp32 ulps of the largest sum of |terms|;
  * the losses of the forward alone and of the forward + backward are bit-identical, reruns
    are bit-identical, output dtypes and shapes are the gemm path's;
  * a non-finite scale or bias: every output NaN, as the gemm path;
  * ragged N and D (masked row and column tails, D tails zero-filled, d % 8 != 0 and a
    misaligned base through the plain-load path), chunks of 50 and 128 rows, one column split
    per row block (EMU_SMS=1: several column tiles through one cp.async pipeline), scale 100
    with bias -10, fp16 with tiny upstream gradients (the power-of-two pre-scale);
  * when the ops have the `impl` argument (siglip_cuda.cu's per-call dispatch): the ops with
    impl=3 give run()'s results bit for bit (NaN cases included), impl=-3 falls back to gemm
    for fp32 and runs mma for bf16;
  * zero emulator errors, and m16n8k16 tiles did run.
Prints cases, checks, failures and time; exit status 0 when every check passes.
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
from semcomp_ext.reference import sigmoid_loss_reference  # noqa: E402
from emu_checks import chk, chk_exact, counters, finish, refused  # noqa: E402
from emu_checks import chk_within as chk_peer  # noqa: E402

E = torch.ops.semcomp_emu
M = torch.ops.semcomp_siglip_mma_emu
cl = counters(lib)
EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
U32 = 2.0**-24

# the gemm path's ops: pass impl = the gemm implementation when the schema has one
_ARGS = {op: [a.name for a in getattr(E, op).default._schema.arguments]
         for op in ("sigmoid_fwd", "sigmoid_bwd", "sigmoid_fwd_bwd")}
GEMM_IMPL, MMA_IMPL = 1, 3  # common/impl_choice.h
OP_ROUTE = all("impl" in a for a in _ARGS.values())


def gemm(op, *args, **kw):
    if "impl" in _ARGS[op]:
        kw["impl"] = GEMM_IMPL
    return getattr(E, op)(*args, **kw)


def chk_route(tag, via_op, via_run):
    """The ops with impl=3 (siglip_cuda.cu's dispatch) give run()'s results bit for bit."""
    via_op = [via_op] if isinstance(via_op, torch.Tensor) else list(via_op)
    chk_exact(f"op route {tag}", len(via_op) == len(via_run) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.nan_to_num(), y.nan_to_num())
        and torch.equal(x.isnan(), y.isnan()) for x, y in zip(via_op, via_run)),
        "sigmoid op with impl=3 differs from siglip_mma::run")


def reference(a, b, s, t, neg, g):
    """fp64 loss rows and gradients (autograd through sigmoid_loss_reference), and the sums
    of |terms| of each (the error scales)."""
    A = a.double().requires_grad_()
    B = b.double().requires_grad_()
    S = torch.tensor(float(s), dtype=torch.float64, requires_grad=True)
    T = torch.tensor(float(t), dtype=torch.float64, requires_grad=True)
    rows = sigmoid_loss_reference(A, B, S, T, negative_only=neg, reduction="none")
    gg = torch.ones(a.shape[0], dtype=torch.float64) if g is None else g.double()
    rows.backward(gg)
    with torch.no_grad():
        Ad, Bd = a.double(), b.double()
        W = Ad @ Bd.T
        Wabs = Ad.abs() @ Bd.abs().T
        z = s * W + t
        pos = torch.zeros_like(z)
        if not neg:
            pos = torch.eye(a.shape[0], b.shape[0], dtype=torch.float64)
        Gabs = gg.abs()[:, None] * (torch.sigmoid(z) - pos).abs()
        mags = {
            "loss": (abs(s) * Wabs + abs(t) + F.softplus(-(1 - 2 * pos) * z)).sum(1) + 1,
            "ga": abs(s) * Gabs @ Bd.abs(),
            "gb": abs(s) * Gabs.T @ Ad.abs(),
            "gs": (Gabs * W.abs()).sum(),
            "gt": Gabs.sum(),
        }
    ref = {"loss": rows.detach(), "ga": A.grad, "gb": B.grad, "gs": S.grad, "gt": T.grad}
    return ref, mags


def torch_dtype(a, b, s, t, neg, g):
    """The same through plain PyTorch in a's dtype: loss rows and gradients."""
    A, B = a.clone().requires_grad_(), b.clone().requires_grad_()
    S = torch.tensor(float(s), dtype=a.dtype, requires_grad=True)
    T = torch.tensor(float(t), dtype=a.dtype, requires_grad=True)
    rows = sigmoid_loss_reference(A, B, S, T, negative_only=neg, reduction="none")
    rows.backward(torch.ones_like(rows) if g is None else g.to(a.dtype))
    return {"loss": rows.detach(), "ga": A.grad, "gb": B.grad, "gs": S.grad, "gt": T.grad}


TINY = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}  # smallest subnormals


def tol_of(name, mag, dt, out_dtype=torch.float32):
    if name == "loss":
        return 2.0**-22 * mag
    if name in ("ga", "gb"):  # plus the final rounding of a bf16/fp16 output (subnormals too)
        return 4 * EPS[dt] * mag + (TINY[dt] if out_dtype == dt else 1e-30)
    return 2.0**-19 * mag + 1e-30  # gs, gt


def floor_of(name, mag, dt):
    return 8 * U32 * float(mag.max()) if name in ("loss", "gs", "gt") else EPS[dt] * float(mag.max()) / 4


def inputs(dt, na, nb, d, misaligned=False):
    a = F.normalize(torch.randn(na, d), dim=1).to(dt)
    b = F.normalize(torch.randn(nb, d), dim=1).to(dt)
    if misaligned:  # a base 2 bytes past a 16-byte boundary: the plain-load path even for d % 8 == 0
        buf = torch.empty(na * d + 1, dtype=dt)
        buf[1:] = a.flatten()
        a = buf[1:].view(na, d)
    return a, b


def case(dt, na, d, nb=None, neg=False, s_val=10.0, t_val=-5.0, chunk=0, g_scale=1.0, misaligned=False):
    nb = na if nb is None else nb
    a, b = inputs(dt, na, nb, d, misaligned)
    s, t = torch.tensor(s_val), torch.tensor(t_val)
    g = g_scale * torch.rand(na)
    tag = (f"{str(dt)[6:]}{' neg' if neg else ''}{' misaligned' if misaligned else ''} na={na} nb={nb} "
           f"d={d} chunk={chunk} s={s_val} t={t_val} g={g_scale}")
    # ---- forward ----
    fm = M.run(a, b, s, t, None, neg, True, False, chunk, False)
    fm2 = M.run(a, b, s, t, None, neg, True, False, chunk, False)
    chk_exact(f"fwd {tag}", all(torch.equal(x, y) for x, y in zip(fm, fm2)), "rerun not bit-identical")
    fg = gemm("sigmoid_fwd", a, b, s, t, negative_only=neg, chunk_size=chunk)
    if OP_ROUTE:
        chk_route(f"fwd {tag}", E.sigmoid_fwd(a, b, s, t, negative_only=neg, chunk_size=chunk, impl=MMA_IMPL), fm[:1])
    ref, mags = reference(a, b, s_val, t_val, neg, None)
    tdt = torch_dtype(a, b, s_val, t_val, neg, None)
    tol = tol_of("loss", mags["loss"], dt)
    chk_exact(f"fwd {tag}", fm[0].dtype == fg.dtype and fm[0].shape == fg.shape and fm[1].dim() == 0,
              f"loss dtype/shape {fm[0].dtype} {tuple(fm[0].shape)} vs {fg.dtype} {tuple(fg.shape)}")
    chk(f"fwd mma-vs-fp64 loss {tag}", fm[0], ref["loss"], tol)
    chk(f"fwd mma-vs-gemm loss {tag}", fm[0], fg, tol)
    chk(f"fwd mma-vs-fp64 total {tag}", fm[1], ref["loss"].sum(), tol.sum())
    fl = floor_of("loss", mags["loss"], dt)
    chk_peer(f"fwd mma-vs-fp64/gemm loss {tag}", fm[0], ref["loss"], fg, fl)
    chk_peer(f"fwd mma-vs-fp64/torch loss {tag}", fm[0], ref["loss"], tdt["loss"], fl)
    # ---- backward, random upstream gradients ----
    bm = M.run(a, b, s, t, g, neg, False, True, chunk, False)
    bg = gemm("sigmoid_bwd", a, b, s, t, g, negative_only=neg, chunk_size=chunk)
    if OP_ROUTE:
        chk_route(f"bwd {tag}", E.sigmoid_bwd(a, b, s, t, g, negative_only=neg, chunk_size=chunk, impl=MMA_IMPL), bm)
    ref, mags = reference(a, b, s_val, t_val, neg, g)
    tdt = torch_dtype(a, b, s_val, t_val, neg, g)
    for nm, x, y in zip(("ga", "gb", "gs", "gt"), bm, bg):
        chk_exact(f"bwd {nm} {tag}", x.dtype == y.dtype and x.shape == y.shape,
                  f"dtype/shape {x.dtype} {tuple(x.shape)} vs gemm {y.dtype} {tuple(y.shape)}")
        tol = tol_of(nm, mags[nm], dt, x.dtype)
        chk(f"bwd mma-vs-fp64 {nm} {tag}", x, ref[nm], tol)
        chk(f"bwd mma-vs-gemm {nm} {tag}", x, y, tol)
        fl = floor_of(nm, mags[nm], dt)
        chk_peer(f"bwd mma-vs-fp64/gemm {nm} {tag}", x, ref[nm], y, fl)
        chk_peer(f"bwd mma-vs-fp64/torch {nm} {tag}", x, ref[nm], tdt[nm], fl)
    if g_scale != 1.0:  # the same in fp32 (keep_acc): what the fp16 pre-scale keeps
        km = M.run(a, b, s, t, g, neg, False, True, chunk, True)
        for nm, x in zip(("ga", "gb"), km):
            chk(f"bwd[keep_acc] mma-vs-fp64 {nm} {tag}", x, ref[nm], tol_of(nm, mags[nm], dt))
    # ---- forward + backward (ones, fp32 gradients) ----
    om = M.run(a, b, s, t, None, neg, True, True, chunk, True)
    og = gemm("sigmoid_fwd_bwd", a, b, s, t, negative_only=neg, chunk_size=chunk)
    if OP_ROUTE:
        chk_route(f"fwd_bwd {tag}", E.sigmoid_fwd_bwd(a, b, s, t, negative_only=neg, chunk_size=chunk, impl=MMA_IMPL),
                  om[1:])
    chk_exact(f"fwd_bwd {tag}", torch.equal(om[0], fm[0]) and torch.equal(om[1], fm[1]),
              "losses differ from the forward's")
    ref, mags = reference(a, b, s_val, t_val, neg, None)
    tdt = torch_dtype(a, b, s_val, t_val, neg, None)
    chk(f"fwd_bwd mma-vs-gemm total {tag}", om[1], og[0], tol_of("loss", mags["loss"], dt).sum())
    for nm, x, y in zip(("ga", "gb", "gs", "gt"), om[2:], og[1:]):
        chk_exact(f"fwd_bwd {nm} {tag}", x.dtype == y.dtype and x.shape == y.shape,
                  f"dtype/shape {x.dtype} {tuple(x.shape)} vs gemm {y.dtype} {tuple(y.shape)}")
        tol = tol_of(nm, mags[nm], dt)
        chk(f"fwd_bwd mma-vs-fp64 {nm} {tag}", x, ref[nm], tol)
        chk(f"fwd_bwd mma-vs-gemm {nm} {tag}", x, y, tol)
        fl = floor_of(nm, mags[nm], dt)
        chk_peer(f"fwd_bwd mma-vs-fp64/gemm {nm} {tag}", x, ref[nm], y, fl)
        chk_peer(f"fwd_bwd mma-vs-fp64/torch {nm} {tag}", x, ref[nm], tdt[nm], fl)


def nan_case(dt, na, d, nb=None, neg=False, s_val=10.0, t_val=-5.0):
    """A non-finite scale or bias: every output NaN (mma and gemm path alike)."""
    nb = na if nb is None else nb
    a, b = inputs(dt, na, nb, d)
    s, t = torch.tensor(s_val), torch.tensor(t_val)
    g = torch.rand(na)
    tag = f"nan {str(dt)[6:]} na={na} nb={nb} d={d} s={s_val} t={t_val}"
    fm = M.run(a, b, s, t, None, neg, True, False, 0, False)
    bm = M.run(a, b, s, t, g, neg, False, True, 0, False)
    om = M.run(a, b, s, t, None, neg, True, True, 0, True)
    for nm, outs in (("fwd", fm), ("bwd", bm), ("fwd_bwd", om)):
        chk_exact(f"{tag} {nm}", all(torch.isnan(x).all() for x in outs), "an output is not all NaN")
    fg = gemm("sigmoid_fwd", a, b, s, t, negative_only=neg, chunk_size=0)
    bg = gemm("sigmoid_bwd", a, b, s, t, g, negative_only=neg, chunk_size=0)
    chk_exact(f"{tag} gemm", torch.isnan(fg).all() and all(torch.isnan(x).all() for x in bg),
              "the gemm path does not poison alike")
    if OP_ROUTE:
        chk_route(f"{tag} fwd", E.sigmoid_fwd(a, b, s, t, negative_only=neg, impl=MMA_IMPL), fm[:1])
        chk_route(f"{tag} bwd", E.sigmoid_bwd(a, b, s, t, g, negative_only=neg, impl=MMA_IMPL), bm)


torch.manual_seed(0)
t_start = time.time()
e0 = cl.emu_errors()
cl.emu_reset_counters()
n_cases = 0


def run_case(*args, **kw):
    global n_cases
    case(*args, **kw)
    n_cases += 1


if quick:
    for dt in (torch.bfloat16, torch.float16):
        run_case(dt, 5, 33)
        run_case(dt, 130, 40)
    run_case(torch.bfloat16, 67, 33, nb=130, neg=True)
    nan_case(torch.float16, 5, 33, s_val=float("inf"))
    n_cases += 1
else:
    # N in {1, 5, 67, 130, 257} x D in {7, 33, 40, 64}, both dtypes
    shapes = [(1, 7), (5, 33), (67, 40), (130, 64), (257, 7), (67, 7), (130, 33), (5, 64), (257, 40)]
    for dt in (torch.bfloat16, torch.float16):
        for n, d in shapes:
            run_case(dt, n, d)
        print(f"{dt}: {n_cases} cases, {time.time() - t_start:.0f}s", flush=True)
    for dt in (torch.bfloat16, torch.float16):  # negative_only, Na != Nb
        run_case(dt, 67, 33, nb=130, neg=True)
        run_case(dt, 130, 64, nb=5, neg=True)
        run_case(dt, 5, 40, nb=257, neg=True)
    run_case(torch.bfloat16, 130, 40, s_val=100.0, t_val=-10.0)           # large scale
    run_case(torch.float16, 67, 33, nb=130, neg=True, s_val=100.0, t_val=-10.0)
    run_case(torch.float16, 67, 40, s_val=10.0, t_val=-10.0, g_scale=1e-7)  # fp16 pre-scale
    run_case(torch.bfloat16, 257, 40, chunk=50)                           # ragged chunks
    run_case(torch.float16, 257, 64, chunk=128)
    run_case(torch.bfloat16, 67, 64, misaligned=True)                     # plain loads, d % 8 == 0
    run_case(torch.float16, 130, 40, misaligned=True, neg=True, nb=67)
    os.environ["EMU_SMS"] = "1"  # one column split: 3 column tiles through one pipeline
    run_case(torch.bfloat16, 257, 33)
    run_case(torch.float16, 130, 40, nb=300, neg=True)
    del os.environ["EMU_SMS"]
    print(f"special cases: {n_cases} cases, {time.time() - t_start:.0f}s", flush=True)
    for dt in (torch.bfloat16, torch.float16):
        nan_case(dt, 67, 40, s_val=float("inf"))
        nan_case(dt, 5, 33, s_val=float("nan"))
        nan_case(dt, 67, 33, nb=5, neg=True, t_val=float("-inf"))
        n_cases += 3
if OP_ROUTE:  # a preference falls back to gemm where mma cannot run (fp32), runs mma where it can
    a32 = torch.randn(9, 8)
    s, t = torch.tensor(10.0), torch.tensor(-5.0)
    chk_exact("op route fp32 impl=-3", torch.equal(E.sigmoid_fwd(a32, a32, s, t, impl=-MMA_IMPL),
                                                   E.sigmoid_fwd(a32, a32, s, t, impl=GEMM_IMPL)),
              "fp32 with impl=-3 is not the gemm path")
    a16 = a32.to(torch.bfloat16)
    chk_exact("op route bf16 impl=-3", torch.equal(E.sigmoid_fwd(a16, a16, s, t, impl=-MMA_IMPL),
                                                   M.run(a16, a16, s, t, None, False, True, False, 0, False)[0]),
              "bf16 with impl=-3 is not the mma path")
    # the emulator does not run wgmma: every sigmoid op refuses an exact request, a preference runs gemm
    g16 = torch.ones(9)
    for op, args in (("sigmoid_fwd", (a16, a16, s, t)), ("sigmoid_bwd", (a16, a16, s, t, g16)),
                     ("sigmoid_fwd_bwd", (a16, a16, s, t))):
        refused(f"op route bf16 {op} impl=4", "impl=4 (wgmma) cannot run these inputs",
                lambda f=getattr(E, op), x=args: f(*x, impl=4))
        pref, exact = getattr(E, op)(*args, impl=-4), getattr(E, op)(*args, impl=GEMM_IMPL)
        pref, exact = ([pref], [exact]) if isinstance(pref, torch.Tensor) else (pref, exact)
        chk_exact(f"op route bf16 {op} impl=-4", all(torch.equal(x, y) for x, y in zip(pref, exact)),
                  "impl=-4 is not the gemm path where wgmma cannot run")
print(f"op route (sigmoid ops with impl=3 vs siglip_mma::run): {'checked' if OP_ROUTE else 'not in this build'}")
finish("siglip mma", n_cases, t_start, cl, e0)
