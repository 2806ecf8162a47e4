"""User-facing functions: validation with clear errors (:mod:`.validation`), then the fused ops
(:mod:`._ops`).

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

This module is single-process: the distributed forms (and the multimodal loss, which has one)
are in :mod:`semcomp_ext.losses`, over :mod:`semcomp_ext.distributed`, which builds on this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import reference
from ._ops import has_kernel, ops
from .kernel_choice import call_impl_code, check_impl_choice
from .validation import (
    DEFAULT_TEMPERATURE,
    attach_bias,
    check_index,
    check_matrix,
    check_pair,
    check_reduction,
    is_tracing,
    normalize_mode,
    promote,
    reduce,
    resolve_scale,
    scalar_param,
    use_fused,
)

__all__ = [
    "infonce_loss",
    "infonce_rect_loss",
    "sigmoid_loss",
    "centroids",
    "pair_centroids",
    "select_features",
]

SIGMOID_BACKWARDS = ("auto", "recompute", "onepass")


# ---- InfoNCE -----------------------------------------------------------------------------


def infonce_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    temperature: float | torch.Tensor | None = DEFAULT_TEMPERATURE,
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
        impl: "auto" (fused kernel, reference where the device has none), "fused" (the fused
            kernel or a ValueError), "reference" (pure PyTorch, O(N^2) memory), or one CUDA
            implementation of the fused kernel: "gemm", "tile", "mma", "wgmma" (a ValueError
            naming it and why when it cannot run the inputs). "auto" and "fused" on CUDA
            bf16/fp16 inputs take the process-wide set_infonce_cuda_impl() setting unless it
            is "auto", else the measured table (semcomp_ext.choose_cuda_impl).

    Returns: the loss in fp32 (fp64 for fp64 inputs), whatever the input precision.
    """
    fn = "infonce_loss"
    check_impl_choice(fn, "infonce", impl)
    check_pair(fn, a, b)
    check_reduction(fn, reduction)
    a, b = promote(fn, (a, b))
    s = resolve_scale(fn, temperature, logit_scale, a)
    op = "infonce_fwd" if symmetric else "infonce_rect_fwd"
    if _use_fused(fn, op, impl, a.device):
        code = call_impl_code(fn, "infonce", impl, a, b)
        if symmetric:
            rows = ops.infonce_fwd(a, b, s, chunk_size, code)[0]
        else:
            rows = ops.infonce_rect_fwd(a, b, s, 0, chunk_size, code)[0]
    else:
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        rows = reference.infonce_reference(a.to(acc), b.to(acc), s, "none", symmetric)
    return attach_bias(reduce(rows, reduction), fn, logit_bias)


def infonce_rect_loss(q, k, logit_scale, *, offset: int = 0, reduction: str = "none", chunk_size: int = 0,
                      impl: str = "auto"):
    """One-directional InfoNCE of q (Nq, D) against k (Nk, D) with positives at k[i + offset]:
    loss_i = logsumexp_j(s <q_i, k_j>) - s <q_i, k_{i+offset}>. The building block of the
    distributed local loss. logit_scale: tensor of shape [] or [1] (or a float). Mixed dtypes
    are promoted as in :func:`infonce_loss`; impl as there."""
    fn = "infonce_rect_loss"
    check_impl_choice(fn, "infonce", impl)
    check_pair(fn, q, k, ("q", "k"), same_rows=False)
    check_reduction(fn, reduction)
    if not (0 <= offset and offset + q.shape[0] <= k.shape[0]):
        raise ValueError(
            f"{fn}: offset must satisfy 0 <= offset and offset + Nq <= Nk, got offset={offset}, Nq={q.shape[0]}, Nk={k.shape[0]}"
        )
    q, k = promote(fn, (q, k))
    s = resolve_scale(fn, None, logit_scale, q)
    if _use_fused(fn, "infonce_rect_fwd", impl, q.device):
        rows = ops.infonce_rect_fwd(q, k, s, offset, chunk_size, call_impl_code(fn, "infonce", impl, q, k))[0]
    else:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        rows = reference.infonce_rect_reference(q.to(acc), k.to(acc), s, offset)
    return reduce(rows, reduction)


def _use_fused(fn: str, op: str, impl: str, device: torch.device) -> bool:
    """validation.use_fused, and for a named CUDA implementation the CUDA kernel (other devices
    are refused by kernel_choice.call_impl_code, with the reason)."""
    if impl in ("auto", "fused", "reference"):
        return use_fused(fn, op, impl, device)
    if device.type == "cuda" and not (is_tracing() or has_kernel(op, device)):
        raise ValueError(f"{fn}: impl={impl!r} but semcomp_ext has no CUDA kernel for {op} (build_info(): cuda?)")
    return True


# ---- centroids and feature selection -----------------------------------------------------


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
    check_matrix(fn, "x", x)
    ids = check_index(fn, "ids", ids, x.device)
    if ids.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: ids must have one entry per row of x ({x.shape[0]}), got {ids.shape[0]}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) and not isinstance(num_groups, torch.SymInt):
        raise TypeError(f"{fn}: num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups <= 0:
        raise ValueError(f"{fn}: num_groups must be >= 1, got {num_groups}")
    if features is not None:
        features = check_index(fn, "features", features, x.device)
    norm_in, norm_out = normalize_mode(fn, normalize)
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
        check_matrix(fn, f"zs[{i}]", z)
        if z.shape != zs[0].shape or z.dtype != zs[0].dtype or z.device != zs[0].device:
            raise ValueError(
                f"{fn}: zs[{i}] must match zs[0] in shape, dtype and device, got {tuple(z.shape)} {z.dtype} "
                f"{z.device} vs {tuple(zs[0].shape)} {zs[0].dtype} {zs[0].device}"
            )
    norm_in, norm_out = normalize_mode(fn, normalize)
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
    check_matrix(fn, "x", x)
    index = check_index(fn, "index", index, x.device)
    return ops.gather_columns(x, index)


# ---- sigmoid (SigLIP) ----------------------------------------------------------------------


def _check_sigmoid_inputs(fn, a, b, negative_only):
    """a (Na, D) and b (Nb, D) checked (Na == Nb unless negative_only) and promoted to one dtype."""
    check_pair(fn, a, b, same_rows=False)
    if b.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch: b has 0 rows")
    if not negative_only and a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{fn}: a and b must have the same number of rows N (row i of a pairs with row i of b) "
            f"unless negative_only=True, got {a.shape[0]} and {b.shape[0]}")
    return promote(fn, (a, b))


def sigmoid_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None = None,
    *,
    negative_only: bool = False,
    reduction: str = "mean",
    backward: str = "auto",
    chunk_size: int = 0,
    impl: str = "auto",
) -> torch.Tensor:
    """Sigmoid (SigLIP) loss of a (Na, D) against b (Nb, D), fused (O(N) extra memory)::

        z_ij = s <a_i, b_j> + t,    y_ij = +1 if j == i else -1   (all -1 with negative_only=True)
        loss_i = sum_j -log sigmoid(y_ij z_ij)                     (per row, reduction="none")
        loss   = sum_i loss_i / Na                                  (reduction="mean", open_clip's)

    ``logit_scale`` s multiplies the dot products (open_clip passes ``logit_scale.exp()``),
    ``logit_bias`` t is added (None: 0); both may be learnable one-element tensors and receive
    gradients. Positives are the pairs (a_i, b_i) (Na == Nb), or none with
    ``negative_only=True`` (a block against another rank's b). ``reduction``: "mean" (the sum
    over all Na x Nb pairs divided by Na), "sum", or "none" (per-row losses, shape (Na,)).
    ``chunk_size``: rows per chunk (0: about 4M logits per chunk on the CPU, 32M on CUDA).
    Mixed dtypes are promoted as in :func:`infonce_loss`.

    ``backward``: "recompute" keeps only the inputs and recomputes each chunk of logits in the
    backward; "onepass" computes the gradients of the summed loss in the forward's pass over
    the chunks and keeps them (2 x N x D) until the backward scales them (scalar losses only);
    "auto" (default): "onepass" for a scalar loss that needs gradients, else "recompute".

    ``impl``: "auto" (fused kernel, reference where the device has none), "fused",
    "reference" (pure PyTorch, Na x Nb memory), or one CUDA implementation of the fused kernel:
    "gemm", "mma", "wgmma" (sm_90a: H100/H200, D a multiple of 8); a named one that cannot
    run the inputs is a ValueError. "auto" and "fused" on CUDA bf16/fp16 inputs take the
    measured table (semcomp_ext.choose_cuda_impl).

    Returns a 0-d tensor (or (Na,)) in fp32 (fp64 for fp64 inputs).
    """
    fn = "sigmoid_loss"
    check_impl_choice(fn, "sigmoid", impl)
    if not isinstance(negative_only, bool):
        raise TypeError(f"{fn}: negative_only must be a bool, got {type(negative_only).__name__}")
    check_reduction(fn, reduction)
    if backward not in SIGMOID_BACKWARDS:
        raise ValueError(f"{fn}: backward must be one of {SIGMOID_BACKWARDS}, got {backward!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"{fn}: chunk_size must be an int >= 0, got {chunk_size!r}")
    a, b = _check_sigmoid_inputs(fn, a, b, negative_only)
    scale = scalar_param(fn, "logit_scale", logit_scale, a)
    bias = scalar_param(fn, "logit_bias", 0.0 if logit_bias is None else logit_bias, a)
    if backward == "onepass" and reduction == "none":
        raise ValueError(f"{fn}: backward='onepass' needs a scalar loss (reduction 'mean' or 'sum'), got reduction='none'")
    if not _use_fused(fn, "sigmoid_fwd", impl, a.device):
        acc = torch.float64 if a.dtype == torch.float64 else torch.float32
        return reference.sigmoid_loss_reference(a.to(acc), b.to(acc), scale, bias, negative_only=negative_only,
                                                reduction=reduction)
    code = call_impl_code(fn, "sigmoid", impl, a, b)
    wants_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (a, b, scale, bias))
    if wants_grad and reduction != "none" and backward in ("auto", "onepass"):
        total = ops.sigmoid_fwd_bwd(a, b, scale, bias, negative_only, chunk_size, code)[0]
        return total / a.shape[0] if reduction == "mean" else total
    rows = ops.sigmoid_fwd(a, b, scale, bias, negative_only, chunk_size, code)
    if reduction == "mean":
        return rows.sum() / a.shape[0]
    return rows.sum() if reduction == "sum" else rows
