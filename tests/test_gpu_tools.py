"""The GPU validation tools run on CPU too, so CI keeps them working between GPU sessions:
benchmarks/gpu_check.sh --dry-run, the sanitizer workload (gpu_smoke) on the CPU backend,
and the native-error check run right after every GPU build."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_lists_every_stage(tmp_path):
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--dry-run"],
                         capture_output=True, text=True, check=True).stdout
    for stage in ("env", "build", "tests", "memcheck", "racecheck", "synccheck", "bench", "benchcli"):
        assert f"[dry-run] {stage} " in out, out
    assert "SEMCOMP_CUDA=ON" in out and "native_error_check" in out and "tests/test_cuda.py" in out
    assert "tests/test_compress_device.py" in out  # compress --device cuda vs cpu, byte for byte
    summary = (tmp_path / "summary.txt").read_text().split("\n")
    assert "bench dry-run" in summary


def test_gpu_check_rejects_unknown_option(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(tmp_path), "--bogus"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --bogus" in proc.stderr


def _module(name, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env)


def test_gpu_smoke_workload_passes_on_cpu():
    proc = _module("gpu_smoke", "--device", "cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gpu_smoke on cpu: OK" in proc.stdout


def test_native_errors_raise_instead_of_crashing():
    proc = _module("native_error_check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "native errors raise: infonce_fwd" in proc.stdout
