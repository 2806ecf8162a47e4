"""The two ceilings every GPU figure is judged against, measured on the machine at hand:
a bf16 matrix product (8192^3, random data) and a device-to-device copy (bytes read +
written), timed with CUDA events, median of repeats after a warm-up
(`semcomp_ext.bench.timing.gpu_ceilings`).

    python -m benchmarks.gpu_ceilings [--out ceilings.json]
"""

from __future__ import annotations

import argparse
import json


def main(argv=None) -> int:
    from semcomp_ext.bench.timing import gpu_ceilings

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    r = gpu_ceilings()
    print(json.dumps(r, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
