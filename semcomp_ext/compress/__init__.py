"""Offline compression of embedding shards larger than memory: pair (or concept) centroids +
random feature selection, streamed, resumable, verifiable; local or Ray Data engine.
See docs/compress.md. Heavy optional deps (pyarrow, ray) are imported lazily."""

from .api import CompressedArrays, CompressOptions, compress, compress_arrays
from .manifest import verify

__all__ = ["CompressOptions", "CompressedArrays", "compress", "compress_arrays", "verify"]
