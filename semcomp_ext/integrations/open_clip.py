"""open_clip's training with the fused :class:`semcomp_ext.ClipLoss`.

``patch()`` makes ``open_clip.create_loss(args)`` — the function open_clip's training script
(``open_clip_train.main``) calls to build its loss — return :class:`semcomp_ext.ClipLoss` for the
plain CLIP objective, with the same arguments (``local_loss``, ``gather_with_grad``,
``cache_labels``, ``rank``, ``world_size``). Nothing else changes: the loss value and the
gradients equal open_clip's ``ClipLoss`` (fp32: to rounding), but the N x N logit matrix is never
built. Other objectives keep open_clip's own losses:

- CoCa (``--model coca_*``): ``CoCaLoss`` (a subclass of open_clip's ``ClipLoss``), unchanged;
- distillation (``--distill-model``): ``DistillClipLoss``, unchanged;
- SigLIP (``--siglip``): ``SigLipLoss``, unchanged.

Horovod (``--horovod``) is not supported by the fused loss: with the patch applied,
``create_loss`` raises ``ValueError`` for it.

Usage::

    from semcomp_ext.integrations import open_clip as sc_open_clip

    sc_open_clip.patch()            # from now on, until unpatch()
    with sc_open_clip.patch():      # or only inside the block
        open_clip_train.main.main(argv)

or from the command line: ``python -m semcomp_ext.open_clip_train <open_clip_train arguments>``.

Gradient caching: ``patch(grad_cache_micro_batch=B)`` (the entry's ``--grad-cache-micro-batch B``)
also makes open_clip's ``train_one_epoch`` take each step with gradient caching
(:mod:`semcomp_ext.grad_cache`): both towers encode the batch in micro-batches of B rows without
autograd, the loss (any of the above, with ``--local-loss --gather-with-grad`` across ranks)
and its gradient with respect to the features are taken on the whole batch, then each
micro-batch is encoded again with autograd and the cached gradient back-propagated. The scaler
(``--precision amp``), gradient clipping, the scheduler and the logging stay open_clip's. Under
DDP the re-encoding bypasses the wrapper and the gradients are averaged across ranks once per
step (what DDP's hooks would do). Not with ``--accum-freq`` > 1, CoCa, or Horovod.

How: ``create_loss`` looks up the name ``ClipLoss`` in ``open_clip.factory`` when it is called,
so the patch rebinds that one name (``open_clip.loss.ClipLoss`` and ``open_clip.ClipLoss`` stay
open_clip's class, and so does every subclass). This reaches every caller, including modules
that imported ``create_loss`` before the patch. Patches nest: each ``patch()`` needs one
``unpatch()`` (a ``with`` block does it).
"""

from __future__ import annotations

import threading

__all__ = ["GradCachedModel", "patch", "unpatch", "is_patched", "fused_loss_class", "grad_cache_micro_batch"]

_lock = threading.Lock()
_depth = 0
_original = None
_micro_batches: list = []  # one entry per active patch(): its grad_cache_micro_batch or None
_original_train = None  # open_clip_train.main.train_one_epoch while the grad-cache wrapper is in


def fused_loss_class():
    """The class ``create_loss`` builds for the CLIP objective while patched."""
    from ..losses import ClipLoss

    return ClipLoss


def _factory():
    from .._compat import import_open_clip

    try:
        import_open_clip()
        import open_clip.factory as factory
    except ImportError as exc:
        raise ImportError(
            "semcomp_ext.integrations.open_clip needs open_clip: pip install open-clip-torch "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if not callable(getattr(factory, "create_loss", None)) or not isinstance(getattr(factory, "ClipLoss", None), type):
        raise ImportError(
            "semcomp_ext.integrations.open_clip: this open_clip has no factory.create_loss/ClipLoss "
            "to patch (tested with open-clip-torch 3.3.0)"
        )
    return factory


class _Patched:
    """Returned by :func:`patch`; as a context manager it undoes that patch on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        unpatch()
        return False

    def __repr__(self):
        return f"<semcomp_ext open_clip patch, active={is_patched()}>"


def patch(grad_cache_micro_batch: int | None = None) -> _Patched:
    """Make ``open_clip.create_loss`` build :class:`semcomp_ext.ClipLoss` for the CLIP objective;
    with ``grad_cache_micro_batch=B`` also make ``open_clip_train``'s training loop take each step
    with gradient caching in micro-batches of at most B rows (see the module docstring).

    Returns an object that can be used as a context manager (the patch is undone on exit).
    Calling ``patch()`` while patched only counts one more level (undone by one more
    ``unpatch()``); the innermost patch that gives a micro-batch decides it."""
    global _depth, _original, _original_train
    if grad_cache_micro_batch is not None and (
            isinstance(grad_cache_micro_batch, bool) or not isinstance(grad_cache_micro_batch, int)
            or grad_cache_micro_batch < 1):
        raise ValueError(f"patch: grad_cache_micro_batch must be an int >= 1 or None, got {grad_cache_micro_batch!r}")
    factory = _factory()
    fused = fused_loss_class()
    main_mod = _train_main() if grad_cache_micro_batch is not None else None
    with _lock:
        if _depth == 0:
            _original = factory.ClipLoss
            factory.ClipLoss = fused
        if main_mod is not None and _original_train is None:
            _original_train = main_mod.train_one_epoch
            main_mod.train_one_epoch = _train_one_epoch
        _depth += 1
        _micro_batches.append(grad_cache_micro_batch)
    return _Patched()


def unpatch() -> None:
    """Undo one :func:`patch` (the last one restores open_clip's ``ClipLoss`` in ``create_loss``
    and its ``train_one_epoch``). Raises ``RuntimeError`` when not patched."""
    global _depth, _original, _original_train
    with _lock:
        if _depth == 0:
            raise RuntimeError("semcomp_ext.integrations.open_clip.unpatch: not patched")
        _depth -= 1
        _micro_batches.pop()
        if _depth == 0:
            import open_clip.factory as factory

            factory.ClipLoss = _original
            _original = None
            if _original_train is not None:
                _train_main().train_one_epoch = _original_train
                _original_train = None


def grad_cache_micro_batch() -> int | None:
    """The micro-batch of the active gradient-caching patch (None: steps are not cached)."""
    return next((m for m in reversed(_micro_batches) if m is not None), None)


def is_patched() -> bool:
    """Whether ``open_clip.create_loss`` currently builds the fused loss."""
    return _depth > 0


# ---- gradient caching in open_clip_train's loop ------------------------------------------------


def _train_main():
    try:
        import open_clip_train.main as main_mod
        import open_clip_train.train  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "semcomp_ext.integrations.open_clip: gradient caching patches open_clip's training package, "
            f"which is missing ({exc}); install it with: pip install 'open-clip-torch[training]'") from exc
    return main_mod


def _features(out, key: str, index: int):
    return out[key] if isinstance(out, dict) else out[index]


class GradCachedModel:
    """Stands in for open_clip's model (plain or DDP-wrapped) in a training step.

    ``model_out = gc(images, texts)`` encodes both towers in micro-batches of ``micro_batch``
    rows without autograd (:func:`semcomp_ext.grad_cache.cached_encode`, under the caller's
    autocast) and returns open_clip's output dict, whose ``image_features`` / ``text_features``
    are leaves that require grad and whose ``logit_scale`` (and ``logit_bias``) come from the
    model with autograd. After the loss on them, ``gc.backward(total_loss, scaler)`` runs
    open_clip's backward (``scaler.scale(loss).backward()`` or ``loss.backward()``), re-encodes
    each micro-batch with autograd and back-propagates the cached feature gradients, then, for a
    DDP model, averages every parameter gradient across its process group. Other attributes
    are the model's (``train()``, ``parameters()``, ``module``...)."""

    def __init__(self, model, micro_batch: int):
        from torch.nn.parallel import DistributedDataParallel

        self._model = model
        self._ddp = isinstance(model, DistributedDataParallel)
        self._net = model.module if self._ddp else model
        self._micro_batch = micro_batch
        self._pending = None

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, images, texts):
        from ..grad_cache import cached_encode

        net = self._net
        encoders = [lambda x: _features(net(image=x), "image_features", 0),
                    lambda t: _features(net(text=t), "text_features", 1)]
        cache = cached_encode(encoders, [images, texts], self._micro_batch, fn="--grad-cache-micro-batch")
        leaves = [e.detach().requires_grad_() for e in cache.embeddings]
        cache.embeddings = [leaf.detach() for leaf in leaves]
        out = net()  # logit scale (and bias) only, with autograd
        model_out = {"image_features": leaves[0], "text_features": leaves[1]}
        if isinstance(out, dict):
            model_out.update({k: v for k, v in out.items() if k in ("logit_scale", "logit_bias")})
        else:
            model_out["logit_scale"] = out[2]
            if len(out) > 3:
                model_out["logit_bias"] = out[3]
        self._pending = (cache, leaves)
        return model_out

    def backward(self, total_loss, scaler=None) -> None:
        if self._pending is None:
            raise RuntimeError("GradCachedModel.backward: no cached forward to back-propagate (call the model first)")
        cache, leaves = self._pending
        self._pending = None
        if scaler is not None:
            scaler.scale(total_loss).backward()
        else:
            total_loss.backward()
        cache.backward([leaf.grad for leaf in leaves])
        if self._ddp:
            _average_gradients(self._net.parameters(), self._model.process_group)


def _average_gradients(params, group) -> None:
    """DDP's reduction done once: every gradient divided by the group size, then summed over
    the group (one all_reduce per dtype and device, through a flat buffer)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)
    groups: dict = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads]).div_(world)
        dist.all_reduce(flat, group=group)
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def _train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    """open_clip_train's train_one_epoch, each step gradient-cached when a micro-batch is set."""
    import open_clip_train.train as oc_train

    micro_batch = grad_cache_micro_batch()
    if micro_batch is None:
        return _original_train(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                               tb_writer=tb_writer)
    if getattr(args, "accum_freq", 1) != 1:
        raise ValueError(f"--grad-cache-micro-batch cannot be combined with --accum-freq {args.accum_freq} "
                         "(gradient caching already takes the whole batch's loss in micro-batches)")
    if getattr(args, "horovod", False):
        raise ValueError("--grad-cache-micro-batch: --horovod is not supported (use torch.distributed)")
    if "coca" in str(getattr(args, "model", "")).lower():
        raise ValueError(f"--grad-cache-micro-batch: CoCa models are not supported (--model {args.model})")
    cached = GradCachedModel(model, micro_batch)
    original_backward = oc_train.backward
    oc_train.backward = cached.backward
    try:
        return _original_train(cached, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                               tb_writer=tb_writer)
    finally:
        oc_train.backward = original_backward
