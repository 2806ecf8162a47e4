"""Gradient caching (GradCache, Gao et al. 2021): a contrastive step on a batch whose encoder
activations do not fit, with the loss still taken on the whole batch.

For M modalities with inputs x_m (N_m rows) and encoders f_m::

    pass 1 (no autograd): e_m = cat_k f_m(x_m[k])          micro-batches k of <= B rows
    loss:                  L = loss_fn(e_1, ..., e_M)         whole batch, autograd on e_m only
                           g_m = dL/de_m                       (N_m, D) cached
    pass 2 (autograd):     for each k: backward(f_m(x_m[k]), g_m[k])

Peak memory: one micro-batch's activations plus the O(N·D) embeddings and their gradients (the
fused losses add O(N)). The parameter gradients equal those of
``loss_fn(*[f_m(x_m) for m]).backward()`` (the chain rule split at the embeddings); with random
ops (dropout), each pass-2 call replays the CPU (and CUDA) RNG state its pass-1 call started
from, so the result is that of encoding the same micro-batches, in the same order, with autograd.

:func:`grad_cache_step` is the whole step; :func:`cached_encode` (pass 1) and
:meth:`CachedEncoding.backward` (pass 2) are its two halves, for training loops that take the
loss and its backward themselves (the open_clip integration does).
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["CachedEncoding", "cached_encode", "grad_cache_step"]

_FN = "grad_cache_step"


# ---- inputs ----------------------------------------------------------------------------------


def _rows(fn: str, name: str, x) -> int:
    """Row count (dim 0) of a tensor, a dict of tensors or a list/tuple of tensors; every member
    must have the same."""
    if torch.is_tensor(x):
        if x.dim() == 0:
            raise ValueError(f"{fn}: {name} must have a batch dimension (dim 0), got a 0-d tensor")
        return x.shape[0]
    if isinstance(x, dict):
        items = [(f"{name}[{k!r}]", v) for k, v in x.items()]
    elif isinstance(x, (list, tuple)):
        items = [(f"{name}[{j}]", v) for j, v in enumerate(x)]
    else:
        raise ValueError(f"{fn}: {name} must be a tensor, a dict of tensors or a list/tuple of tensors, "
                         f"got {type(x).__name__}")
    if not items:
        raise ValueError(f"{fn}: {name} is an empty {type(x).__name__}")
    counts = {}
    for member, v in items:
        if not torch.is_tensor(v) or v.dim() == 0:
            what = "a 0-d tensor" if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"{fn}: {member} must be a tensor with a batch dimension (dim 0), got {what}")
        counts[member] = v.shape[0]
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{k}: {n}" for k, n in counts.items())
        raise ValueError(f"{fn}: the members of {name} must have the same number of rows (dim 0), got {listed}")
    return next(iter(counts.values()))


def _slice(x, start: int, stop: int):
    if torch.is_tensor(x):
        return x[start:stop]
    if isinstance(x, dict):
        return {k: v[start:stop] for k, v in x.items()}
    return type(x)(v[start:stop] for v in x)


def _tensors(x) -> list[torch.Tensor]:
    if torch.is_tensor(x):
        return [x]
    return list(x.values()) if isinstance(x, dict) else list(x)


# ---- RNG and autocast state ------------------------------------------------------------------


def _cuda_devices(inputs) -> list[int]:
    """CUDA devices of the inputs (their RNG states are recorded and replayed), if CUDA is up."""
    if not torch.cuda.is_available():
        return []
    return sorted({t.get_device() for x in inputs for t in _tensors(x) if t.is_cuda})


def _rng_state(devices: list[int]):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(devices: list[int], state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


def _autocast_state() -> list[tuple[str, bool, torch.dtype, bool]]:
    """(device type, enabled, dtype, cache enabled) of the CPU and (if present) CUDA autocast."""
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cache = torch.is_autocast_cache_enabled()
    return [(t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t), cache) for t in types]


def _autocast(state) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type, enabled, dtype, cache in state:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache))
    return stack


# ---- the two passes --------------------------------------------------------------------------


@dataclass
class CachedEncoding:
    """Pass 1's result: ``embeddings[m]`` (N_m, ...) for each modality, computed without
    autograd, and what pass 2 needs to recompute them (inputs, micro-batch bounds, the RNG
    state each call started from, the autocast state of the caller)."""

    encoders: list
    inputs: list
    embeddings: list[torch.Tensor]
    calls: list[tuple[int, int, int]]  # (modality, start, stop) in call order
    rng: list = field(repr=False)
    devices: list[int] = field(default_factory=list)
    autocast: list = field(default_factory=list)

    def backward(self, grads: Sequence[torch.Tensor | None], no_sync: Callable | None = None) -> None:
        """Pass 2: re-encode each micro-batch with autograd (replaying its RNG state, under the
        recorded autocast state) and back-propagate ``grads[m][start:stop]`` through it, so
        ``.grad`` of the encoders' parameters accumulates d(loss)/d(parameters).

        grads[m]: d(loss)/d(embeddings[m]) (same shape), or None where the loss does not depend
        on modality m (its encoder is then not re-run). Calls are made in pass 1's order.
        Distributed data parallel: an encoder with a ``no_sync()`` method (DistributedDataParallel,
        FSDP) runs every call but its last under its own ``no_sync()``; ``no_sync`` (a context
        manager factory) wraps every call but the last of the whole pass. The caller's RNG
        state is the same after this call as before it."""
        fn = "CachedEncoding.backward"
        if len(grads) != len(self.embeddings):
            raise ValueError(f"{fn}: grads has {len(grads)} entries for {len(self.embeddings)} modalities")
        for m, (g, e) in enumerate(zip(grads, self.embeddings)):
            if g is not None and (not torch.is_tensor(g) or g.shape != e.shape):
                got = tuple(g.shape) if torch.is_tensor(g) else type(g).__name__
                raise ValueError(f"{fn}: grads[{m}] must have the embeddings' shape {tuple(e.shape)}, got {got}")
        calls = [(i, c) for i, c in enumerate(self.calls) if grads[c[0]] is not None]
        if not calls:
            return
        last_of = {}
        for i, (m, _, _) in calls:
            last_of[id(self.encoders[m])] = i
        final = calls[-1][0]
        with torch.random.fork_rng(devices=self.devices), torch.enable_grad():
            for i, (m, start, stop) in calls:
                enc = self.encoders[m]
                with contextlib.ExitStack() as stack:
                    if i != final and no_sync is not None:
                        stack.enter_context(no_sync())
                    if i != last_of[id(enc)] and callable(getattr(enc, "no_sync", None)):
                        stack.enter_context(enc.no_sync())
                    _set_rng_state(self.devices, self.rng[i])
                    with _autocast(self.autocast):
                        out = enc(_slice(self.inputs[m], start, stop))
                    _check_output(fn, m, out, self.embeddings[m], start, stop)
                    if out.requires_grad:
                        torch.autograd.backward(out, grads[m][start:stop].to(out.dtype))
                    del out


def _check_output(fn: str, m: int, out, like: torch.Tensor | None, start: int, stop: int) -> None:
    if not torch.is_tensor(out):
        raise ValueError(f"{fn}: encoders[{m}] must return a tensor (the embeddings), got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != stop - start:
        raise ValueError(f"{fn}: encoders[{m}] returned shape {tuple(out.shape)} for a micro-batch of "
                         f"{stop - start} rows; it must return one embedding per row (dim 0 = {stop - start})")
    if like is not None and (out.shape[1:] != like.shape[1:] or out.dtype != like.dtype):
        raise ValueError(f"{fn}: encoders[{m}] returned {tuple(out.shape)} {out.dtype} on its second call "
                         f"for rows {start}:{stop}, {tuple(like.shape[1:])} {like.dtype} on its first")


def _check_micro_batch(fn: str, micro_batch) -> int:
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Integral) or micro_batch < 1:
        raise ValueError(f"{fn}: micro_batch must be an int >= 1, got {micro_batch!r}")
    return int(micro_batch)


def cached_encode(encoders: Sequence[Callable], inputs: Sequence, micro_batch: int, *,
                  fn: str = "cached_encode") -> CachedEncoding:
    """Pass 1: encode each modality's input in micro-batches of at most ``micro_batch`` rows,
    without autograd, modality by modality, in row order; record each call's RNG state (CPU, and
    CUDA for the CUDA devices of the inputs) and the caller's autocast state. Returns a
    :class:`CachedEncoding` whose ``embeddings[m]`` is the row-wise concatenation (N_m, ...)."""
    micro_batch = _check_micro_batch(fn, micro_batch)
    if isinstance(encoders, (str, bytes)) or not isinstance(encoders, Sequence) or not encoders:
        raise ValueError(f"{fn}: encoders must be a non-empty sequence of callables, got {type(encoders).__name__}")
    if isinstance(inputs, (str, bytes, dict)) or not isinstance(inputs, Sequence):
        raise ValueError(f"{fn}: inputs must be a sequence (one entry per encoder), got {type(inputs).__name__}")
    if len(inputs) != len(encoders):
        raise ValueError(f"{fn}: inputs has {len(inputs)} entries but encoders has {len(encoders)}; "
                         "give one input per encoder")
    for m, enc in enumerate(encoders):
        if not callable(enc):
            raise ValueError(f"{fn}: encoders[{m}] must be callable, got {type(enc).__name__}")
    sizes = []
    for m, x in enumerate(inputs):
        n = _rows(fn, f"inputs[{m}]", x)
        if n == 0:
            raise ValueError(f"{fn}: inputs[{m}] is an empty batch (0 rows)")
        sizes.append(n)
    devices = _cuda_devices(inputs)
    calls, rng, outs = [], [], []
    with torch.no_grad():
        for m, (enc, x, n) in enumerate(zip(encoders, inputs, sizes)):
            parts = []
            for start in range(0, n, micro_batch):
                stop = min(start + micro_batch, n)
                calls.append((m, start, stop))
                rng.append(_rng_state(devices))
                out = enc(_slice(x, start, stop))
                _check_output(fn, m, out, parts[0] if parts else None, start, stop)
                parts.append(out)
            outs.append(parts[0] if len(parts) == 1 else torch.cat(parts))
            del parts
    return CachedEncoding(list(encoders), list(inputs), outs, calls, rng, devices, _autocast_state())


def grad_cache_step(encoders: Sequence[Callable], inputs: Sequence, loss_fn: Callable, micro_batch: int, *,
                    no_sync: Callable | None = None) -> torch.Tensor:
    """One gradient-cached step: accumulates into ``.grad`` what
    ``loss_fn(*[enc(x) for enc, x in zip(encoders, inputs)]).backward()`` would, holding the
    activations of one micro-batch at a time.

    encoders: M callables; ``encoders[m](x)`` maps a micro-batch of ``inputs[m]`` (b rows) to its
        embeddings, a tensor (b, ...) — usually (b, D). Called with one argument: the slice of a
        tensor, or a dict / list / tuple of the slices of its members.
    inputs: M batches: a tensor (N_m, ...), a dict or a list/tuple of tensors (all N_m rows),
        cut along dim 0 into micro-batches of at most ``micro_batch`` rows (the last may be
        smaller).
    loss_fn: ``loss_fn(e_1, ..., e_M)`` -> scalar tensor, on the whole batch (e_m: (N_m, D)). Its
        own parameters (a logit scale, a SigLIP bias) get their gradients here; collectives in
        it (the distributed fused losses) run once, on every rank in step.
    micro_batch: rows per encoder call, >= 1.
    no_sync: optional context-manager factory (e.g. ``ddp_model.no_sync``) entered around every
        backward call but the last; an encoder that itself has ``no_sync()`` (a
        DistributedDataParallel module) uses it around all its calls but its last.

    Returns the loss, detached. Keeps the caller's autocast state for every encoder call; with
    dropout, each recomputation replays its first call's RNG state (bit-identical embeddings),
    and the caller's RNG ends where encoding the batch once would leave it.

    Raises ValueError naming the argument: micro_batch < 1; encoders and inputs of different
    lengths; an empty batch; members of a dict/list input with different row counts; an encoder
    returning a non-tensor or a wrong number of rows; loss_fn returning a non-scalar; embeddings
    that loss_fn rejects with a ValueError (e.g. paired inputs with different batch sizes).
    Nothing is accumulated into ``.grad`` when one of these is raised.
    """
    if not callable(loss_fn):
        raise ValueError(f"{_FN}: loss_fn must be callable, got {type(loss_fn).__name__}")
    if no_sync is not None and not callable(no_sync):
        raise ValueError(f"{_FN}: no_sync must be a context-manager factory (callable) or None, got {type(no_sync).__name__}")
    cache = cached_encode(encoders, inputs, micro_batch, fn=_FN)
    leaves = [e.detach().requires_grad_() for e in cache.embeddings]
    cache.embeddings = [leaf.detach() for leaf in leaves]
    with torch.enable_grad():
        try:
            loss = loss_fn(*leaves)
        except ValueError as exc:
            sizes = [leaf.shape[0] for leaf in leaves]
            raise ValueError(f"{_FN}: loss_fn rejected the embeddings of inputs with {sizes} rows: {exc}") from exc
    if not torch.is_tensor(loss) or loss.numel() != 1:
        got = f"shape {tuple(loss.shape)}" if torch.is_tensor(loss) else type(loss).__name__
        raise ValueError(f"{_FN}: loss_fn must return a scalar (one-element) tensor, got {got}")
    if not loss.requires_grad:
        raise ValueError(f"{_FN}: loss_fn's result does not depend on the embeddings (no autograd graph)")
    loss.backward()
    grads = [leaf.grad for leaf in leaves]
    del leaves
    cache.backward(grads, no_sync=no_sync)
    return loss.detach()
