"""Segment mean (centroids) and column gather (RFS) throughput vs their torch peers
(`semcomp_ext.bench.segment_gather`, also behind `semcomp bench segment|gather`).

GB/s counts bytes read plus bytes written once (x, ids, output; for the gather the cache lines
of x holding a kept column), the memory-bound floor, compared with the copy bandwidth measured
once, for a copy that moves as many bytes as the smallest case. Inputs are random (never zeros); every method is
checked against the reference before timing.

    python -m benchmarks.bench_segment_gather                     # CPU defaults
    python -m benchmarks.bench_segment_gather --device cuda --n 4194304 --d 512
"""

from __future__ import annotations

import argparse

from benchmarks.common import environment, prepare_cpu_memory_measurement, write_result
from semcomp_ext.bench.segment_gather import bench_gather, bench_segment, make_x, working_set_bytes
from semcomp_ext.bench.timing import copy_gb_per_s


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--groups", type=int, nargs="+", default=[1000, 1 << 19])
    p.add_argument("--keep", type=float, nargs="+", default=[0.05, 0.25, 0.5])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.device == "cpu":
        prepare_cpu_memory_measurement()
    x = make_x(args.n, args.d, getattr(torch, args.dtype), args.device)
    # the ceiling, once: a copy moving (read + write) as many bytes as the smallest case
    es = x.element_size()
    sizes = [working_set_bytes("segment", args.n, args.d, es, groups=g) for g in args.groups]
    sizes += [working_set_bytes("gather", args.n, args.d, es, keep=k) for k in args.keep]
    copy = copy_gb_per_s(args.device, min(sizes) // 2)
    ceiling = copy["copy_gb_per_s"]
    rows = []
    for g in args.groups:
        rows += bench_segment(x, g, args.device, args.repeats)
    for k in args.keep:
        rows += bench_gather(x, k, args.device, args.repeats)
    for r in rows:
        extra = f"groups={r['groups']}" if "groups" in r else f"keep={r['keep']}"
        if "error" in r:
            print(f"{r['op']:<15}{extra:<15}{r['method']:<22}ERROR {r['error']}")
            continue
        r["fraction_of_copy_bw"] = r["gb_per_s"] / ceiling
        print(f"{r['op']:<15}{extra:<15}{r['method']:<22}{r['median_s'] * 1e3:9.1f} ms {r['gb_per_s']:7.2f} GB/s "
              f"({r['fraction_of_copy_bw']:.0%} of copy)")
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    name = args.out or f"segment_gather_{args.device.split(':')[0]}{suffix}.json"
    path = write_result(name, {"benchmark": "segment mean + column gather", "dtype": args.dtype,
                               "copy_bandwidth_gb_per_s": ceiling, "copy_bytes": copy["copy_bytes"],
                               "env": environment(args.device), "rows": rows})
    print(f"copy bandwidth {ceiling:.2f} GB/s ({copy['copy_bytes'] >> 20} MiB); wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
