"""The table behind impl="auto" (semcomp_ext/data/cuda_impl_table.json) from GPU timing results:

    python -m benchmarks.impl_table benchmarks/results/<timing>.json ... [--out PATH] [--margin 0.05]

The implementation is semcomp_ext.bench.impl_table.
"""

import sys

from semcomp_ext.bench.impl_table import main

if __name__ == "__main__":
    sys.exit(main())
