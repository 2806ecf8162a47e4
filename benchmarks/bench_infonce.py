"""Fused InfoNCE forward+backward vs open_clip's ClipLoss vs the pure-PyTorch reference
(`semcomp_ext.bench.infonce`, also behind `semcomp bench infonce`).

Same inputs (random unit vectors, never zeros), checked against the fp64 loss, median wall
time (CUDA events on CUDA). Peak extra memory of one forward+backward, minus the bytes of the
gradients every method must return.

    python -m benchmarks.bench_infonce                 # CPU, N=8192 D=512 fp32 (acceptance)
    python -m benchmarks.bench_infonce --device cuda --n 4096 16384 32768 65536 --d 512 1024 --dtype bfloat16
"""

from __future__ import annotations

import argparse

from benchmarks.common import environment, prepare_cpu_memory_measurement, write_result
from semcomp_ext.bench.infonce import DTYPES, FLOP_CONVENTION, METHODS, bench_case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, nargs="+", default=[8192])
    p.add_argument("--d", type=int, nargs="+", default=[512])
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--methods", nargs="+", default=["semcomp", "open_clip", "reference"], choices=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=None, help="results file name under benchmarks/results/")
    args = p.parse_args(argv)
    if args.device == "cpu":
        prepare_cpu_memory_measurement()
    rows = []
    for n in args.n:
        for d in args.d:
            rows += bench_case(n, d, args.dtype, args.device, args.methods, args.repeats)
            for r in rows[-len(args.methods):]:
                if "error" in r:
                    print(f"N={n:6d} D={d:5d} {r['method']:<20} ERROR {r['error']}")
                    continue
                print(f"N={n:6d} D={d:5d} {r['method']:<20} {r['median_s'] * 1e3:10.1f} ms  {r['tflops']:7.3f} TFLOP/s  "
                      f"extra mem {r.get('extra_bytes', float('nan')) / 2**20:9.1f} MiB  "
                      f"time/open_clip {r.get('time_vs_open_clip', float('nan')):.3f}  "
                      f"mem/open_clip {r.get('extra_mem_vs_open_clip', float('nan')):.4f}")
    name = args.out or f"infonce_{args.device.split(':')[0]}.json"
    path = write_result(name, {"benchmark": "infonce fwd+bwd", "flop_convention": FLOP_CONVENTION,
                               "env": environment(args.device), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
