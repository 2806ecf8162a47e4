"""Checks, in a child process, that an error raised inside the native extension reaches
Python as an exception naming the op (ValueError for bad arguments; RuntimeError from
older builds) instead of crashing the process.

A build that links its own copy of libstdc++ (a compiler wrapper with static libstdc++, or
one other than the GCC torch was built with) crashes here; `benchmarks/gpu_check.sh` runs
this right after building so that such a build is named before any test runs.

    python -m benchmarks.native_error_check            # CPU ops
    python -m benchmarks.native_error_check --cuda     # and the CUDA kernels of this build

With --cuda it also checks that the module registers CUDA kernels for this GPU (a CPU-only or
wrong-architecture build fails here, not in the tests) and that a bad CUDA input raises too.
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


CUDA_CHILD = """
import torch, semcomp_ext
from semcomp_ext._ops import has_kernel
info = semcomp_ext.build_info()
assert has_kernel("infonce_fwd", "cuda"), f"no CUDA kernels in this build: {info}"
a = torch.nn.functional.normalize(torch.randn(70, 33, device="cuda"), dim=1)
loss, r, c = torch.ops.semcomp.infonce_fwd(a, a, torch.tensor(2.0, device="cuda"), 0)
ref = torch.logsumexp(2.0 * a.double() @ a.double().T, 1)
err = ((r.double() - ref).abs().max() / ref.abs().max()).item()
assert err < 1e-5, f"CUDA infonce_fwd is off by {err:.2e} (relative)"
try:
    torch.ops.semcomp.infonce_fwd(a, a[:3], torch.tensor(2.0, device="cuda"), 0)
except (ValueError, RuntimeError) as exc:
    assert "infonce_fwd" in str(exc), str(exc)
else:
    raise SystemExit("CUDA infonce_fwd accepted row counts 70 and 3")
torch.cuda.synchronize()
print("CUDA kernels run:", torch.cuda.get_device_name(), "archs", info["cuda_archs"], "torch", info["torch_runtime"])
"""


def _child(code: str) -> int:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-2000:])
        print(f"native_error_check: the child exited with {proc.returncode}"
              + (" (killed by a signal: a libstdc++ mismatch; rebuild with the GCC torch was built with, "
                 "e.g. CXX=/usr/bin/g++)" if proc.returncode < 0 else ""))
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a != "--cuda" for a in argv):
        print(f"native_error_check: unknown arguments {argv} (only --cuda)", file=sys.stderr)
        return 2
    rc = _child(CHILD)
    if rc == 0 and "--cuda" in argv:
        rc = _child(CUDA_CHILD)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
