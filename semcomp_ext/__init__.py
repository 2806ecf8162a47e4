"""semcomp_ext: fused InfoNCE, centroid and random-feature-selection kernels for semantic
compression of multimodal embeddings (CPU C++ and CUDA), with a Python API and `semcomp` CLI."""

from __future__ import annotations

import torch

from . import _ops  # noqa: F401  (loads and registers the native ops)
from ._C import _infonce_dk_accumulate as _native_dk_accumulate
from ._C import build_info as _native_build_info
from ._ops import get_infonce_cuda_impl, set_infonce_cuda_impl
from .features import RandomFeatureSelector, rfs_index
from .functional import (
    centroids,
    infonce_loss,
    infonce_rect_loss,
    pair_centroids,
    select_features,
)
from .losses import ClipLoss, InfoNCELoss, multimodal_infonce_loss  # with its distributed form
from .siglip import SigLipLoss, sigmoid_loss
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
    "build_info",
    "centroids",
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
    "select_features",
    "set_infonce_cuda_impl",
    "sigmoid_loss",
    "true_pair_cosine",
]


def build_info() -> dict:
    """Version, the torch version built against and running, CUDA compiled?, CUDA archs, OpenMP,
    and the threads the CPU kernels may use."""
    info = dict(_native_build_info())
    info["torch_runtime"] = torch.__version__
    info["cuda_archs"] = [a for a in info["cuda_archs"].split(",") if a]
    info["num_threads"] = torch.get_num_threads()
    # CUDA backward, bf16/fp16: how dk is accumulated in fp32 (decided on first use)
    info["infonce_dk_accumulate"] = ("not yet used", "addmm.dtype_out", "mm.dtype_out + add_")[
        _native_dk_accumulate()]
    return info


def __getattr__(name: str):
    # open_compressed is imported on first use: `import semcomp_ext` stays free of numpy-only
    # readers, pyarrow and faiss until a compressed folder is opened
    if name == "open_compressed":
        from .compress.open import open_compressed

        return open_compressed
    if name == "compress_arrays":
        from .compress.api import compress_arrays

        return compress_arrays
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
