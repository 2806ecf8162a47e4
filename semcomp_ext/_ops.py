"""Raw ops: loads the native library, registers fake kernels and autograd.

Layer 1 of the Python API. ``torch.ops.semcomp.<op>`` are the registered ops (schemas in
``csrc/registration.cpp``); this module adds, for each, a fake (meta) kernel so that
``torch.compile`` and ``torch.library.opcheck`` work, and wires forward ops to their
separately registered backward ops with ``torch.library.register_autograd``.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing it runs the TORCH_LIBRARY registrations)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "semcomp_ext: the native extension semcomp_ext._C could not be loaded "
        f"({exc}). It is built against torch {torch.__version__!s} by "
        "`pip install --no-build-isolation .`; rebuild after changing torch."
    ) from exc

ops = torch.ops.semcomp

__all__ = ["ops", "has_kernel", "set_infonce_cuda_impl", "get_infonce_cuda_impl"]

_CUDA_IMPLS = ("auto", "gemm", "tile")


def set_infonce_cuda_impl(impl: str) -> str:
    """Select the CUDA InfoNCE implementation for bf16/fp16 inputs (process-wide); returns
    the previous selection. "gemm": cuBLAS writes each chunk of logits in fp32, separate
    kernels compute the log-sum-exps and gradients. "tile": the logits are computed on the
    tensor cores tile by tile and consumed in shared memory (never written to device memory).
    "auto" (default) currently means "gemm". fp32/fp64 inputs always use "gemm"."""
    if impl not in _CUDA_IMPLS:
        raise ValueError(f"set_infonce_cuda_impl: impl must be one of {_CUDA_IMPLS}, got {impl!r}")
    previous = get_infonce_cuda_impl()
    _C._set_infonce_cuda_impl(_CUDA_IMPLS.index(impl))
    return previous


def get_infonce_cuda_impl() -> str:
    """The CUDA InfoNCE implementation selected for bf16/fp16 inputs ("auto", "gemm", "tile")."""
    return _CUDA_IMPLS[_C._infonce_cuda_impl()]


def has_kernel(op: str, device: torch.device | str) -> bool:
    """Whether ``semcomp::<op>`` has a native kernel for ``device``'s backend."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"semcomp::{op}", key)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- fake kernels ----------------------------------------------------------------------
# Their shape checks raise ValueError (torch._check_value), like the native kernels'
# TORCH_CHECK_VALUE and the Python API: one exception type for bad input on every path.


def _check_pair(op: str, q, k, logit_scale, symmetric: bool, offset: int = 0) -> None:
    torch._check_value(q.dim() == 2 and k.dim() == 2, lambda: f"{op}: inputs must be 2-D")
    torch._check_value(q.dtype == k.dtype, lambda: f"{op}: dtypes differ: {q.dtype} vs {k.dtype}")
    torch._check_value(q.shape[1] == k.shape[1], lambda: f"{op}: feature dimensions differ")
    torch._check_value(logit_scale.numel() == 1, lambda: f"{op}: logit_scale must have one element")
    if symmetric:
        torch._check_value(q.shape[0] == k.shape[0], lambda: f"{op}: a and b row counts differ")
    else:
        torch._check_value(
            offset >= 0 and offset + q.shape[0] <= k.shape[0],
            lambda: f"{op}: offset must satisfy 0 <= offset and offset + Nq <= Nk, got offset={offset}",
        )


@torch.library.register_fake("semcomp::infonce_fwd")
def _infonce_fwd_fake(a, b, logit_scale, chunk_size=0):
    _check_pair("infonce_fwd", a, b, logit_scale, True)
    n, acc = a.shape[0], _acc_dtype(a.dtype)
    return a.new_empty(n, dtype=acc), a.new_empty(n, dtype=acc), a.new_empty(n, dtype=acc)


@torch.library.register_fake("semcomp::infonce_bwd")
def _infonce_bwd_fake(a, b, logit_scale, row_lse, col_lse, row_coef, col_coef, diag_coef, chunk_size=0):
    _check_pair("infonce_bwd", a, b, logit_scale, True)
    # contiguous whatever the inputs' strides, as the kernels return them
    return a.new_empty(a.shape), b.new_empty(b.shape), torch.empty_like(logit_scale)


@torch.library.register_fake("semcomp::infonce_rect_fwd")
def _infonce_rect_fwd_fake(q, k, logit_scale, offset=0, chunk_size=0):
    _check_pair("infonce_rect_fwd", q, k, logit_scale, False, offset)
    n, acc = q.shape[0], _acc_dtype(q.dtype)
    return q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc)


@torch.library.register_fake("semcomp::infonce_rect_bwd")
def _infonce_rect_bwd_fake(q, k, logit_scale, lse, row_coef, diag_coef, offset=0, chunk_size=0):
    _check_pair("infonce_rect_bwd", q, k, logit_scale, False, offset)
    return q.new_empty(q.shape), k.new_empty(k.shape), torch.empty_like(logit_scale)


@torch.library.register_fake("semcomp::segment_mean")
def _segment_mean_fake(x, ids, num_groups, features=None):
    torch._check_value(x.dim() == 2, lambda: "segment_mean: x must be 2-D")
    torch._check_value(ids.dim() == 1 and ids.shape[0] == x.shape[0], lambda: "segment_mean: ids must have one entry per row")
    torch._check_value(num_groups > 0, lambda: "segment_mean: num_groups must be >= 1")
    k = features.shape[0] if features is not None else x.shape[1]
    return x.new_empty(num_groups, k), x.new_empty(num_groups, dtype=torch.int64)


@torch.library.register_fake("semcomp::segment_mean_bwd")
def _segment_mean_bwd_fake(grad, ids, counts, dim, features=None):
    return grad.new_empty(ids.shape[0], dim)


@torch.library.register_fake("semcomp::gather_columns")
def _gather_columns_fake(x, index):
    torch._check_value(x.dim() == 2, lambda: "gather_columns: x must be 2-D")
    torch._check_value(index.dim() == 1, lambda: "gather_columns: index must be 1-D")
    return x.new_empty(x.shape[0], index.shape[0])


@torch.library.register_fake("semcomp::gather_columns_bwd")
def _gather_columns_bwd_fake(grad, index, dim):
    return grad.new_empty(grad.shape[0], dim)


def _pair_mean_no_tensor(zs, features=None):
    # Reached when no backend kernel takes the call, so the backends' own checks never ran:
    # an empty zs and no features (no argument carries a device), a sparse or mkldnn layout
    # (dispatched to its own key), or a device this build has no kernel for.
    if len(zs) == 0:
        raise ValueError("pair_mean: zs must hold at least one (N, D) tensor")
    for m, z in enumerate(zs):
        if z.layout != torch.strided:
            raise ValueError(f"pair_mean: zs[{m}] must be a dense (strided) tensor, got layout {z.layout}")
    raise NotImplementedError(f"pair_mean: this build of semcomp_ext has no {zs[0].device.type} kernel "
                              "(CUDA kernels are compiled when torch has CUDA, or with SEMCOMP_CUDA=ON)")


torch.library.impl("semcomp::pair_mean", "CompositeExplicitAutograd")(_pair_mean_no_tensor)


@torch.library.register_fake("semcomp::pair_mean")
def _pair_mean_fake(zs, features=None):
    torch._check_value(len(zs) > 0, lambda: "pair_mean: zs must hold at least one (N, D) tensor")
    z = zs[0]
    torch._check_value(z.dim() == 2, lambda: "pair_mean: zs[0] must be 2-D")
    for m, t in enumerate(zs):
        torch._check_value(t.shape == z.shape and t.dtype == z.dtype, lambda: f"pair_mean: zs[{m}] must match zs[0]")
    torch._check_value(features is None or features.dim() == 1, lambda: "pair_mean: features must be 1-D")
    k = features.shape[0] if features is not None else z.shape[1]
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    return z.new_empty(z.shape[0], k, dtype=acc), z.new_empty(z.shape[0], dtype=torch.bool)


# ---- autograd ----------------------------------------------------------------------------
# The forward ops return per-row losses and log-sum-exps; gradients may arrive for any of
# them. They enter the backward kernels as per-row coefficients:
#   loss_i = (r_i + c_i)/2 - S_ii  ->  row_coef = g/2 + g_r, col_coef = g/2 + g_c, diag = g.


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _infonce_setup(ctx, inputs, output):
    a, b, logit_scale, chunk_size = inputs
    _, row_lse, col_lse = output
    ctx.chunk_size = chunk_size
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(a, b, logit_scale, row_lse, col_lse)


def _infonce_backward(ctx, g_loss, g_row, g_col):
    a, b, logit_scale, row_lse, col_lse = ctx.saved_tensors
    g = _zeros_if_none(g_loss, row_lse)
    half = 0.5 * g
    row_coef = half if g_row is None else half + g_row
    col_coef = half if g_col is None else half + g_col
    ga, gb, gs = ops.infonce_bwd(a, b, logit_scale, row_lse, col_lse, row_coef, col_coef, g, ctx.chunk_size)
    need = ctx.needs_input_grad
    return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None, None)


torch.library.register_autograd("semcomp::infonce_fwd", _infonce_backward, setup_context=_infonce_setup)


def _rect_setup(ctx, inputs, output):
    q, k, logit_scale, offset, chunk_size = inputs
    _, lse = output
    ctx.offset, ctx.chunk_size = offset, chunk_size
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(q, k, logit_scale, lse)


def _rect_backward(ctx, g_loss, g_lse):
    q, k, logit_scale, lse = ctx.saved_tensors
    g = _zeros_if_none(g_loss, lse)
    row_coef = g if g_lse is None else g + g_lse
    gq, gk, gs = ops.infonce_rect_bwd(q, k, logit_scale, lse, row_coef, g, ctx.offset, ctx.chunk_size)
    need = ctx.needs_input_grad
    return (gq if need[0] else None, gk if need[1] else None, gs if need[2] else None, None, None)


torch.library.register_autograd("semcomp::infonce_rect_fwd", _rect_backward, setup_context=_rect_setup)


def _segment_setup(ctx, inputs, output):
    x, ids, _num_groups, features = inputs
    _, counts = output
    ctx.dim = x.shape[1]
    ctx.save_for_backward(ids, counts, features)


def _segment_backward(ctx, g_out, _g_counts):
    ids, counts, features = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None
    return ops.segment_mean_bwd(g_out.contiguous(), ids, counts, ctx.dim, features), None, None, None


torch.library.register_autograd("semcomp::segment_mean", _segment_backward, setup_context=_segment_setup)


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.dim = x.shape[1]
    ctx.save_for_backward(index)


def _gather_backward(ctx, g_out):
    (index,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return ops.gather_columns_bwd(g_out, index, ctx.dim), None


torch.library.register_autograd("semcomp::gather_columns", _gather_backward, setup_context=_gather_setup)


def _pair_mean_setup(ctx, inputs, output):
    zs, features = inputs
    ctx.shape_dtypes = [(z.shape[1], z.dtype) for z in zs]
    ctx.save_for_backward(features)


def _pair_mean_backward(ctx, g_out, _g_finite):
    # out = sum_m zs[m][:, f] / M: each zs[m] receives g / M in the kept columns (scattered,
    # duplicates summed, when features is given)
    (features,) = ctx.saved_tensors
    g = g_out / len(ctx.shape_dtypes)
    grads = []
    for need, (dim, dtype) in zip(ctx.needs_input_grad[0], ctx.shape_dtypes):
        if not need:
            grads.append(None)
            continue
        gz = g if features is None else ops.gather_columns_bwd(g.contiguous(), features, dim)
        grads.append(gz.to(dtype))
    # a features argument left at its default is not among the op's inputs here
    return (grads, None)[: len(ctx.needs_input_grad)]


torch.library.register_autograd("semcomp::pair_mean", _pair_mean_backward, setup_context=_pair_mean_setup)
