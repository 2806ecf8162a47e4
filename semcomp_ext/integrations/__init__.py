"""Hooks that put semcomp_ext's fused ops into other libraries' training code.

- :mod:`semcomp_ext.integrations.open_clip`: ``patch()`` makes ``open_clip.create_loss`` (and so
  open_clip's training script) build :class:`semcomp_ext.ClipLoss` for the CLIP objective.
"""
