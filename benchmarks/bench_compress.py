"""Throughput, CPU time and peak RSS of `semcomp compress` on synthetic fp32 shards (page cache).

    python -m benchmarks.bench_compress [--gb 2] [--workers 1 2] [--tiny 1000 10000] [--engines local ray]

The implementation (inputs, the measured jobs in fresh children, the numpy-load reference,
tiny shards, start-up) is semcomp_ext.bench.compress; see its docstring for what is measured.
Writes benchmarks/results/compress_cpu.json (`-o PATH` elsewhere).
"""

from __future__ import annotations

from pathlib import Path

from semcomp_ext.bench.compress import main

if __name__ == "__main__":
    main(default_out=str(Path(__file__).resolve().parent / "results" / "compress_cpu.json"))
