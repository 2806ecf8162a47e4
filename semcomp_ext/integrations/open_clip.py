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

How: ``create_loss`` looks up the name ``ClipLoss`` in ``open_clip.factory`` when it is called,
so the patch rebinds that one name (``open_clip.loss.ClipLoss`` and ``open_clip.ClipLoss`` stay
open_clip's class, and so does every subclass). This reaches every caller, including modules
that imported ``create_loss`` before the patch. Patches nest: each ``patch()`` needs one
``unpatch()`` (a ``with`` block does it).
"""

from __future__ import annotations

import threading

__all__ = ["patch", "unpatch", "is_patched", "fused_loss_class"]

_lock = threading.Lock()
_depth = 0
_original = None


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


def patch() -> _Patched:
    """Make ``open_clip.create_loss`` build :class:`semcomp_ext.ClipLoss` for the CLIP objective.

    Returns an object that can be used as a context manager (the patch is undone on exit).
    Calling ``patch()`` while patched only counts one more level (undone by one more
    ``unpatch()``)."""
    global _depth, _original
    factory = _factory()
    fused = fused_loss_class()
    with _lock:
        if _depth == 0:
            _original = factory.ClipLoss
            factory.ClipLoss = fused
        _depth += 1
    return _Patched()


def unpatch() -> None:
    """Undo one :func:`patch` (the last one restores open_clip's ``ClipLoss`` in ``create_loss``).
    Raises ``RuntimeError`` when not patched."""
    global _depth, _original
    with _lock:
        if _depth == 0:
            raise RuntimeError("semcomp_ext.integrations.open_clip.unpatch: not patched")
        _depth -= 1
        if _depth == 0:
            import open_clip.factory as factory

            factory.ClipLoss = _original
            _original = None


def is_patched() -> bool:
    """Whether ``open_clip.create_loss`` currently builds the fused loss."""
    return _depth > 0
