"""The two ceilings every GPU figure is judged against, measured on the machine at hand:
a bf16 matrix product (8192^3 by default, random data) and a device-to-device copy
(bytes read + written). Timed with CUDA events, median of repeats after a warm-up.

    python -m benchmarks.gpu_ceilings [--out ceilings.json]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def cuda_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median seconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return statistics.median(times)


def measure(n: int = 8192, copy_bytes: int = 1 << 31) -> dict:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    c = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    t_mm = cuda_time(lambda: torch.mm(a, b, out=c))
    x = torch.randn(copy_bytes // 4, device="cuda")
    y = torch.empty_like(x)
    t_cp = cuda_time(lambda: y.copy_(x))
    props = torch.cuda.get_device_properties(0)
    return {
        "device_name": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16_matmul_tflops": 2 * n**3 / t_mm / 1e12,
        "bf16_matmul_n": n,
        "copy_gb_per_s": 2 * copy_bytes / t_cp / 1e9,
        "copy_bytes": copy_bytes,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    r = measure()
    print(json.dumps(r, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
