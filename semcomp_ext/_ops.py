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

__all__ = ["ops", "has_kernel", "build_info", "set_infonce_cuda_impl", "get_infonce_cuda_impl", "infonce_cuda_impls"]

# The CUDA implementations by the code the ops' `impl` argument takes (csrc/common/impl_choice.h):
# 0 "auto" (the default), 1 gemm, 2 tile, 3 mma, 4 wgmma; minus a code = that one where it can run.
_CUDA_IMPLS = ("auto", "gemm", "tile", "mma", "wgmma")


def set_infonce_cuda_impl(impl: str) -> str:
    """Select the CUDA InfoNCE implementation for bf16/fp16 inputs (process-wide); returns
    the previous selection. "gemm": cuBLAS writes each chunk of logits in fp32, separate
    kernels compute the log-sum-exps and gradients. "tile": the logits are computed on the
    tensor cores tile by tile and consumed in shared memory (never written to device memory).
    "mma" (sm_80+): ldmatrix + mma.sync kernels with cp.async pipelines, logits and log-sum-exp
    states in registers; the backward writes s*G for two cuBLAS products. "wgmma" (sm_90a
    builds on compute capability 9.0): the mma passes on a Hopper wgmma + TMA mainloop.
    "auto" (default): the Python API picks per call from the measured table
    (:func:`semcomp_ext.choose_cuda_impl`); the raw ops run "gemm". Any other setting overrides
    the table for every call that does not name an implementation itself (``impl=`` of
    :func:`semcomp_ext.infonce_loss`). fp32/fp64 inputs always use "gemm", and so do inputs
    the selected implementation cannot run (an ``impl=`` given per call raises instead)."""
    if impl not in _CUDA_IMPLS:
        raise ValueError(f"set_infonce_cuda_impl: impl must be one of {_CUDA_IMPLS}, got {impl!r}")
    previous = get_infonce_cuda_impl()
    _C._set_infonce_cuda_impl(_CUDA_IMPLS.index(impl))
    _SETTING[0] = impl
    return previous


# The setting as a Python value, for code traced by torch.compile (which cannot call into _C).
_SETTING = ["auto"]


def infonce_cuda_impls() -> tuple[str, ...]:
    """The names set_infonce_cuda_impl accepts, "auto" first."""
    return _CUDA_IMPLS


def get_infonce_cuda_impl() -> str:
    """The CUDA InfoNCE implementation selected for bf16/fp16 inputs ("auto", "gemm", "tile", "mma", "wgmma")."""
    return _CUDA_IMPLS[_C._infonce_cuda_impl()]


def _saved_impl(impl: int, family: str) -> int:
    """The impl code a forward's autograd node hands its backward: the call's own code, or for
    0 the implementation the default meant at forward time, as a preference (InfoNCE: minus the
    process-wide setting, -1 gemm when it is "auto"; SigLIP: -1 gemm). The backward then
    recomputes the logits with the forward's implementation even when the process-wide setting
    changes in between; a preference resolves the same way for the same saved inputs."""
    if impl != 0:
        return impl
    setting = _C._infonce_cuda_impl() if family == "infonce" else 0
    return -(setting or 1)


def build_info() -> dict:
    """Version, the torch version built against and running, CUDA compiled?, CUDA archs, OpenMP,
    the dtypes whose CPU InfoNCE GEMMs run in that dtype with fp32 accumulation
    (``cpu_lowp_gemm``), and the threads the CPU kernels may use."""
    info = dict(_C.build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    info["num_threads"] = torch.get_num_threads()
    # CUDA backward, bf16/fp16: how dk is accumulated in fp32 (decided on first use)
    info["infonce_dk_accumulate"] = ("not yet used", "addmm.dtype_out", "mm.dtype_out + add_")[
        _C._infonce_dk_accumulate()]
    return info


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
def _infonce_fwd_fake(a, b, logit_scale, chunk_size=0, impl=0):
    _check_pair("infonce_fwd", a, b, logit_scale, True)
    n, acc = a.shape[0], _acc_dtype(a.dtype)
    return a.new_empty(n, dtype=acc), a.new_empty(n, dtype=acc), a.new_empty(n, dtype=acc)


@torch.library.register_fake("semcomp::infonce_bwd")
def _infonce_bwd_fake(a, b, logit_scale, row_lse, col_lse, row_coef, col_coef, diag_coef, chunk_size=0, impl=0):
    _check_pair("infonce_bwd", a, b, logit_scale, True)
    # contiguous whatever the inputs' strides, as the kernels return them
    return a.new_empty(a.shape), b.new_empty(b.shape), torch.empty_like(logit_scale)


@torch.library.register_fake("semcomp::infonce_rect_fwd")
def _infonce_rect_fwd_fake(q, k, logit_scale, offset=0, chunk_size=0, impl=0):
    _check_pair("infonce_rect_fwd", q, k, logit_scale, False, offset)
    n, acc = q.shape[0], _acc_dtype(q.dtype)
    return q.new_empty(n, dtype=acc), q.new_empty(n, dtype=acc)


@torch.library.register_fake("semcomp::infonce_rect_bwd")
def _infonce_rect_bwd_fake(q, k, logit_scale, lse, row_coef, diag_coef, offset=0, chunk_size=0, impl=0):
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
# Every setup saves the forward's impl (_saved_impl) in ctx.impl for the backward op.


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


def _infonce_setup(ctx, inputs, output):
    a, b, logit_scale, chunk_size, impl = inputs
    _, row_lse, col_lse = output
    ctx.chunk_size, ctx.impl = chunk_size, _saved_impl(impl, "infonce")
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(a, b, logit_scale, row_lse, col_lse)


def _infonce_backward(ctx, g_loss, g_row, g_col):
    a, b, logit_scale, row_lse, col_lse = ctx.saved_tensors
    g = _zeros_if_none(g_loss, row_lse)
    half = 0.5 * g
    row_coef = half if g_row is None else half + g_row
    col_coef = half if g_col is None else half + g_col
    ga, gb, gs = ops.infonce_bwd(a, b, logit_scale, row_lse, col_lse, row_coef, col_coef, g, ctx.chunk_size,
                                 ctx.impl)
    need = ctx.needs_input_grad
    return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None, None, None)


torch.library.register_autograd("semcomp::infonce_fwd", _infonce_backward, setup_context=_infonce_setup)


def _rect_setup(ctx, inputs, output):
    q, k, logit_scale, offset, chunk_size, impl = inputs
    _, lse = output
    ctx.offset, ctx.chunk_size, ctx.impl = offset, chunk_size, _saved_impl(impl, "infonce")
    if any(ctx.needs_input_grad[:3]):
        ctx.save_for_backward(q, k, logit_scale, lse)


def _rect_backward(ctx, g_loss, g_lse):
    q, k, logit_scale, lse = ctx.saved_tensors
    g = _zeros_if_none(g_loss, lse)
    row_coef = g if g_lse is None else g + g_lse
    gq, gk, gs = ops.infonce_rect_bwd(q, k, logit_scale, lse, row_coef, g, ctx.offset, ctx.chunk_size, ctx.impl)
    need = ctx.needs_input_grad
    return (gq if need[0] else None, gk if need[1] else None, gs if need[2] else None, None, None, None)


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


# ---- sigmoid (SigLIP) ops: fake kernels and autograd -----------------------------------------


def _check_sigmoid_fake(op, a, b, logit_scale, logit_bias, negative_only):
    torch._check_value(a.dim() == 2 and b.dim() == 2, lambda: f"{op}: a and b must be 2-D")
    torch._check_value(a.dtype == b.dtype, lambda: f"{op}: dtypes differ: {a.dtype} vs {b.dtype}")
    torch._check_value(a.shape[1] == b.shape[1], lambda: f"{op}: feature dimensions differ")
    torch._check_value(logit_scale.numel() == 1, lambda: f"{op}: logit_scale must have one element")
    torch._check_value(logit_bias.numel() == 1, lambda: f"{op}: logit_bias must have one element")
    if not negative_only:
        torch._check_value(a.shape[0] == b.shape[0], lambda: f"{op}: a and b row counts differ")


@torch.library.register_fake("semcomp::sigmoid_fwd")
def _sigmoid_fwd_fake(a, b, logit_scale, logit_bias, negative_only=False, chunk_size=0, impl=0):
    _check_sigmoid_fake("sigmoid_fwd", a, b, logit_scale, logit_bias, negative_only)
    return a.new_empty(a.shape[0], dtype=_acc_dtype(a.dtype))


@torch.library.register_fake("semcomp::sigmoid_bwd")
def _sigmoid_bwd_fake(a, b, logit_scale, logit_bias, grad_rows, negative_only=False, chunk_size=0, impl=0):
    _check_sigmoid_fake("sigmoid_bwd", a, b, logit_scale, logit_bias, negative_only)
    return (a.new_empty(a.shape), b.new_empty(b.shape), torch.empty_like(logit_scale),
            torch.empty_like(logit_bias))


@torch.library.register_fake("semcomp::sigmoid_fwd_bwd")
def _sigmoid_fwd_bwd_fake(a, b, logit_scale, logit_bias, negative_only=False, chunk_size=0, impl=0):
    _check_sigmoid_fake("sigmoid_fwd_bwd", a, b, logit_scale, logit_bias, negative_only)
    acc = _acc_dtype(a.dtype)
    return (a.new_empty((), dtype=acc), a.new_empty(a.shape, dtype=acc), b.new_empty(b.shape, dtype=acc),
            torch.empty_like(logit_scale), torch.empty_like(logit_bias))


def _sigmoid_setup(ctx, inputs, output):
    a, b, logit_scale, logit_bias, negative_only, chunk_size, impl = inputs
    ctx.negative_only, ctx.chunk_size, ctx.impl = negative_only, chunk_size, _saved_impl(impl, "sigmoid")
    if any(ctx.needs_input_grad[:4]):
        ctx.save_for_backward(a, b, logit_scale, logit_bias)


def _sigmoid_backward(ctx, g_rows):
    a, b, logit_scale, logit_bias = ctx.saved_tensors
    ga, gb, gs, gt = ops.sigmoid_bwd(a, b, logit_scale, logit_bias, g_rows, ctx.negative_only, ctx.chunk_size,
                                     ctx.impl)
    need = ctx.needs_input_grad
    return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
            gt if need[3] else None, None, None, None)


torch.library.register_autograd("semcomp::sigmoid_fwd", _sigmoid_backward, setup_context=_sigmoid_setup)


def _is_eager(x: torch.Tensor) -> bool:
    """Plain eager execution: no compiler, no tensor subclass (fake, functional), no dispatch
    mode (tracing) active."""
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0)


def _sigmoid_onepass_setup(ctx, inputs, output):
    a, b, logit_scale, logit_bias, negative_only, chunk_size, impl = inputs
    _, ga, gb, gs, gt = output
    ctx.dtypes = (a.dtype, b.dtype)
    ctx.negative_only, ctx.chunk_size, ctx.impl = negative_only, chunk_size, _saved_impl(impl, "sigmoid")
    # the gradient outputs are never differentiated: without this, autograd would hand the
    # backward N x D zero tensors for them
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(a, b, logit_scale, logit_bias)  # references only: for a second backward
    if _is_eager(ga):
        ctx.grads = [ga, gb, gs, gt]
    else:  # traced (torch.compile, opcheck): the gradients are saved and scaled out of place
        ctx.save_for_backward(a, b, logit_scale, logit_bias, ga, gb, gs, gt)
        ctx.grads = None


def _sigmoid_onepass_backward(ctx, g_loss, *_unused):
    # The gradients computed by the forward are those of the summed loss: the upstream gradient
    # scales them. The first backward (in eager mode) scales them in place and hands them over,
    # so the peak holds one set of N x D gradients; a later backward through the same graph
    # (retain_graph=True) recomputes them from the inputs.
    need = ctx.needs_input_grad
    if g_loss is None:  # only the gradient outputs were used: they are constants
        return None, None, None, None, None, None, None
    saved = ctx.saved_tensors
    a, b, logit_scale, logit_bias = saved[:4]
    if len(saved) > 4:  # traced by torch.compile: out of place
        ga, gb, gs, gt = saved[4:]
        g = g_loss.to(ga.dtype)
        ga, gb = g * ga, g * gb
    elif ctx.grads is not None:
        ga, gb, gs, gt = ctx.grads
        ctx.grads = None
        g = g_loss.to(ga.dtype)
        ga, gb = ga.mul_(g), gb.mul_(g)
    else:
        rows = g_loss.reshape(1).expand(a.shape[0])
        ga, gb, gs, gt = ops.sigmoid_bwd(a, b, logit_scale, logit_bias, rows, ctx.negative_only, ctx.chunk_size,
                                         ctx.impl)
        return (ga if need[0] else None, gb if need[1] else None, gs if need[2] else None,
                gt if need[3] else None, None, None, None)
    return (ga.to(ctx.dtypes[0]) if need[0] else None,
            gb.to(ctx.dtypes[1]) if need[1] else None,
            (g.to(gs.dtype) * gs) if need[2] else None,
            (g.to(gt.dtype) * gt) if need[3] else None, None, None, None)


torch.library.register_autograd("semcomp::sigmoid_fwd_bwd", _sigmoid_onepass_backward, setup_context=_sigmoid_onepass_setup)
