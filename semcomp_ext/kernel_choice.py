"""Which CUDA implementation computes the logits of InfoNCE and SigLIP for one call.

The fused CUDA ops have several implementations of the same math (results agree to fp32
rounding; the tests compare each with the others and with fp64):

    InfoNCE  gemm, tile, mma, wgmma     (semcomp_ext.infonce_loss, infonce_rect_loss)
    SigLIP   gemm, mma, wgmma           (semcomp_ext.sigmoid_loss)

"gemm" runs every input (any dtype); the others need CUDA bf16/fp16 inputs (mma: compute
capability >= 8.0; wgmma: 9.0 and a build with its sm_90a kernels). fp32/fp64 inputs always run
"gemm". A call picks one by its ``impl`` argument; for ``impl="auto"`` (and ``"fused"``) on
CUDA bf16/fp16 inputs the precedence is

    1. an implementation named per call (``impl="mma"``): exactly that one, a ValueError
       naming it and the reason when it cannot run the inputs;
    2. the process-wide ``semcomp_ext.set_infonce_cuda_impl(...)`` when it is not "auto"
       (InfoNCE only);
    3. the measured table ``semcomp_ext/data/cuda_impl_table.json``: device compute
       capability, dtype, and the (N, D) bucket of the call (N = sqrt(Na * Nb), the row count
       of a square problem; buckets are powers of two: round(log2 N), round(log2 D));
    4. "gemm" (a device, dtype or bucket the table has no measurement for).

Steps 2-4 are a preference: an implementation that cannot run the particular inputs (a build
without the wgmma kernels, rows not aligned for TMA) falls back to gemm, so "auto" never
raises for that reason. The forward's implementation is saved for the backward, which
recomputes the same logits with it.

The table is written by ``python -m benchmarks.impl_table RESULTS.json ...``
(:mod:`semcomp_ext.bench.impl_table`) from GPU timing results; each entry names the results
file and commit it came from.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

__all__ = ["choose_cuda_impl", "pick_impl", "load_table", "lookup", "table_path", "IMPLS", "IMPL_CODES", "shape_bucket"]

# Implementations per op family; the ops' impl argument takes the code (csrc/common/impl_choice.h).
IMPLS = {"infonce": ("gemm", "tile", "mma", "wgmma"), "sigmoid": ("gemm", "mma", "wgmma")}
IMPL_CODES = {"gemm": 1, "tile": 2, "mma": 3, "wgmma": 4}
LOWP = (torch.bfloat16, torch.float16)
FALLBACK = "gemm"
TABLE_FORMAT = 1

_PACKAGED_TABLE = Path(__file__).resolve().parent / "data" / "cuda_impl_table.json"
_TABLE_CACHE: dict = {}
_CAPABILITY: dict = {}


def table_path() -> Path:
    """The packaged table (SEMCOMP_CUDA_IMPL_TABLE overrides it, e.g. for a table generated
    from a new GPU run before it is committed)."""
    env = os.environ.get("SEMCOMP_CUDA_IMPL_TABLE")
    return Path(env) if env else _PACKAGED_TABLE


def load_table(path: str | os.PathLike | None = None) -> dict:
    """The table as a dict (cached per path and modification time); a missing file is an
    empty table (every choice "gemm")."""
    p = Path(path) if path is not None else table_path()
    if torch.compiler.is_compiling() and str(p) in _TABLE_CACHE:  # traced: no file system calls
        return _TABLE_CACHE[str(p)][1]
    try:
        mtime = p.stat().st_mtime_ns
    except FileNotFoundError:
        return {"format": TABLE_FORMAT, "ops": {}}
    key = str(p)
    hit = _TABLE_CACHE.get(key)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    with open(p) as f:
        table = json.load(f)
    if not isinstance(table, dict) or table.get("format") != TABLE_FORMAT or not isinstance(table.get("ops"), dict):
        raise ValueError(f"{p}: not a CUDA implementation table of format {TABLE_FORMAT} "
                         "(written by python -m benchmarks.impl_table)")
    _TABLE_CACHE[key] = (mtime, table)
    return table


def shape_bucket(x: float) -> int:
    """The power-of-two bucket of a size: round(log2 x) (x >= 1). Bucket k holds the sizes in
    [2^(k - 1/2), 2^(k + 1/2))."""
    return int(math.floor(math.log2(max(float(x), 1.0)) + 0.5))


def lookup(table: dict, op: str, capability: str, dtype: str, n: float, d: int) -> tuple[str, dict | None]:
    """(implementation, table entry) for an op family, a capability ("9.0"), a dtype name
    ("bfloat16") and a problem of N rows (sqrt(Na * Nb)) and D features: the entry of the
    (N, D) bucket, or ("gemm", None) where the table has none."""
    entries = table.get("ops", {}).get(op, {}).get(capability, {}).get(dtype, [])
    nb, db = shape_bucket(n), shape_bucket(d)
    for e in entries:
        if e["n_bucket"] == nb and e["d_bucket"] == db:
            return e["impl"], e
    return FALLBACK, None


def _capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = _CAPABILITY.get(index)
    if cap is None:
        cap = _CAPABILITY[index] = tuple(torch.cuda.get_device_capability(index))
    return cap


def can_run(op: str, impl: str, capability: tuple[int, int], dtype: torch.dtype) -> bool:
    """Whether impl can run an op family's inputs of this dtype on a device of this compute
    capability, as far as that decides it (the kernels also check the build and, for wgmma, the
    rows' alignment; where those fail a preference falls back to gemm)."""
    if impl == "gemm":
        return True
    if impl not in IMPLS[op] or dtype not in LOWP:
        return False
    if impl == "mma":
        return capability >= (8, 0)
    if impl == "wgmma":  # both op families: the same Hopper mainloop (csrc/common/wgmma_mainloop.cuh)
        return capability == (9, 0)
    return True  # tile: any device the CUDA kernels were built for


def effective_dtype(op: str, x: torch.Tensor) -> torch.dtype:
    """The dtype the kernel sees: under torch.autocast for x's device the InfoNCE ops cast
    fp32/bf16/fp16 embeddings to the autocast dtype (csrc/infonce/infonce_autocast.cpp); the
    sigmoid ops have no autocast kernel."""
    dev = x.device.type
    if op == "infonce" and x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _check_op(fn: str, op: str) -> None:
    if op not in IMPLS:
        raise ValueError(f"{fn}: op must be one of {tuple(IMPLS)}, got {op!r}")


def choose_cuda_impl(op: str, a: torch.Tensor, b: torch.Tensor | None = None, *, table=None) -> str:
    """The implementation "auto" picks for an InfoNCE (``op="infonce"``) or SigLIP
    (``op="sigmoid"``) call on CUDA tensors a (Na, D) and b (Nb, D) (b=None: Nb = Na): the
    process-wide setting when it is not "auto" (InfoNCE), else the measured table, else "gemm";
    "gemm" for fp32/fp64 inputs and wherever the pick cannot run on this device (see the module
    docstring). table: a table dict or path instead of the packaged one."""
    fn = "choose_cuda_impl"
    _check_op(fn, op)
    if not torch.is_tensor(a) or (b is not None and not torch.is_tensor(b)):
        raise TypeError(f"{fn}: a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.device.type != "cuda":
        raise ValueError(f"{fn}: a is on {a.device}; the CUDA implementations apply to CUDA tensors")
    if a.dim() != 2 or (b is not None and b.dim() != 2):
        raise ValueError(f"{fn}: a and b must be 2-D (N, D)")
    dtype = effective_dtype(op, a)
    if dtype not in LOWP:
        return FALLBACK
    setting = "auto"
    if op == "infonce":
        from . import _ops

        setting = _ops._SETTING[0] if torch.compiler.is_compiling() else _ops.get_infonce_cuda_impl()
    na = a.shape[0]
    nb = b.shape[0] if b is not None else na
    return pick_impl(op, setting=setting, capability=_capability(a.device), dtype=dtype, rows=(na, nb),
                     d=a.shape[1], table=table)


def pick_impl(op: str, *, setting: str, capability: tuple[int, int], dtype: torch.dtype, rows: tuple[int, int],
              d: int, table=None) -> str:
    """choose_cuda_impl's rule without a device: the process-wide setting unless "auto", else
    the table's entry for (capability, dtype, N = sqrt(Na * Nb), D), else gemm; gemm for
    fp32/fp64 and for a pick that cannot run at this capability and dtype."""
    _check_op("pick_impl", op)
    if dtype not in LOWP:
        return FALLBACK
    pick = setting
    if pick == "auto":
        t = table if isinstance(table, dict) else load_table(table)
        pick, _ = lookup(t, op, f"{capability[0]}.{capability[1]}", str(dtype).replace("torch.", ""),
                         math.sqrt(max(rows[0], 1) * max(rows[1], 1)), d)
    return pick if can_run(op, pick, tuple(capability), dtype) else FALLBACK


# ---- the functional API's impl argument ----------------------------------------------------

CHOICES = {
    "infonce": ("auto", "fused", "reference") + IMPLS["infonce"],
    "sigmoid": ("auto", "fused", "reference") + IMPLS["sigmoid"],
}


def check_impl_choice(fn: str, op: str, impl) -> None:
    if not isinstance(impl, str) or impl not in CHOICES[op]:
        raise ValueError(f"{fn}: impl must be one of {CHOICES[op]}, got {impl!r}")


def call_impl_code(fn: str, op: str, impl: str, a: torch.Tensor, b: torch.Tensor) -> int:
    """The ops' impl code for a fused call (impl already checked, not "reference"):
    "auto"/"fused": 0 off CUDA, else minus the code of choose_cuda_impl (a preference);
    a named implementation: its code, after a ValueError where the inputs cannot run it at all
    (not CUDA, not bf16/fp16 for the tensor-core ones, a device below its compute capability).
    The kernels check the rest (the build, alignment) and raise for a named one."""
    if impl in ("auto", "fused"):
        if a.device.type != "cuda":
            return 0
        return -IMPL_CODES[choose_cuda_impl(op, a, b)]
    dtype = effective_dtype(op, a)
    if impl == "gemm":
        if a.device.type != "cuda":
            raise ValueError(f"{fn}: impl='gemm' needs CUDA inputs, got device {a.device} "
                             "(the CPU kernels have one implementation: impl='auto' or 'fused')")
        return IMPL_CODES[impl]
    if a.device.type != "cuda" or dtype not in LOWP:
        raise ValueError(f"{fn}: impl={impl!r} needs CUDA bfloat16/float16 inputs, got device {a.device} / "
                         f"dtype {str(dtype).replace('torch.', '')}")
    if not torch.compiler.is_compiling():
        cap = _capability(a.device)
        if not can_run(op, impl, cap, dtype):
            raise ValueError(f"{fn}: impl={impl!r} cannot run on {a.device} (compute capability "
                             f"{cap[0]}.{cap[1]}): it needs " + ("8.0 or newer" if impl == "mma" else "9.0"))
    return IMPL_CODES[impl]
