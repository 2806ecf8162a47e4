"""User-facing functions: validation with clear errors, then the fused ops.

Shapes: N rows (pairs / items), D features, M modalities, G groups, K kept features.
Every function raises ``ValueError`` (or ``TypeError``) naming the argument and the value for
bad input, and so do the native ops behind them (``torch.ops.semcomp.*``: wrong shapes, dtypes,
devices, out-of-range ids or indices, a non-positive logit scale). ``TypeError`` means an
argument of the wrong kind (a string where a number or tensor belongs); ``ValueError`` a tensor
or number with a bad shape, dtype, device or value. Non-finite embeddings (NaN/Inf) are not an
error: they propagate to NaN outputs.

Embeddings of different floating dtypes are promoted to one dtype before the kernels run:
under ``torch.autocast`` for their device to the autocast dtype (as autocast does for a matmul;
fp64 stays fp64), otherwise to ``torch.promote_types`` of the two (bf16 with fp32 -> fp32).
Gradients return to each input in its own dtype.

This module does not import :mod:`semcomp_ext.distributed` (which builds on it); the
distributed forms are chosen by the loss modules (:mod:`semcomp_ext.losses`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch

from . import reference
from ._ops import has_kernel, ops

__all__ = [
    "infonce_loss",
    "infonce_rect_loss",
    "multimodal_infonce_loss",
    "centroids",
    "pair_centroids",
    "select_features",
]

_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DEFAULT_TEMPERATURE = 0.07
_REDUCTIONS = ("mean", "sum", "none")


# ---- validation helpers -------------------------------------------------------------------


def _check_matrix(fn: str, name: str, x) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOATS:
        raise ValueError(f"{fn}: {name} must be float32, float64, bfloat16 or float16, got {x.dtype}")


def _check_pair(fn: str, a, b, names=("a", "b"), same_rows: bool = True) -> None:
    _check_matrix(fn, names[0], a)
    _check_matrix(fn, names[1], b)
    if a.device != b.device:
        raise ValueError(f"{fn}: {names[0]} and {names[1]} must be on the same device, got {a.device} and {b.device}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{fn}: {names[0]} and {names[1]} must have the same feature dimension D, got {a.shape[1]} and {b.shape[1]}"
        )
    if same_rows and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{fn}: {names[0]} and {names[1]} must have the same number of rows N "
            f"(row i of {names[0]} pairs with row i of {names[1]}), got {a.shape[0]} and {b.shape[0]}"
        )
    if a.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch: {names[0]} has 0 rows")


def _is_tracing() -> bool:
    return torch.compiler.is_compiling()


def _promote(fn: str, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Embeddings cast to one floating dtype (see the module docstring); unchanged when they
    already share one. The casts are differentiable."""
    xs = list(xs)
    if len({x.dtype for x in xs}) <= 1:
        return xs
    dev = xs[0].device.type
    if torch.is_autocast_enabled(dev):
        low = torch.get_autocast_dtype(dev)
        xs = [x if x.dtype == torch.float64 else x.to(low) for x in xs]  # autocast's rule
    target = xs[0].dtype
    for x in xs[1:]:
        target = torch.promote_types(target, x.dtype)
    return [x.to(target) for x in xs]


def _number(fn: str, name: str, value) -> float:
    """A Python/NumPy real number as a float; TypeError for anything else (a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{fn}: {name} must be a number or a one-element tensor, got {type(value).__name__} {value!r}"
        )
    return float(value)


def _check_one_element(fn: str, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """A scalar parameter given as a tensor: one element, floating, on like's device."""
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{fn}: {name} must be a one-element tensor of shape [] or [1], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating tensor, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{fn}: {name} must be on {like.device} (where the embeddings are), got {t.device}")


def _check_scale_tensor(fn: str, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """A temperature or logit-scale tensor: one element, floating, on like's device, and (where
    reading it costs no device sync: on the CPU, outside tracing) finite and > 0. On CUDA a bad
    value is not checked here; the kernels turn the loss and gradients into NaN instead."""
    _check_one_element(fn, name, t, like)
    if t.device.type == "cpu" and not _is_tracing():
        v = float(t.detach().reshape(()))
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{fn}: {name} must be finite and > 0, got {v}")


def _resolve_scale(fn: str, temperature, logit_scale, like: torch.Tensor) -> torch.Tensor:
    """The logit scale s = 1/temperature as a one-element tensor on like's device.

    A tensor temperature gives s = 1/temperature computed by autograd, so a learnable
    temperature receives its gradient (dL/dt = -dL/ds / t^2); a tensor logit_scale is used as
    it is. Numbers become constant tensors."""
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    if logit_scale is None:
        if temperature is None:
            raise ValueError(f"{fn}: give temperature or logit_scale")
        if torch.is_tensor(temperature):
            _check_scale_tensor(fn, "temperature", temperature, like)
            t = temperature if temperature.dtype in (torch.float32, torch.float64) else temperature.float()
            return 1.0 / t
        t = _number(fn, "temperature", temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"{fn}: temperature must be finite and > 0, got {temperature}")
        return torch.full((), 1.0 / t, dtype=acc, device=like.device)  # no pageable copy
    if temperature is not None and not torch.is_tensor(temperature):
        _number(fn, "temperature", temperature)
    if temperature is not None and (torch.is_tensor(temperature) or temperature != _DEFAULT_TEMPERATURE):
        raise ValueError(f"{fn}: give temperature or logit_scale, not both (got temperature={temperature})")
    if not torch.is_tensor(logit_scale):
        s = _number(fn, "logit_scale", logit_scale)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"{fn}: logit_scale must be finite and > 0, got {logit_scale}")
        return torch.full((), s, dtype=acc, device=like.device)
    _check_scale_tensor(fn, "logit_scale", logit_scale, like)
    return logit_scale


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def _check_reduction(fn: str, reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _use_fused(fn: str, op: str, impl: str, device: torch.device) -> bool:
    if impl not in ("auto", "fused", "reference"):
        raise ValueError(f"{fn}: impl must be 'auto', 'fused' or 'reference', got {impl!r}")
    if impl == "reference":
        return False
    if _is_tracing() or has_kernel(op, device):
        return True
    if impl == "fused":
        raise ValueError(f"{fn}: impl='fused' but semcomp_ext has no {device.type} kernel for {op} (build_info(): cuda?)")
    warnings.warn(f"{fn}: no native {device.type} kernel; using the pure-PyTorch reference (O(N^2) memory)", stacklevel=3)
    return False


def _attach_bias(loss: torch.Tensor, fn: str, logit_bias) -> torch.Tensor:
    """logit_bias shifts every logit equally: loss and gradients are unchanged. It still joins
    the graph (with an exact zero gradient) so optimisers that expect .grad find one."""
    if logit_bias is None:
        return loss
    if not torch.is_tensor(logit_bias):
        _number(fn, "logit_bias", logit_bias)
        return loss
    if logit_bias.numel() != 1:
        raise ValueError(f"{fn}: logit_bias must be a scalar, got shape {tuple(logit_bias.shape)}")
    if logit_bias.requires_grad:
        return loss + 0.0 * logit_bias.reshape(()).to(loss.dtype)
    return loss


# ---- InfoNCE -----------------------------------------------------------------------------


def infonce_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float | torch.Tensor | None = _DEFAULT_TEMPERATURE,
    *,
    logit_scale=None,
    logit_bias=None,
    reduction: str = "mean",
    symmetric: bool = True,
    chunk_size: int = 0,
    impl: str = "auto",
) -> torch.Tensor:
    """Temperature-scaled InfoNCE (CLIP loss) of paired rows a[i] <-> b[i], never building N x N.

    Args:
        a, b: (N, D) embeddings on one device (fp32/fp64/bf16/fp16). Different dtypes are
            promoted to one (autocast's dtype under torch.autocast, else torch.promote_types).
            Not normalised here: pass L2-normalised features as CLIP does.
        temperature: tau > 0, a number or a one-element tensor (learnable: a tensor that
            requires grad receives dL/dtau); the logits are <a_i, b_j> / tau. A string or any
            other non-number is a TypeError.
        logit_scale: s = 1/tau as a tensor of shape [] or [1] (learnable; receives a gradient),
            or a float. Give temperature or logit_scale, not both.
        logit_bias: accepted for open_clip compatibility; a constant shift of every logit changes
            neither the loss nor any gradient.
        reduction: "mean" (scalar), "sum" (scalar) or "none" (per-pair loss, shape (N,)).
        symmetric: True = (a->b + b->a)/2; False = a->b only.
        chunk_size: rows per workspace block (0 = automatic); memory is O(chunk_size * N).
        impl: "auto" (fused kernel, reference where the device has none), "fused", "reference".

    Returns: the loss in fp32 (fp64 for fp64 inputs), whatever the input precision.
    """
    fn = "infonce_loss"
    _check_pair(fn, a, b)
    _check_reduction(fn, reduction)
    a, b = _promote(fn, (a, b))
    s = _resolve_scale(fn, temperature, logit_scale, a)
    op = "infonce_fwd" if symmetric else "infonce_rect_fwd"
    if _use_fused(fn, op, impl, a.device):
        if symmetric:
            rows = ops.infonce_fwd(a, b, s, chunk_size)[0]
        else:
            rows = ops.infonce_rect_fwd(a, b, s, 0, chunk_size)[0]
    else:
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        rows = reference.infonce_reference(a.to(acc), b.to(acc), s, "none", symmetric)
    return _attach_bias(_reduce(rows, reduction), fn, logit_bias)


def infonce_rect_loss(q, k, logit_scale, *, offset: int = 0, reduction: str = "none", chunk_size: int = 0):
    """One-directional InfoNCE of q (Nq, D) against k (Nk, D) with positives at k[i + offset]:
    loss_i = logsumexp_j(s <q_i, k_j>) - s <q_i, k_{i+offset}>. The building block of the
    distributed local loss. logit_scale: tensor of shape [] or [1] (or a float). Mixed dtypes
    are promoted as in :func:`infonce_loss`."""
    fn = "infonce_rect_loss"
    _check_pair(fn, q, k, ("q", "k"), same_rows=False)
    _check_reduction(fn, reduction)
    if not (0 <= offset and offset + q.shape[0] <= k.shape[0]):
        raise ValueError(
            f"{fn}: offset must satisfy 0 <= offset and offset + Nq <= Nk, got offset={offset}, Nq={q.shape[0]}, Nk={k.shape[0]}"
        )
    q, k = _promote(fn, (q, k))
    s = _resolve_scale(fn, None, logit_scale, q)
    return _reduce(ops.infonce_rect_fwd(q, k, s, offset, chunk_size)[0], reduction)


def _modality_pairs(fn: str, m: int, pairs: str, anchor: int) -> list[tuple[int, int]]:
    if pairs == "all":
        return [(i, j) for i in range(m) for j in range(i + 1, m)]
    if pairs == "anchor":
        if not 0 <= anchor < m:
            raise ValueError(f"{fn}: anchor must be in [0, {m}), got {anchor}")
        return [(anchor, j) for j in range(m) if j != anchor]
    raise ValueError(f"{fn}: pairs must be 'all' or 'anchor', got {pairs!r}")


def multimodal_infonce_loss(
    zs: Sequence[torch.Tensor],
    temperature: float | torch.Tensor | None = _DEFAULT_TEMPERATURE,
    *,
    pairs: str = "all",
    anchor: int = 0,
    logit_scale=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean of the symmetric InfoNCE over modality pairs of M >= 2 row-aligned (N, D) tensors:
    all M(M-1)/2 pairs (pairs="all") or the M-1 pairs (anchor, m) (pairs="anchor"). Each pair
    runs on the fused kernels. temperature / logit_scale as in :func:`infonce_loss` (a tensor
    temperature receives its gradient); mixed dtypes are promoted to one.

    This is the single-process form; ``semcomp_ext.multimodal_infonce_loss`` (from
    :mod:`semcomp_ext.losses`) adds ``distributed=True`` over a torch.distributed group.
    """
    fn = "multimodal_infonce_loss"
    zs = _check_modalities(fn, zs)
    idx = _modality_pairs(fn, len(zs), pairs, anchor)
    for i, z in enumerate(zs):
        _check_pair(fn, zs[0], z, ("zs[0]", f"zs[{i}]"))
    _resolve_scale(fn, temperature, logit_scale, zs[0])  # validate once, before any pair runs
    zs = _promote(fn, zs)
    losses = [
        infonce_loss(zs[i], zs[j], temperature, logit_scale=logit_scale, reduction=reduction) for i, j in idx
    ]
    return torch.stack(losses).mean(0)


def _check_modalities(fn: str, zs) -> list:
    if isinstance(zs, torch.Tensor) or not isinstance(zs, Sequence) or len(zs) < 2:
        raise ValueError(f"{fn}: zs must be a sequence of at least 2 tensors (one per modality)")
    return list(zs)


# ---- centroids and feature selection -----------------------------------------------------


def _check_index(fn: str, name: str, idx, device) -> torch.Tensor:
    if hasattr(idx, "index") and not torch.is_tensor(idx):  # a RandomFeatureSelector
        idx = idx.index
    if not torch.is_tensor(idx):
        idx = torch.as_tensor(idx)
    if idx.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: {name} must be int64 or int32, got {idx.dtype}")
    return idx.to(device)


def _normalize_mode(fn: str, normalize) -> tuple[bool, bool]:
    modes = {False: (False, False), None: (False, False), True: (True, False), "input": (True, False),
             "output": (False, True), "both": (True, True)}
    if normalize not in modes:
        raise ValueError(f"{fn}: normalize must be False, True, 'input', 'output' or 'both', got {normalize!r}")
    return modes[normalize]


def centroids(
    x: torch.Tensor,
    ids: torch.Tensor,
    num_groups: int,
    *,
    return_counts: bool = False,
    features=None,
    normalize=False,
):
    """Segment mean: row g of the (G, K) result is the mean of the rows of x (N, D) whose id is g.

    ids: (N,) int64/int32 in [0, num_groups), sorted or not (sorted ids take the CSR path with
    no permutation). Empty groups give zero rows. features: optional (K,) column index (or a
    RandomFeatureSelector): only those columns are read and written (fused RFS); default all D.
    normalize: L2-normalise the input rows ("input"/True), the centroids ("output") or "both".
    Accumulates in fp32 (fp64 for fp64). Returns means, or (means, counts) with return_counts.
    """
    fn = "centroids"
    _check_matrix(fn, "x", x)
    ids = _check_index(fn, "ids", ids, x.device)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: ids must have one entry per row of x ({x.shape[0]}), got {ids.shape[0]}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) and not isinstance(num_groups, torch.SymInt):
        raise TypeError(f"{fn}: num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0:
        raise ValueError(f"{fn}: num_groups must be >= 1, got {num_groups}")
    if features is not None:
        features = _check_index(fn, "features", features, x.device)
    norm_in, norm_out = _normalize_mode(fn, normalize)
    if norm_in:
        x = torch.nn.functional.normalize(x, dim=1)
    means, counts = ops.segment_mean(x, ids, num_groups, features)
    if norm_out:
        means = torch.nn.functional.normalize(means, dim=1)
    return (means, counts) if return_counts else means


def pair_centroids(zs: Sequence[torch.Tensor], *, normalize=False, features=None) -> torch.Tensor:
    """Row-aligned mean over M modalities: out[i] = mean_m zs[m][i] (the paper's centroid of a
    concept seen once per modality). zs: M tensors (N, D). normalize as in centroids();
    features: optional column index applied to the result (fused with the mean's read)."""
    fn = "pair_centroids"
    if isinstance(zs, torch.Tensor) or len(zs) < 1:
        raise ValueError(f"{fn}: zs must be a non-empty sequence of (N, D) tensors")
    for i, z in enumerate(zs):
        _check_matrix(fn, f"zs[{i}]", z)
        if z.shape != zs[0].shape or z.dtype != zs[0].dtype or z.device != zs[0].device:
            raise ValueError(
                f"{fn}: zs[{i}] must match zs[0] in shape, dtype and device, got {tuple(z.shape)} {z.dtype} "
                f"{z.device} vs {tuple(zs[0].shape)} {zs[0].dtype} {zs[0].device}"
            )
    norm_in, norm_out = _normalize_mode(fn, normalize)
    acc = torch.float64 if zs[0].dtype == torch.float64 else torch.float32
    total = None
    for z in zs:
        z = select_features(z, features) if features is not None else z
        z = z.to(acc)
        if norm_in:
            z = torch.nn.functional.normalize(z, dim=1)
        total = z if total is None else total + z
    out = total / len(zs)
    if norm_out:
        out = torch.nn.functional.normalize(out, dim=1)
    return out.to(zs[0].dtype)


def select_features(x: torch.Tensor, index) -> torch.Tensor:
    """Column gather x[:, index] (N, K) with a native kernel; index (K,) int64/int32 in [0, D)
    or a RandomFeatureSelector. Backward scatters into zeros."""
    fn = "select_features"
    _check_matrix(fn, "x", x)
    index = _check_index(fn, "index", index, x.device)
    return ops.gather_columns(x, index)
