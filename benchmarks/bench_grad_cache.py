"""Gradient caching: peak CPU memory against batch size and step time, full batch vs
semcomp_ext.grad_cache_step, for an open_clip model with the fused ClipLoss (the measurement is
semcomp_ext.bench.grad_cache; see its docstring and docs/large_batch.md).

    python -m benchmarks.bench_grad_cache        # -> benchmarks/results/grad_cache_cpu.json
"""

import sys

from semcomp_ext.bench.grad_cache import main

if __name__ == "__main__":
    sys.exit(main())
