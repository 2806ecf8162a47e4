"""Run every benchmark for one device and regenerate the README table (the scripts call
semcomp_ext.bench, the code behind `semcomp bench`).

    python -m benchmarks.run_all               # CPU acceptance sizes
    python -m benchmarks.run_all --device cuda # GPU sweep (issue sizes)
"""

from __future__ import annotations

import argparse

from benchmarks import bench_infonce, bench_segment_gather, report


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="GPU: N in {4096, 32768}, D=512 only")
    args = p.parse_args(argv)
    if args.device == "cpu":
        bench_infonce.main(["--n", "4096", "8192", "--d", "512"])
        bench_segment_gather.main([])
    else:
        sizes = ["--n", "4096", "32768", "--d", "512"] if args.quick else \
            ["--n", "4096", "16384", "32768", "65536", "--d", "512", "768", "1024"]
        bench_infonce.main(["--device", args.device, *sizes, "--dtype", "bfloat16",
                            "--methods", "semcomp", "semcomp_tile", "semcomp_mma", "semcomp_wgmma", "open_clip", "inf_cl", "compiled_reference"])
        for dtype in ("float32", "bfloat16"):
            bench_segment_gather.main(["--device", args.device, "--n", str(1 << 22), "--d", "512", "--groups", "10",
                                       "1000", str(1 << 20), "--dtype", dtype])
    report.main([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
