"""The GPU window's timing stage: InfoNCE forward+backward per CUDA implementation and SigLIP
forward+backward, interleaved rounds, inputs rotated past L2, CUDA events, medians.

    python -m benchmarks.gpu_timing --out OUT/timing.json                  # the window's shapes
    python -m benchmarks.gpu_timing --impls mma gemm --out OUT/mma.json    # the mma slot
    python -m benchmarks.gpu_timing --device cpu --shapes 64x16:bfloat16   # a CPU run (CI)

The implementation is semcomp_ext.bench.gpu_timing.
"""

import sys

from semcomp_ext.bench.gpu_timing import main

if __name__ == "__main__":
    sys.exit(main())
