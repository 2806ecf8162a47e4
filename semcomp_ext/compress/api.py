"""The offline compressor's Python API, gathered from the modules of its chain:
options (options.py) -> plan (plan.py) -> block backend (backends.py, blocks.py) -> tasks
(pipeline.py) -> writer (atomic.py), run as a job (job.py: lock, journal, resume) on storage
(fsio.py). `compress_arrays` (arrays.py) runs the same maths in memory."""

from __future__ import annotations

from .arrays import CompressedArrays, codebook_bytes, compress_arrays, compression_ratio_bytes
from .job import compress, default_workers
from .options import CompressOptions, OptionError
from .plan import Plan, build_plan, default_out_dtype
from .progress import Progress

__all__ = ["CompressOptions", "CompressedArrays", "OptionError", "Plan", "Progress", "build_plan", "codebook_bytes",
           "compress", "compress_arrays", "compression_ratio_bytes", "default_out_dtype", "default_workers"]
