"""Checks, in a child process, that an error raised inside the native extension reaches
Python as an exception naming the op (ValueError for bad arguments; RuntimeError from
older builds) instead of crashing the process.

A build that links its own copy of libstdc++ (a compiler wrapper with static libstdc++, or
one other than the GCC torch was built with) crashes here; `benchmarks/gpu_check.sh` runs
this right after building so that such a build is named before any test runs.

    python -m benchmarks.native_error_check
"""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import torch, semcomp_ext
try:
    torch.ops.semcomp.infonce_fwd(torch.randn(5, 4), torch.randn(3, 4), torch.tensor(2.0))
except (ValueError, RuntimeError) as exc:
    assert "infonce_fwd" in str(exc), str(exc)
    print("native errors raise:", str(exc)[:70])
else:
    raise SystemExit("infonce_fwd accepted row counts 5 and 3")
"""


def main() -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        print(f"native_error_check: the child exited with {proc.returncode}"
              + (" (killed by a signal: a libstdc++ mismatch; rebuild with the GCC torch was built with, "
                 "e.g. CXX=/usr/bin/g++)" if proc.returncode < 0 else ""))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
