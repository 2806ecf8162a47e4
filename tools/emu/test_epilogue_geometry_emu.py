"""The shared tensor-core epilogues at the Hopper wgmma geometry, on the CPU CUDA emulator
(shared/tools/cuda-emu). A development aid, not part of the pytest suite.

The wgmma kernels (csrc/infonce/infonce_wgmma_cuda.cu, csrc/siglip/siglip_wgmma_cuda.cu) run
mma_epi::InfoNCEFwd / InfoNCEGrad and siglip_epi::Epilogue at 128 x 128 CTA tiles of 8 x 1
warps with 1 x 16 m16n8 fragments each (256 threads); the emulator cannot run wgmma, so
tools/emu/epilogue_geometry_check.cu stands in for the mainloop (accumulators filled from a
precomputed fp32 dot matrix W, zero where the loads zero-fill) and calls the epilogues and the
projects' host-side partial merges at that geometry (geo 0) and at kernel 1's (geo 1: 4 x 2
warps of 2 x 8 fragments). Run:

    .venv/bin/python tools/emu/test_epilogue_geometry_emu.py            # builds, then runs
    .venv/bin/python tools/emu/test_epilogue_geometry_emu.py LIB.so     # a library built before
    .venv/bin/python tools/emu/test_epilogue_geometry_emu.py --plant NAME   # a planted bug: must fail
    .venv/bin/python tools/emu/test_epilogue_geometry_emu.py --threads      # OS-thread build
    # ASan + UBSan: build a tree as below by hand with build.sh ... -DEMU_FIBERS
    # -fsanitize=address,undefined, then run with the library path and
    # LD_PRELOAD=$(gcc -print-file-name=libasan.so) ASAN_OPTIONS=detect_leaks=0

The build copies HEAD's csrc (git archive) to a temporary tree, keeps only the headers (the
project's .cu files are not needed: about 40 s instead of minutes), adds the check as
csrc/epi_check/epilogue_geometry_check.cu and runs $EMU/build.sh ... -DEMU_FIBERS (EMU: the
emulator folder, default ../shared/tools/cuda-emu next to the repository; EMU_JOBS=1); with
--threads, without -DEMU_FIBERS (one OS thread per CUDA thread: slower, real interleavings).
--plant NAME applies one of PLANTS (a deliberate bug in the temporary tree's copy of an
epilogue header) before building; the checks must then fail.

Checks, per case, both geometries:
  * InfoNCE forward (symmetric, and rectangular nq != nk with an offset): loss, row and column
    LSEs against the fp64 formulas of semcomp_ext.reference.infonce_lse_reference on the fp32
    logits fl(s W) (lse_reference; checked against infonce_lse_reference where W has no NaN) (16-ulp tolerance of the row's logit range), geo 0 against geo 1 (the same
    tolerance: only summation orders differ), the two geometries' positive logits identical;
  * InfoNCE backward (coefficient form of infonce.h; bf16 and fp16 s*G, fp16 with the
    power-of-two pre-scale): s*G against sg G in fp64 (the dtype's rounding plus fp32 exp
    error), bit for bit between the geometries, row shares sum_j G_ij W_ij against fp64 and
    between the geometries;
  * SigLIP (siglip.h): row losses, s*G, d scale and d bias row shares against fp64, s*G bit for
    bit between geometries, the loss of the loss-only pass and the s*G / shares of the
    gradient-only pass bit for bit equal to the combined pass;
  * N in {1, 5, 67, 130, 257, 300}, ragged, one and several splits (several column tiles per
    CTA), one and several row passes / chunks, scale 100, NaN entries in W (NaN exactly where
    the reference has NaN), zero emulator errors.
Elements the epilogues should write are pre-filled with NaN, so a missed write fails. Exit
status 0 when every check passes. (emu_checks.finish is not used: it requires mma.sync tiles,
and these kernels run none; `summary` below prints the same line without that check.)
"""
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
from emu_checks import chk, chk_exact, counters, fails, n_checks, worst  # noqa: E402

EMU = pathlib.Path(os.environ.get("EMU", ROOT.parent / "shared" / "tools" / "cuda-emu"))
U = 2.0 ** -24  # fp32 unit roundoff

# Planted bugs (file in csrc, text, replacement): each must make the checks fail.
PLANTS = {
    # InfoNCEFwd::finish, SLOTS_N == 1 branch (only the wgmma geometry takes it): the h = 1 row
    # half writes the h = 0 half's sum
    "fwd_sn1_row_half": ("infonce/infonce_mma_epilogue.cuh",
                         "row_ps[r0 + f.row(mi, h)] = row[mi][h].s;", "row_ps[r0 + f.row(mi, h)] = row[mi][0].s;"),
    # InfoNCEFwd column merge over the SLOTS_M row slots drops the last slot
    "fwd_col_slot_dropped": ("infonce/infonce_mma_epilogue.cuh",
                             "for (int w = 1; w < SLOTS_M; ++w) st.merge(cm[w * BN + j], cs[w * BN + j]);",
                             "for (int w = 1; w + 1 < SLOTS_M; ++w) st.merge(cm[w * BN + j], cs[w * BN + j]);"),
    # InfoNCEGrad::finish writes the row share of row slot warp 7's rows to the wrong row
    "grad_ds_row_shift": ("infonce/infonce_mma_epilogue.cuh",
                          "ds_part[(r0 - i0) + rr] = v;", "ds_part[(r0 - i0) + (rr ^ (rr >= 112 ? 8 : 0))] = v;"),
    # siglip_epi::Epilogue::finish: the row shares of the last row slot's 16 rows are dropped
    "siglip_last_slot": ("siglip/siglip_mma_epilogue.cuh",
                         "if (i >= p.rows_end) continue;", "if (i >= p.rows_end || lr >= 112) continue;"),
}


def build(out: pathlib.Path, plant: str | None, fibers: bool) -> None:
    tree = pathlib.Path(tempfile.mkdtemp(prefix="epi_tree_"))
    try:
        subprocess.run(f"git -C {ROOT} archive HEAD csrc | tar -x -C {tree}", shell=True, check=True)
        for f in (tree / "csrc").rglob("*.cu"):
            f.unlink()  # only the headers are needed
        (tree / "csrc" / "epi_check").mkdir()
        shutil.copy(HERE / "epilogue_geometry_check.cu", tree / "csrc" / "epi_check")
        if plant:
            rel, old, new = PLANTS[plant]
            p = tree / "csrc" / rel
            text = p.read_text()
            if text.count(old) != 1:
                sys.exit(f"--plant {plant}: {old!r} occurs {text.count(old)} times in {rel}, not once")
            p.write_text(text.replace(old, new))
            print(f"planted {plant} in the temporary tree's {rel}")
        env = dict(os.environ, PY=sys.executable, EMU_JOBS=os.environ.get("EMU_JOBS", "1"))
        t = time.time()
        flags = ["-DEMU_FIBERS"] if fibers else []
        subprocess.run([str(EMU / "build.sh"), str(tree), str(out), *flags], check=True, env=env)
        print(f"build {time.time() - t:.0f}s")
    finally:
        shutil.rmtree(tree, ignore_errors=True)


args = [a for a in sys.argv[1:]]
plant = None
if "--plant" in args:
    i = args.index("--plant")
    plant = args[i + 1]
    del args[i:i + 2]
    if plant not in PLANTS:
        sys.exit(f"--plant: {plant!r} is not one of {sorted(PLANTS)}")
threads = "--threads" in args
if threads:
    args.remove("--threads")
if args:
    lib = pathlib.Path(args[0]).resolve()
else:
    lib = ROOT / "build" / ("emu_epi" + (f"_plant_{plant}" if plant else "") + ("_threads" if threads else "") + ".so")
    lib.parent.mkdir(exist_ok=True)
    build(lib, plant, not threads)

torch.ops.load_library(str(lib))
from semcomp_ext.reference import infonce_lse_reference  # noqa: E402  (checked against lse_reference)

E = torch.ops.semcomp_epi_check
cl = counters(str(lib))
e0 = cl.emu_errors()
t_start = time.time()
n_cases = [0]
DT = {True: torch.bfloat16, False: torch.float16}
EPS = {True: 2.0 ** -8, False: 2.0 ** -11}  # unit roundoff: the bound of one rounding to the dtype
TINY = {True: 2.0 ** -133, False: 2.0 ** -25}  # half the smallest subnormal


def n_ct(n):
    return (n + 127) // 128


def make_w(nq, nk, seed, offset=0, nan=()):
    g = torch.Generator().manual_seed(seed)
    W = (torch.rand(nq, nk, generator=g, dtype=torch.float64) * 2 - 1) * 0.6
    idx = torch.arange(nq)
    if nq + offset <= nk:
        W[idx, idx + offset] += 0.4
    W = W.float()
    for i, j in nan:
        W[i, j] = float("nan")
    return W.contiguous()


def bits_equal(a, b):
    return a.shape == b.shape and torch.equal(a.view(torch.int16), b.view(torch.int16))


# ---- InfoNCE ------------------------------------------------------------------------------------

def lse_reference(X, offset, sym):
    """semcomp_ext.reference.infonce_lse_reference's formulas on the fp64 logits X (the
    reference itself takes q and k; X @ I would spread a NaN entry over its whole row)."""
    r = torch.logsumexp(X, 1)
    idx = torch.arange(X.shape[0])
    diag = X[idx, idx + offset]
    if sym:
        c = torch.logsumexp(X, 0)
        return 0.5 * (r + c) - diag, r, c
    return r - diag, r


def infonce_case(nq, nk, scale, offset, sym, splits_list, pass_list, chunk_list, seed, nan=()):
    n_cases[0] += 1
    W = make_w(nq, nk, seed, offset, nan)
    X32 = W * torch.tensor(scale, dtype=torch.float32)  # fl(s w), as mul_rn
    X = X32.double()
    ref = lse_reference(X, offset, sym)
    if not nan:  # the same formulas as the project's reference
        pr = infonce_lse_reference(X32, torch.eye(nk, dtype=torch.float32), 1.0, offset, symmetric=sym)
        for a, b in zip(ref, pr):
            chk(f"lse_reference vs infonce_lse_reference nq={nq} nk={nk}", a, b, 1e-12 * (1 + b.abs()))
    ar = X.abs().nan_to_num(0).amax(1)
    tol_r = 16 * U * (1 + ar + ref[1].abs().nan_to_num(0))
    if sym:
        ac = X.abs().nan_to_num(0).amax(0)
        tol_c = 16 * U * (1 + ac + ref[2].abs().nan_to_num(0))
        tol_l = 0.5 * (tol_r + tol_c)
    else:
        tol_l = tol_r
    tag0 = f"nq={nq} nk={nk} s={scale} off={offset} {'sym' if sym else 'rect'}"
    first = None
    for splits in splits_list:
        for pb in pass_list:
            outs = {}
            for geo in (0, 1):
                o = E.infonce_fwd(W, scale, offset, sym, geo, pb, splits)
                tag = f"infonce fwd geo{geo} {tag0} splits={splits} pass={pb}"
                chk(f"{tag} loss", o[0], ref[0], tol_l)
                chk(f"{tag} rlse", o[1], ref[1], tol_r)
                if sym:
                    chk(f"{tag} clse", o[2], ref[2], tol_c)
                outs[geo] = o
            tag = f"infonce fwd geo0-vs-geo1 {tag0} splits={splits} pass={pb}"
            chk(f"{tag} rlse", outs[0][1], outs[1][1], tol_r)
            if sym:
                chk(f"{tag} clse", outs[0][2], outs[1][2], tol_c)
            chk(f"{tag} loss", outs[0][0], outs[1][0], tol_l)
            if first is None:
                first = outs[0]
            else:  # splits / passes change only merge orders
                chk(f"infonce fwd geo0 {tag0} splits={splits} pass={pb} vs first", outs[0][1], first[1], tol_r)
    # backward, from the reference's LSEs (fp32) and random coefficients
    g = torch.Generator().manual_seed(seed + 1)
    r = ref[1].float()
    c = ref[2].float() if sym else torch.zeros(0)
    rc = (torch.rand(nq, generator=g) + 0.5) / nq
    cc = (torch.rand(nk, generator=g) + 0.5) / nk if sym else torch.zeros(0)
    dc = (rc + (cc[:nq] if sym else 0)).float()
    rcd, ccd, dcd = rc.double(), cc.double(), dc.double()
    P = rcd[:, None] * torch.exp(X - r.double()[:, None])
    mag_e = (X.abs() + r.double().abs()[:, None])
    Pa = P.abs() * (8 + 2 * mag_e)
    if sym:
        Pc = ccd[None, :] * torch.exp(X - c.double()[None, :])
        P = P + Pc
        Pa = Pa + Pc.abs() * (8 + 2 * (X.abs() + c.double().abs()[None, :]))
    idx = torch.arange(nq)
    G = P.clone()
    G[idx, idx + offset] -= dcd
    Pa[idx, idx + offset] += dcd.abs() * 2
    ds_ref = (G * W.double()).sum(1)
    ds_tol = U * (64 + 2 * nk) * (Pa * W.double().abs()).nan_to_num(0).sum(1) + 1e-30
    for bf16 in (True, False):
        gscale = -1.0
        sg = torch.tensor(scale, dtype=torch.float32)
        if not bf16:  # fp16: the power-of-two pre-scale of pow2_prescale
            bound = scale * (rc.abs().max() + (cc.abs().max() if sym else 0) + dc.abs().max()).item()
            gscale = 2.0 ** min(max(math.floor(math.log2(16384.0 / bound)), -30), 60)
            sg = sg * torch.tensor(gscale, dtype=torch.float32)
        want = sg.double() * G
        tol = (EPS[bf16] * want.abs() + sg.double().abs() * Pa * U).nan_to_num(0) + TINY[bf16]
        for splits in splits_list:
            for ch in chunk_list:
                outs = {}
                for geo in (0, 1):
                    o = E.infonce_grad(W, scale, gscale, r, rc, dc, c, cc, offset, sym, bf16, geo, ch, splits)
                    tag = f"infonce grad geo{geo} {tag0} {'bf16' if bf16 else 'fp16'} splits={splits} chunk={ch}"
                    chk_exact(f"{tag} dtype", o[0].dtype == DT[bf16], f"s*G dtype {o[0].dtype}")
                    chk(f"{tag} sG", o[0], want, tol)
                    chk(f"{tag} ds", o[1], ds_ref, ds_tol)
                    outs[geo] = o
                tag = f"infonce grad geo0-vs-geo1 {tag0} {'bf16' if bf16 else 'fp16'} splits={splits} chunk={ch}"
                chk_exact(f"{tag} sG", bits_equal(outs[0][0], outs[1][0]), "s*G blocks differ")
                chk(f"{tag} ds", outs[0][1], outs[1][1], ds_tol)


# ---- SigLIP -------------------------------------------------------------------------------------

def siglip_case(na, nb, scale, bias, negative_only, splits_list, chunk_list, seed, nan=(), with_g=True):
    n_cases[0] += 1
    W = make_w(na, nb, seed, 0, nan)
    gen = torch.Generator().manual_seed(seed + 2)
    grows = (torch.rand(na, generator=gen) + 0.5) if with_g else None
    z32 = W * torch.tensor(scale, dtype=torch.float32) + torch.tensor(bias, dtype=torch.float32)
    z = z32.double()
    pos = torch.zeros(na, nb, dtype=torch.bool)
    if not negative_only:
        k = min(na, nb)
        pos[torch.arange(k), torch.arange(k)] = True
    yz = torch.where(pos, -z, z)
    terms = yz.clamp_min(0) + torch.log1p(torch.exp(-z.abs()))
    loss_ref = terms.sum(1)
    gd = grows.double() if with_g else torch.ones(na, dtype=torch.float64)
    G = gd[:, None] * (torch.sigmoid(z) - pos.double())
    ds_ref, dt_ref = (G * W.double()).sum(1), G.sum(1)
    zr = z.abs().nan_to_num(0).amax(1)
    red = U * (64 + 2 * nb) * (1 + zr)
    loss_tol = red * (terms.abs() + 1).nan_to_num(0).sum(1)
    ds_tol = red * (G.abs() * W.double().abs()).nan_to_num(0).sum(1) + 1e-30
    dt_tol = red * G.abs().nan_to_num(0).sum(1) + 1e-30
    tag0 = f"na={na} nb={nb} s={scale} t={bias} {'neg' if negative_only else 'pos'} {'g' if with_g else 'ones'}"
    for bf16 in (True, False):
        gscale = -1.0
        sg = torch.tensor(scale, dtype=torch.float32)
        if not bf16:
            bound = abs(scale) * (grows.abs().max().item() if with_g else 1.0)
            gscale = 2.0 ** min(max(math.floor(math.log2(16384.0 / bound)), -30), 60)
            sg = sg * torch.tensor(gscale, dtype=torch.float32)
        want = sg.double() * G
        tol = (EPS[bf16] * want.abs() + sg.double().abs() * gd[:, None] * U * (8 + 4 * z.abs())).nan_to_num(0) \
            + TINY[bf16]
        for splits in splits_list:
            for ch in chunk_list:
                outs = {}
                for geo in (0, 1):
                    o = E.siglip(W, scale, bias, grows, gscale, negative_only, True, True, bf16, geo, ch, splits)
                    dn = f"{'bf16' if bf16 else 'fp16'} splits={splits} chunk={ch}"
                    tag = f"siglip geo{geo} {tag0} {dn}"
                    rows, gb = o
                    chk(f"{tag} loss", rows[0], loss_ref, loss_tol)
                    chk(f"{tag} ds", rows[1], ds_ref, ds_tol)
                    chk(f"{tag} dt", rows[2], dt_ref, dt_tol)
                    chk(f"{tag} sG", gb, want, tol)
                    lo = E.siglip(W, scale, bias, grows, gscale, negative_only, True, False, bf16, geo, ch, splits)
                    chk_exact(f"{tag} loss-only", torch.equal(lo[0][0].nan_to_num(7.5), rows[0].nan_to_num(7.5)),
                              "loss-only pass differs from the combined pass")
                    go = E.siglip(W, scale, bias, grows, gscale, negative_only, False, True, bf16, geo, ch, splits)
                    chk_exact(f"{tag} grad-only", bits_equal(go[1], gb) and
                              torch.equal(go[0].nan_to_num(7.5), rows[1:].nan_to_num(7.5)),
                              "gradient-only pass differs from the combined pass")
                    outs[geo] = o
                tag = f"siglip geo0-vs-geo1 {tag0} {dn}"
                chk_exact(f"{tag} sG", bits_equal(outs[0][1], outs[1][1]), "s*G blocks differ")
                chk(f"{tag} loss", outs[0][0][0], outs[1][0][0], loss_tol)
                chk(f"{tag} ds", outs[0][0][1], outs[1][0][1], ds_tol)
                chk(f"{tag} dt", outs[0][0][2], outs[1][0][2], dt_tol)


def summary():
    errs = cl.emu_errors() - e0
    chk_exact("emulator", errs == 0, f"{errs} emulator errors")
    chk_exact("emulator", cl.emu_blocks() > 0, "no block ran")
    print(f"epilogue geometry: {n_cases[0]} cases, {n_checks()} checks, {len(fails)} failures, "
          f"{time.time() - t_start:.0f}s; launches {cl.emu_launches()}, blocks {cl.emu_blocks()}, emulator errors {errs}")
    print("worst err/tol per comparison:\n  " + "\n  ".join(f"{k}: {v:.2g}" for k, v in sorted(worst.items())))
    by = {}
    for f in fails:  # failures per comparison family (the tag's words before the first name=value)
        key = " ".join(w for w in f.split(":")[0].split() if "=" not in w)
        by[key] = by.get(key, 0) + 1
    if by:
        print("failures per comparison:\n  " + "\n  ".join(f"{k}: {v}" for k, v in sorted(by.items())))
    for f in fails[:40]:
        print("FAIL", f)
    sys.exit(1 if fails else 0)


for N in (1, 5, 67, 130, 257, 300):
    splits = sorted({1, n_ct(N)})
    passes = sorted({1, n_ct(N)})
    chunks = sorted({128, N}) if N > 128 else [N]
    infonce_case(N, N, 10.0, 0, True, splits, passes, chunks, seed=N)
    siglip_case(N, N, 10.0, -2.0, False, splits, chunks, seed=N)
# rectangular with offsets, several column tiles per split, scale 100
infonce_case(67, 300, 10.0, 100, False, [1, 2, 3], [1], [67], seed=11)
infonce_case(130, 257, 100.0, 127, False, [1, 3], [1], [128, 130], seed=12)
infonce_case(5, 260, 10.0, 255, False, [1, 2], [1], [5], seed=13)
infonce_case(300, 300, 100.0, 0, True, [1, 2], [1, 3], [128], seed=14)
infonce_case(257, 300, 10.0, 43, False, [2], [1], [256], seed=15)
# NaN entries in W
infonce_case(130, 130, 10.0, 0, True, [1, 2], [1], [128], seed=16, nan=[(3, 129), (128, 7)])
infonce_case(67, 300, 10.0, 3, False, [2], [1], [67], seed=17, nan=[(66, 200)])
siglip_case(67, 300, 10.0, -10.0, True, [1, 2, 3], [67], seed=21)
siglip_case(130, 257, 100.0, 2.0, True, [1, 3], [128, 130], seed=22, with_g=False)
siglip_case(300, 300, 100.0, -10.0, False, [1, 2], [128], seed=23)
siglip_case(130, 130, 10.0, -2.0, False, [2], [128], seed=24, nan=[(3, 129), (128, 7)])
summary()
