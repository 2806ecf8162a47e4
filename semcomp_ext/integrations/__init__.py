"""Hooks that put semcomp_ext's fused ops into other libraries' training code.

- :mod:`semcomp_ext.integrations.open_clip`: ``patch()`` makes ``open_clip.create_loss`` (and so
  open_clip's training script) build :class:`semcomp_ext.ClipLoss` for the CLIP objective, and
  ``patch(grad_cache_micro_batch=B)`` gradient-caches its steps.
- :mod:`semcomp_ext.integrations.sentence_transformers`: ``MultipleNegativesRankingLoss`` and
  ``CachedMultipleNegativesRankingLoss``, upstream's losses with the fused rectangular InfoNCE.
- :mod:`semcomp_ext.integrations.transformers`: ``patch()`` makes ``CLIPModel`` and
  ``SiglipModel`` compute ``return_loss=True`` losses with the fused kernels; ``clip_loss`` and
  ``siglip_loss`` for calls with ``return_loss=False``.
"""
