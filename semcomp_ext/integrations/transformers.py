"""Hugging Face transformers' CLIP and SigLIP losses on the fused kernels.

``patch()`` makes ``CLIPModel(..., return_loss=True)`` and ``SiglipModel(..., return_loss=True)``
compute ``outputs.loss`` with :func:`semcomp_ext.infonce_loss` and :func:`semcomp_ext.sigmoid_loss`
from the outputs' normalised ``text_embeds`` / ``image_embeds`` and the model's ``logit_scale``
(and SigLIP's ``logit_bias``): the same value and gradients as transformers' own loss (tested
with transformers 5.25.0), without the softmax / log-sigmoid matrices and their gradients.
Every other output (``logits_per_image``, ``logits_per_text``, the embeddings, the tower outputs)
is the model's own, unchanged; ``return_dict=False`` and the config's ``return_dict`` are honoured.
``unpatch()`` restores the original ``forward`` methods; both are idempotent::

    from semcomp_ext.integrations import transformers as sc_hf

    sc_hf.patch()
    out = model(input_ids=ids, pixel_values=pixels, return_loss=True)   # fused loss

The models still build their (N, N) ``logits_per_text`` output. To train without it, call the
towers yourself (``model.get_text_features`` / ``get_image_features``, normalise) and use
:func:`clip_loss` / :func:`siglip_loss`, which also take a model output computed with
``return_loss=False``::

    out = model(input_ids=ids, pixel_values=pixels)
    loss = sc_hf.clip_loss(out, model)            # or clip_loss((text, image), model.logit_scale)
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading

import torch

from ..functional import infonce_loss
from ..siglip import sigmoid_loss

__all__ = ["patch", "unpatch", "is_patched", "clip_loss", "siglip_loss"]

# (module, class, loss from (model, output)) for every model class patch() reaches
_TARGETS = (
    ("transformers.models.clip.modeling_clip", "CLIPModel", "clip"),
    ("transformers.models.siglip.modeling_siglip", "SiglipModel", "siglip"),
)

_lock = threading.Lock()
_originals: dict[type, object] = {}


def _embeds(fn: str, outputs_or_embeds):
    """(text_embeds, image_embeds) from a model output or a (text, image) pair."""
    if hasattr(outputs_or_embeds, "text_embeds") and hasattr(outputs_or_embeds, "image_embeds"):
        text, image = outputs_or_embeds.text_embeds, outputs_or_embeds.image_embeds
    elif isinstance(outputs_or_embeds, (tuple, list)) and len(outputs_or_embeds) == 2:
        text, image = outputs_or_embeds
    else:
        raise ValueError(
            f"{fn}: outputs_or_embeds must be a model output with text_embeds and image_embeds "
            f"(return_dict=True) or a (text_embeds, image_embeds) pair, got {type(outputs_or_embeds).__name__}"
        )
    if not (torch.is_tensor(text) and torch.is_tensor(image)):
        raise ValueError(f"{fn}: text_embeds and image_embeds must be tensors, got "
                         f"{type(text).__name__} and {type(image).__name__}")
    return text, image


def _model_param(fn: str, value, name: str):
    """A model's parameter `name` from the model, or the value itself."""
    if isinstance(value, torch.nn.Module):
        if not hasattr(value, name):
            raise ValueError(f"{fn}: the model given as {name} has no attribute {name}")
        return getattr(value, name)
    if value is None:
        raise ValueError(f"{fn}: {name} is required (the model's {name} parameter, or the model)")
    return value


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(value):
        return value.to(like.device)
    return torch.tensor(float(value), dtype=torch.float32, device=like.device)


def clip_loss(outputs_or_embeds, logit_scale) -> torch.Tensor:
    """CLIPModel's contrastive loss, fused: (text->image + image->text) / 2 of the InfoNCE with
    logits ``exp(logit_scale) * text_embeds @ image_embeds.T``.

    outputs_or_embeds: a CLIPModel output (``return_dict=True``; its ``text_embeds`` and
        ``image_embeds`` are already L2-normalised) or a pair ``(text_embeds, image_embeds)`` of
        L2-normalised (N, D) tensors.
    logit_scale: the model's ``logit_scale`` parameter (the log of the multiplier, as CLIPModel
        stores it; its exp() is taken here and it receives its gradient), or the model itself.
    """
    fn = "clip_loss"
    text, image = _embeds(fn, outputs_or_embeds)
    scale = _as_tensor(_model_param(fn, logit_scale, "logit_scale"), text).exp()
    return infonce_loss(text, image, logit_scale=scale)


def siglip_loss(outputs_or_embeds, logit_scale, logit_bias=None) -> torch.Tensor:
    """SiglipModel's sigmoid loss, fused: the mean over text rows i of
    sum_j -log sigmoid(y_ij * (exp(logit_scale) <text_i, image_j> + logit_bias)), y_ij = +1 on
    the diagonal and -1 elsewhere.

    outputs_or_embeds: a SiglipModel output (``return_dict=True``) or a pair
        ``(text_embeds, image_embeds)`` of L2-normalised (N, D) tensors.
    logit_scale: the model's ``logit_scale`` parameter (log of the multiplier), or the model
        itself, in which case ``logit_bias`` defaults to the model's ``logit_bias``.
    logit_bias: the model's ``logit_bias`` parameter (added to every logit), or the model.
    """
    fn = "siglip_loss"
    text, image = _embeds(fn, outputs_or_embeds)
    if logit_bias is None and isinstance(logit_scale, torch.nn.Module):
        logit_bias = logit_scale
    scale = _as_tensor(_model_param(fn, logit_scale, "logit_scale"), text).exp()
    bias = _as_tensor(_model_param(fn, logit_bias, "logit_bias"), text)
    return sigmoid_loss(text, image, scale, bias)


_LOSSES = {
    "clip": lambda model, out: clip_loss(out, model.logit_scale),
    "siglip": lambda model, out: siglip_loss(out, model.logit_scale, model.logit_bias),
}


def _fused_forward(original, kind: str):
    signature = inspect.signature(original)
    loss_fn = _LOSSES[kind]

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        if not bound.arguments.get("return_loss"):
            return original(self, *args, **kwargs)
        # transformers' can_return_tuple: an explicit return_dict wins over the config's
        return_dict = kwargs.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(getattr(self, "config", None), "return_dict", True)
            return_dict = True if return_dict is None else return_dict
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["return_loss"] = False
        out = original(*bound.args, **bound.kwargs, return_dict=True)
        fields = {k: v for k, v in out.items() if k != "loss"}
        out = type(out)(loss=loss_fn(self, out), **fields)
        return out if return_dict else out.to_tuple()

    forward.__semcomp_fused__ = True
    return forward


def _classes():
    found = []
    for module_name, cls_name, kind in _TARGETS:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ImportError(
                "semcomp_ext.integrations.transformers needs transformers "
                f"(pip install 'semcomp-ext[transformers]'): {type(exc).__name__}: {exc}"
            ) from exc
        found.append((getattr(module, cls_name), kind))
    return found


def patch() -> None:
    """Make ``CLIPModel`` and ``SiglipModel`` compute ``return_loss=True`` losses with the fused
    kernels. Calling it again while patched changes nothing."""
    classes = _classes()
    with _lock:
        for cls, kind in classes:
            if cls in _originals:
                continue
            _originals[cls] = cls.__dict__["forward"]
            cls.forward = _fused_forward(_originals[cls], kind)


def unpatch() -> None:
    """Restore the models' own ``forward``. Does nothing when not patched."""
    with _lock:
        for cls, original in list(_originals.items()):
            cls.forward = original
            del _originals[cls]


def is_patched() -> bool:
    """Whether ``patch()`` is in effect."""
    return bool(_originals)
