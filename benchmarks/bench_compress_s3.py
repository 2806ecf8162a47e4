"""`semcomp compress` against a real S3 endpoint on 127.0.0.1: moto's server mode + s3fs.

    python -m benchmarks.bench_compress_s3 [--mb 256] [--rows-per-shard 8192] [--repeats 3] [--workers 2]

local -> local, bucket -> local and bucket -> bucket timings, then kill -9 mid-run + --resume
with a byte comparison; the implementation is semcomp_ext.bench.compress_s3 (see its
docstring). Writes benchmarks/results/compress_s3.json (`-o PATH` elsewhere); exit status 1
if an output differs, the kill did not land mid-run or verify fails.
"""

from __future__ import annotations

import sys
from pathlib import Path

from semcomp_ext.bench.compress_s3 import main

if __name__ == "__main__":
    sys.exit(main(default_out=str(Path(__file__).resolve().parent / "results" / "compress_s3.json")))
