"""Argument checks and conversions shared by the user-facing functions
(:mod:`semcomp_ext.functional`), the loss modules (:mod:`semcomp_ext.losses`) and the
distributed losses: one validation of every option, with messages that name the function,
the argument and its value.

``TypeError`` means an argument of the wrong kind (a string where a number or tensor belongs);
``ValueError`` a tensor or number with a bad shape, dtype, device or value.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch

from ._ops import has_kernel

FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


class _DefaultTemperature(float):
    """The contract's default temperature, 0.07, as an object of its own: a temperature given
    explicitly (0.07 included) is told apart from the default by identity, so that giving it
    together with logit_scale is an error while logit_scale alone overrides the default."""

    def __repr__(self) -> str:
        return "0.07"

    def __reduce__(self):  # copies and pickles stay the default
        return (_default_temperature, ())


def _default_temperature() -> float:
    return DEFAULT_TEMPERATURE


DEFAULT_TEMPERATURE = _DefaultTemperature(0.07)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels: fp64 for fp64 inputs, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_matrix(fn: str, name: str, x) -> None:
    if not torch.is_tensor(x):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{fn}: {name} must be 2-D (N, D), got shape {tuple(x.shape)}")
    if x.dtype not in FLOATS:
        raise ValueError(f"{fn}: {name} must be float32, float64, bfloat16 or float16, got {x.dtype}")


def check_pair(fn: str, a, b, names=("a", "b"), same_rows: bool = True) -> None:
    check_matrix(fn, names[0], a)
    check_matrix(fn, names[1], b)
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


def is_tracing() -> bool:
    return torch.compiler.is_compiling()


def promote(fn: str, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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


def number(fn: str, name: str, value) -> float:
    """A Python/NumPy real number as a float; TypeError for anything else (a string, a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{fn}: {name} must be a number or a one-element tensor, got {type(value).__name__} {value!r}"
        )
    return float(value)


def check_one_element(fn: str, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """A scalar parameter given as a tensor: one element, floating, on like's device."""
    if t.numel() != 1 or t.dim() > 1:
        raise ValueError(f"{fn}: {name} must be a one-element tensor of shape [] or [1], got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating tensor, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{fn}: {name} must be on {like.device} (where the embeddings are), got {t.device}")


def check_scale_tensor(fn: str, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    """A temperature or logit-scale tensor: one element, floating, on like's device, and (where
    reading it costs no device sync: on the CPU, outside tracing) finite and > 0. On CUDA a bad
    value is not checked here; the kernels turn the loss and gradients into NaN instead."""
    check_one_element(fn, name, t, like)
    if t.device.type == "cpu" and not is_tracing():
        v = float(t.detach().reshape(()))
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{fn}: {name} must be finite and > 0, got {v}")


def resolve_scale(fn: str, temperature, logit_scale, like: torch.Tensor) -> torch.Tensor:
    """The logit scale s = 1/temperature as a one-element tensor on like's device.

    temperature left at its default (the DEFAULT_TEMPERATURE object) gives way to logit_scale;
    any temperature passed explicitly (0.07 included) together with logit_scale is an error.

    A tensor temperature gives s = 1/temperature computed by autograd, so a learnable
    temperature receives its gradient (dL/dt = -dL/ds / t^2); a tensor logit_scale is used as
    it is. Numbers become constant tensors."""
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    if logit_scale is None:
        if temperature is None:
            raise ValueError(f"{fn}: give temperature or logit_scale")
        if torch.is_tensor(temperature):
            check_scale_tensor(fn, "temperature", temperature, like)
            t = temperature if temperature.dtype in (torch.float32, torch.float64) else temperature.float()
            return 1.0 / t
        t = number(fn, "temperature", temperature)
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"{fn}: temperature must be finite and > 0, got {temperature}")
        return torch.full((), 1.0 / t, dtype=acc, device=like.device)  # no pageable copy
    if temperature is not None and temperature is not DEFAULT_TEMPERATURE:
        if not torch.is_tensor(temperature):
            number(fn, "temperature", temperature)  # a string is a TypeError before anything else
        raise ValueError(
            f"{fn}: give temperature or logit_scale, not both (got temperature={temperature!r}, "
            f"logit_scale={logit_scale!r})")
    if not torch.is_tensor(logit_scale):
        s = number(fn, "logit_scale", logit_scale)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"{fn}: logit_scale must be finite and > 0, got {logit_scale}")
        return torch.full((), s, dtype=acc, device=like.device)
    check_scale_tensor(fn, "logit_scale", logit_scale, like)
    return logit_scale


def reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def check_reduction(fn: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def use_fused(fn: str, op: str, impl: str, device: torch.device) -> bool:
    if impl not in ("auto", "fused", "reference"):
        raise ValueError(f"{fn}: impl must be 'auto', 'fused' or 'reference', got {impl!r}")
    if impl == "reference":
        return False
    if is_tracing() or has_kernel(op, device):
        return True
    if impl == "fused":
        raise ValueError(f"{fn}: impl='fused' but semcomp_ext has no {device.type} kernel for {op} (build_info(): cuda?)")
    warnings.warn(f"{fn}: no native {device.type} kernel; using the pure-PyTorch reference (O(N^2) memory)", stacklevel=3)
    return False


def attach_bias(loss: torch.Tensor, fn: str, logit_bias) -> torch.Tensor:
    """logit_bias shifts every logit equally: loss and gradients are unchanged. It still joins
    the graph (with an exact zero gradient) so optimisers that expect .grad find one."""
    if logit_bias is None:
        return loss
    if not torch.is_tensor(logit_bias):
        number(fn, "logit_bias", logit_bias)
        return loss
    if logit_bias.numel() != 1:
        raise ValueError(f"{fn}: logit_bias must be a scalar, got shape {tuple(logit_bias.shape)}")
    if logit_bias.requires_grad:
        return loss + 0.0 * logit_bias.reshape(()).to(loss.dtype)
    return loss


def modality_pairs(fn: str, m: int, pairs: str, anchor: int) -> list[tuple[int, int]]:
    if pairs == "all":
        return [(i, j) for i in range(m) for j in range(i + 1, m)]
    if pairs == "anchor":
        if not 0 <= anchor < m:
            raise ValueError(f"{fn}: anchor must be in [0, {m}), got {anchor}")
        return [(anchor, j) for j in range(m) if j != anchor]
    raise ValueError(f"{fn}: pairs must be 'all' or 'anchor', got {pairs!r}")


def check_modalities(fn: str, zs) -> list:
    if isinstance(zs, torch.Tensor) or not isinstance(zs, Sequence) or len(zs) < 2:
        raise ValueError(f"{fn}: zs must be a sequence of at least 2 tensors (one per modality)")
    return list(zs)


def check_index(fn: str, name: str, idx, device) -> torch.Tensor:
    if hasattr(idx, "index") and not torch.is_tensor(idx):  # a RandomFeatureSelector
        idx = idx.index
    if not torch.is_tensor(idx):
        idx = torch.as_tensor(idx)
    if idx.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D, got shape {tuple(idx.shape)}")
    if idx.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{fn}: {name} must be int64 or int32, got {idx.dtype}")
    return idx.to(device)


def normalize_mode(fn: str, normalize) -> tuple[bool, bool]:
    modes = {False: (False, False), None: (False, False), True: (True, False), "input": (True, False),
             "output": (False, True), "both": (True, True)}
    if normalize not in modes:
        raise ValueError(f"{fn}: normalize must be False, True, 'input', 'output' or 'both', got {normalize!r}")
    return modes[normalize]


def scalar_param(fn: str, name: str, value, like: torch.Tensor) -> torch.Tensor:
    """A scale or bias (SigLIP's logit_scale / logit_bias) as a one-element floating tensor on
    like's device. Numbers become constants in the accumulation dtype; tensors are used as they
    are (learnable). Finite values are required: checked here for numbers and CPU tensors
    (outside tracing), by the native CPU kernels otherwise."""
    if not torch.is_tensor(value):
        v = number(fn, name, value)
        if not math.isfinite(v):
            raise ValueError(f"{fn}: {name} must be finite, got {value}")
        return torch.full((), v, dtype=acc_dtype(like.dtype), device=like.device)
    check_one_element(fn, name, value, like)
    if value.device.type == "cpu" and not is_tracing():
        v = float(value.detach().reshape(()))
        if not math.isfinite(v):
            raise ValueError(f"{fn}: {name} must be finite, got {v}")
    return value
