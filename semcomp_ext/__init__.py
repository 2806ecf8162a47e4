"""semcomp_ext: fused InfoNCE, centroid and random-feature-selection kernels for semantic
compression of multimodal embeddings (CPU C++ and CUDA), with a Python API and `semcomp` CLI."""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (loads and registers the native ops)
from ._ops import build_info, get_infonce_cuda_impl, infonce_cuda_impls, set_infonce_cuda_impl
from .features import RandomFeatureSelector, rfs_index
from .kernel_choice import choose_cuda_impl
from .functional import (
    centroids,
    infonce_loss,
    infonce_rect_loss,
    pair_centroids,
    select_features,
    sigmoid_loss,
)
from .losses import ClipLoss, InfoNCELoss, SigLipLoss, multimodal_infonce_loss
from .grad_cache import grad_cache_step
from .metrics import (
    ExplainedVariance,
    compression_ratio,
    explained_variance,
    fisher_ratio,
    modality_gap,
    modality_gaps,
    true_pair_cosine,
)

__version__ = "0.1.0"

__all__ = [
    "ClipLoss",
    "ExplainedVariance",
    "InfoNCELoss",
    "RandomFeatureSelector",
    "SigLipLoss",
    "build_index",
    "build_info",
    "centroids",
    "choose_cuda_impl",
    "compress_arrays",
    "compression_ratio",
    "explained_variance",
    "fisher_ratio",
    "get_infonce_cuda_impl",
    "grad_cache_step",
    "infonce_loss",
    "infonce_rect_loss",
    "modality_gap",
    "modality_gaps",
    "multimodal_infonce_loss",
    "open_compressed",
    "pair_centroids",
    "rfs_index",
    "search",
    "select_features",
    "set_infonce_cuda_impl",
    "infonce_cuda_impls",
    "sigmoid_loss",
    "true_pair_cosine",
]


def __getattr__(name: str):
    # open_compressed is imported on first use: `import semcomp_ext` stays free of numpy-only
    # readers, pyarrow and faiss until a compressed folder is opened (or an index built or searched)
    if name == "open_compressed":
        from .compress.open import open_compressed

        return open_compressed
    if name == "compress_arrays":
        from .compress.api import compress_arrays

        return compress_arrays
    if name == "build_index":
        from .compress.index import build_index

        return build_index
    if name == "search":
        from .compress.index import search

        return search
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
