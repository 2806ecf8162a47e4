"""The GPU validation tools run on CPU too, so CI keeps them working between GPU sessions:
benchmarks/gpu_check.sh's plan (--dry-run) and its budget, the sanitizer workload (gpu_smoke)
and the timing stage on the CPU backend, the native-error check run right after every GPU
build, and the prebuilt module's source stamp (tools/prebuild_gpu.sh)."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = ROOT / "benchmarks" / "gpu_check.sh"


def _check(tmp_path, *args):
    return subprocess.run(["bash", str(CHECK), str(tmp_path), "--dry-run", *args], capture_output=True, text=True)


def _plan(stdout):
    """[(priority, name, budget seconds, command)] from the dry run's plan lines."""
    rows = re.findall(r"^\[dry-run\] (P\d)\s+(\S+)\s+(\d+)s: (.*)$", stdout, flags=re.M)
    return [(p, n, int(b), c) for p, n, b, c in rows]


def test_window_plan_in_priority_order_within_budget(tmp_path):
    proc = _check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = _plan(proc.stdout)
    names = [n for _, n, _, _ in plan]
    assert names == ["env", "build", "native", "tests", "timing", "kernels", "memcheck", "racecheck",
                     "synccheck", "compile", "benchcli"]
    prios = [p for p, _, _, _ in plan]
    assert prios == sorted(prios), prios  # P0 stages first, then P1, then P2
    p01 = sum(b for p, _, b, _ in plan if p in ("P0", "P1"))
    assert p01 <= 480 and f"P0+P1 {p01}s" in proc.stdout
    cmd = {n: c for _, n, _, c in plan}
    assert cmd["build"] == "stage_build" and "native_error_check --cuda" in cmd["native"]
    # the CUDA parametrisations of the kernel tests, compile tests left to P2 / --full
    assert "-k 'cuda and not compile'" in cmd["tests"] and "tests/test_cuda.py" in cmd["tests"]
    assert "tests/test_compress_device.py" in cmd["tests"] and "tests/test_siglip.py" in cmd["tests"]
    assert "tests/test_cuda_impl_choice.py" in cmd["tests"]
    # every implementation that runs here is timed; the wgmma kernels are checked against mma, and
    # "cannot run here" (exit 2) is not a failure
    assert "gpu_timing" in cmd["timing"] and "--impls" not in cmd["timing"]
    assert "benchmarks.wgmma_check" in cmd["kernels"] and "--no-timing" in cmd["kernels"] and "[ $rc = 2 ] && rc=0" in cmd["kernels"]
    groups = "--only infonce_gemm infonce_tile infonce_mma infonce_wgmma sigmoid sigmoid_mma sigmoid_wgmma pair_mean"
    for tool in ("memcheck", "racecheck", "synccheck"):
        assert f"--tool {tool}" in cmd[tool] and groups in cmd[tool]
    assert "compile_reduce_overhead" in cmd["compile"]
    assert (tmp_path / "summary.txt").read_text().split("\n")[:2] == ["env dry-run", "build dry-run"]


def test_window_plan_over_budget_fails(tmp_path):
    proc = _check(tmp_path, "--budget", "tests=400")
    assert proc.returncode == 1 and "budgets sum to" in proc.stderr and "> 480s" in proc.stderr


def test_full_plan_has_the_rest(tmp_path):
    proc = _check(tmp_path, "--full")
    assert proc.returncode == 0, proc.stderr
    plan = _plan(proc.stdout)
    cmd = {n: c for _, n, _, c in plan}
    for stage in ("build", "compile", "kernels", "memory", "memcheck", "racecheck", "synccheck", "bench", "benchcli"):
        assert stage in cmd
    assert "benchmarks.wgmma_check" in cmd["kernels"] and "--no-timing" not in cmd["kernels"]
    # every sanitizer over every group, the whole benchmark sweep
    assert cmd["memcheck"].endswith("gpu_smoke --device cuda") and "-m benchmarks.run_all --device cuda" in cmd["bench"]


def test_stage_selection_and_bad_options(tmp_path):
    proc = _check(tmp_path, "--stages", "build tests")
    assert [n for _, n, _, _ in _plan(proc.stdout)] == ["build", "tests"]
    bad = subprocess.run(["bash", str(CHECK), str(tmp_path), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    bad = _check(tmp_path, "--budget", "tests")
    assert bad.returncode == 2 and "--budget takes NAME=SECONDS, got 'tests'" in bad.stderr


def _module(name, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)


def test_gpu_smoke_workload_passes_on_cpu():
    proc = _module("gpu_smoke", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_smoke on cpu: OK" in proc.stdout
    for group in ("infonce_gemm: OK", "sigmoid: OK", "pair_mean: OK", "segment: OK", "gather: OK",
                  "infonce_tile: CUDA only", "infonce_wgmma: CUDA only", "sigmoid_mma: CUDA only",
                  "sigmoid_wgmma: CUDA only"):
        assert group in proc.stdout, proc.stdout


def test_timing_stage_runs_on_cpu(tmp_path):
    out = tmp_path / "timing.json"
    proc = _module("gpu_timing", "--device", "cpu", "--shapes", "64x16:bfloat16", "--siglip", "48x8:float32",
                   "--rounds", "2", "--warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["env"]
    (row,) = res["infonce"]
    assert (row["n"], row["d"], row["dtype"], row["impl"]) == (64, 16, "bfloat16", "cpu") and row["median_ms"] > 0
    assert "extra_mib" in row and row["extra_mib"] is None  # measured on a GPU only
    (sig,) = res["siglip"]
    assert sig["ratio_to_infonce"] > 0 and sig["infonce_impl"] == "cpu"
    bad = _module("gpu_timing", "--device", "cpu", "--shapes", "64:bfloat16")
    assert bad.returncode == 2 and "shape must be NxD:dtype" in bad.stderr


def test_native_errors_raise_instead_of_crashing():
    proc = _module("native_error_check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "native errors raise: infonce_fwd" in proc.stdout


def test_native_check_fails_on_a_build_without_cuda_kernels():
    import torch

    from semcomp_ext._ops import has_kernel

    proc = _module("native_error_check", "--cuda")
    if torch.cuda.is_available() and has_kernel("infonce_fwd", "cuda"):
        assert proc.returncode == 0 and "CUDA kernels run" in proc.stdout, proc.stdout + proc.stderr
    else:
        assert proc.returncode == 1 and "no CUDA kernels in this build" in proc.stderr


def test_prebuilt_stamp_follows_the_sources(tmp_path):
    """The hash a prebuilt module is stamped with covers csrc and CMakeLists.txt: it is the
    same for the same tree and changes with any source file; --check refuses a tree without
    a matching module."""
    tree = tmp_path / "tree"
    (tree / "tools").mkdir(parents=True)
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    shutil.copy(ROOT / "CMakeLists.txt", tree)
    shutil.copy(ROOT / "tools" / "prebuild_gpu.sh", tree / "tools")
    script = ["bash", str(tree / "tools" / "prebuild_gpu.sh")]

    def hash_():
        return subprocess.run(script + ["--hash"], capture_output=True, text=True, check=True).stdout.strip()

    h1 = hash_()
    assert re.fullmatch(r"[0-9a-f]{16}", h1) and hash_() == h1
    assert subprocess.run(script + ["--check"], capture_output=True).returncode == 1  # nothing prebuilt
    pre = tree / ".gpu-build" / "prebuilt"
    pre.mkdir(parents=True)
    (pre / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\0")
    (pre / "stamp.txt").write_text(f"source={h1}\npython=3.12\n")
    assert subprocess.run(script + ["--check"], capture_output=True).returncode == 0
    with open(tree / "csrc" / "infonce" / "infonce_chunks.h", "a") as f:
        f.write("// changed\n")
    assert hash_() != h1
    assert subprocess.run(script + ["--check"], capture_output=True).returncode == 1


def test_every_file_the_window_names_exists():
    """A renamed test file or benchmark module would cost a GPU window: every tests/*.py,
    benchmarks.<module> and tools/ path that gpu_check.sh names is in the tree."""
    text = CHECK.read_text()
    named = set(re.findall(r"tests/\w+\.py", text)) | set(re.findall(r"tools/[\w/]+\.\w+", text))
    named |= {f"benchmarks/{m}.py" for m in re.findall(r"-m benchmarks\.(\w+)", text)}
    assert len(named) > 10
    assert not sorted(p for p in named if not (ROOT / p).is_file())
