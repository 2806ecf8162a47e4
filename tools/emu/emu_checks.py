"""Check bookkeeping shared by the emulator drivers in tools/emu/ (test_*_emu.py): element-wise
and dtype-criterion comparisons, exact conditions and expected refusals, recorded in one list
of failures and one table of the worst error/tolerance ratio per comparison; `finish` adds the
emulator's own counters (errors, tensor-core tiles) and exits 0 only when every check passed.
"""
from __future__ import annotations

import ctypes
import sys
import time

import torch

fails: list[str] = []
worst: dict[str, float] = {}
_checks = [0]


def n_checks() -> int:
    return _checks[0]


def _count() -> None:
    _checks[0] += 1


def counters(lib: str):
    """The emulator library's ctypes counters (emu_errors, emu_launches, emu_blocks, emu_mma_tiles)."""
    cl = ctypes.CDLL(lib)
    for fn in (cl.emu_errors, cl.emu_launches, cl.emu_blocks, cl.emu_mma_tiles):
        fn.restype = ctypes.c_longlong
    return cl


def note(tag: str, ratio: float) -> None:
    """Keep the worst ratio per comparison (the tag without its name=value words)."""
    key = " ".join(w for w in tag.split() if "=" not in w)
    worst[key] = max(worst.get(key, 0.0), ratio)


def chk(tag, got, want, tol) -> None:
    """|got - want| <= tol element-wise (tol: tensor or number); NaN must match NaN."""
    _count()
    got, want = got.double(), want.double()
    if got.shape != want.shape:
        fails.append(f"{tag}: shapes {tuple(got.shape)} {tuple(want.shape)}")
        return
    both_nan = torch.isnan(got) & torch.isnan(want)
    err = torch.where(both_nan, torch.zeros_like(got), (got - want).abs())
    err = torch.nan_to_num(err, nan=float("inf"))
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(err)
    if got.numel():
        note(tag, (err / tol.clamp_min(1e-300)).max().item())
    bad = err > tol
    if bad.any():
        i = int(torch.argmax((err - tol).flatten()))
        fails.append(f"{tag}: {int(bad.sum())} of {bad.numel()} off, worst err {err.flatten()[i].item():.3e} "
                     f"tol {tol.flatten()[i].item():.3e} (got {got.flatten()[i].item():.6g}, "
                     f"want {want.flatten()[i].item():.6g})")


def chk_within(tag, got, ref, peer, floor, peer_name="peer") -> None:
    """max|got - ref| <= 2 max|peer - ref| + floor: the dtype criterion (peer: plain PyTorch in
    the same dtype, or another implementation)."""
    _count()
    e = (got.double() - ref).abs().max().item()
    ep = (peer.double() - ref).abs().max().item()
    note(tag, e / (2 * ep + floor))
    if not e <= 2 * ep + floor:
        fails.append(f"{tag}: error {e:.3e} > 2 x {peer_name}'s {ep:.3e} + {floor:.1e}")


def chk_exact(tag, cond, what) -> None:
    _count()
    if not cond:
        fails.append(f"{tag}: {what}")


def refused(tag, pattern, f, *args) -> None:
    """f(*args) raises a ValueError whose message contains pattern."""
    _count()
    try:
        f(*args)
    except ValueError as exc:
        if pattern not in str(exc):
            fails.append(f"{tag}: message {str(exc)!r} lacks {pattern!r}")
        return
    fails.append(f"{tag}: no ValueError")


def finish(name: str, n_cases: int, t0: float, cl, e0: int, tiles_what: str = "no mma.sync tile ran") -> None:
    """The emulator checks (no emulator error since e0; some tensor-core tile ran), the summary
    line, the worst ratios and the failures; exits 1 on any failure."""
    errs = cl.emu_errors() - e0
    chk_exact("emulator", errs == 0, f"{errs} emulator errors")
    mma = cl.emu_mma_tiles()
    chk_exact("emulator", mma > 0, tiles_what)
    print(f"{name}: {n_cases} cases, {n_checks()} checks, {len(fails)} failures, {time.time() - t0:.0f}s; "
          f"launches {cl.emu_launches()}, blocks {cl.emu_blocks()}, m16n8k16 tiles {mma}, emulator errors {errs}")
    print("worst err/tol per comparison:\n  " + "\n  ".join(f"{k}: {v:.2g}" for k, v in sorted(worst.items())))
    for f in fails[:40]:
        print("FAIL", f)
    sys.exit(1 if fails else 0)
