"""Fused sigmoid (SigLIP) loss forward+backward vs open_clip's SigLipLoss on the CPU: an entry
point of `semcomp_ext.bench.siglip` (inputs, correctness check, interleaved timing, memory in a
fresh interpreter per method are described there).

    python -m benchmarks.bench_siglip              # N=8192 D=512 fp32 -> results/siglip_cpu.json
"""

from __future__ import annotations

import argparse

from benchmarks.common import environment, write_result
from semcomp_ext.bench.siglip import DTYPES, METHODS, bench_case


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--out", default="siglip_cpu.json", help="results file name under benchmarks/results/")
    args = p.parse_args(argv)
    rows = bench_case(args.n, args.d, args.methods, args.repeats, dtype=args.dtype, memory=not args.no_memory)
    for r in rows:
        if "error" in r:
            print(f"{r['method']:<18} ERROR {r['error']}")
            continue
        print(f"{r['method']:<18} {r['median_s']:.3f} s  time/open_clip {r.get('time_vs_open_clip', float('nan')):.3f}  "
              f"extra mem {r.get('extra_bytes', float('nan')) / 2**20:9.1f} MiB  "
              f"mem/open_clip {r.get('extra_mem_vs_open_clip', float('nan')):.4f}")
    payload = {"benchmark": "sigmoid (SigLIP) loss fwd+bwd, CPU", "env": environment("cpu"), "rows": rows}
    print(f"wrote {write_result(args.out, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
