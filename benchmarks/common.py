"""Shared benchmark helpers: environment record, timing, peak memory, JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def environment(device: str = "cpu") -> dict:
    try:
        commit = os.environ.get("SEMCOMP_GIT_COMMIT") or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        "device": device,
    }
    if device.startswith("cuda"):
        import semcomp_ext

        env["device_name"] = torch.cuda.get_device_name()
        env["infonce_dk_accumulate"] = semcomp_ext.build_info()["infonce_dk_accumulate"]
    return env


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn, device: str = "cpu", repeats: int = 5, warmup: int = 1) -> dict:
    """Median and spread of wall time over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_bytes(fn) -> int:
    """Peak resident memory of one call of fn above the resident memory before it (Linux):
    VmHWM is reset through /proc/self/clear_refs, so earlier peaks do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def in_subprocess(module: str, args: list[str]) -> dict:
    """Run `python -m benchmarks.<module> --child ARGS` and parse its last JSON line (a fresh
    process per measurement so allocator caches of other methods do not interfere)."""
    # A fixed mmap threshold makes glibc map (and unmap on free) every block >= 64 KiB, so
    # resident memory follows live allocations; with its default dynamic threshold, blocks up
    # to 32 MiB are recycled from an already-resident heap and would not show in VmHWM.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", "--child", *args], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent.parent, check=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def write_result(name: str, payload: dict) -> Path:
    """Write payload as JSON to benchmarks/results/<name>, or to `name` if it is a path."""
    path = Path(name) if os.sep in str(name) else RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
