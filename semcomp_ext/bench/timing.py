"""Timing, peak memory and the machine's own ceilings, for every semcomp benchmark.

CPU: wall time (perf_counter) of each call, median over repeats after warm-up calls.
CUDA: CUDA events around each call (synchronised), median over repeats, inputs optionally
rotated over several sets so that a set is not served from L2.

Peak extra memory of one call: on CUDA, ``max_memory_allocated`` above the allocation before
the call; on CPU (Linux), the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) above the resident set before the call. For the CPU figure to follow
live allocations, glibc must give large blocks back to the system when freed: call
:func:`prepare_cpu_memory_measurement` once, before the first tensor of the benchmark is made
(the measured call then runs with mmap for every block >= 64 KiB; timed calls do not).
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

L2_BYTES = 50 << 20  # an H100's L2; CUDA inputs are rotated over at least twice this

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_memory_ready = False


def is_cuda(device: str) -> bool:
    return str(device).startswith("cuda")


def sync(device: str) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def summarize(times: list[float]) -> dict:
    """The timing record of one measurement: median, min, max seconds and the repeat count."""
    if not times:
        raise ValueError("summarize: no times")
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def median_time(fn, device: str = "cpu", repeats: int = 5, warmup: int = 1) -> dict:
    """Wall time of fn() over `repeats` calls after `warmup` calls (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return summarize(times)


def interleaved_times(fns: dict, device: str, repeats: int, warmup: int = 1) -> tuple[dict, dict]:
    """Time of every fn in `fns` ({name: fn}) (CUDA events on CUDA, wall time on the CPU), taken
    in rounds (one call of each per round, after `warmup` calls of each), so that load from
    other processes on a shared machine falls on every method alike. Returns ({name: timing record}, {name: exception}) — a method that
    raises is dropped from the following rounds."""
    live, errors = dict(fns), {}

    def call(name):
        try:
            live[name]()
        except Exception as exc:  # noqa: BLE001  (reported per method by the caller)
            errors[name] = exc
            del live[name]

    for _ in range(warmup):
        for name in list(live):
            call(name)
    sync(device)
    times: dict[str, list] = {name: [] for name in live}
    for _ in range(repeats):
        for name in list(live):
            seconds = _seconds_of(lambda: call(name), device)
            if name in live:
                times[name].append(seconds)
    return {name: summarize(times[name]) for name in live}, errors


def _seconds_of(fn, device: str) -> float:
    """Seconds of one fn() call: CUDA events on CUDA (the GPU's own time), wall time on the CPU."""
    if is_cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cuda_median_time(fn, sets=(None,), repeats: int = 10, warmup: int = 2) -> dict:
    """Seconds of fn(set) by CUDA events, cycling through `sets` (inputs rotated past L2)."""
    sets = list(sets)
    for i in range(warmup):
        fn(sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn(sets[i % len(sets)])
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    return summarize(times)


def time_call(fn, device: str, repeats: int, warmup: int = 1) -> dict:
    """fn() timed the right way for the device: CUDA events on CUDA, wall time on CPU."""
    if is_cuda(device):
        return cuda_median_time(lambda _: fn(), repeats=repeats, warmup=max(warmup, 1))
    return median_time(fn, device, repeats=repeats, warmup=warmup)


# ---- memory ------------------------------------------------------------------------------

def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    import ctypes

    libc = ctypes.CDLL(None)
    return libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1


# Timing mode: glibc's dynamic mmap threshold fixed at the value it grows to once a large
# block has been freed (32 MiB, trim at twice that), so every method is timed under the same
# allocator behaviour. Memory mode (one measured call): every block >= 64 KiB is mapped with
# mmap and unmapped when freed, the heap trimmed on every free, so that the resident set
# follows live allocations; with the dynamic threshold, blocks up to 32 MiB are recycled from an
# already-resident heap and a call's peak would not show.
_TIMING_MODE = (32 << 20, 64 << 20)
_MEMORY_MODE = (64 << 10, 0)


def prepare_cpu_memory_measurement() -> bool:
    """Enable CPU peak-memory measurement in this process (glibc on Linux; returns whether it
    could be) and put the allocator in timing mode. Call once, before the benchmark's first
    tensor. Changes the allocator settings of the whole process (a benchmark process)."""
    global _memory_ready
    if _memory_ready:
        return True
    if not os.path.exists("/proc/self/clear_refs"):
        return False
    try:
        _memory_ready = _mallopt(*_TIMING_MODE)
    except (OSError, AttributeError):
        return False
    return _memory_ready


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_bytes(fn) -> int:
    """Peak resident memory of one call of fn above the resident memory before it (Linux):
    VmHWM is reset through /proc/self/clear_refs, so earlier peaks do not count. After
    prepare_cpu_memory_measurement(), the call runs in memory mode (see above) with the free
    heap pages returned to the system first."""
    if _memory_ready:
        import ctypes

        _mallopt(*_MEMORY_MODE)
        ctypes.CDLL(None).malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kib("VmRSS")
        fn()
        return max(0, _status_kib("VmHWM") - base) * 1024
    finally:
        if _memory_ready:
            _mallopt(*_TIMING_MODE)


def peak_extra_bytes(fn, device: str) -> int | None:
    """Peak memory of one call of fn above what was allocated before it; None where it cannot
    be measured (CPU without glibc/Linux /proc)."""
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not _memory_ready:
        return None
    return cpu_peak_extra_bytes(fn)


# ---- ceilings ------------------------------------------------------------------------------

def matmul_tflops(device: str, dtype: torch.dtype, n: int | None = None, min_call_s: float = 0.05,
                  max_n: int = 4096, repeats: int = 5) -> dict:
    """Measured matrix-product throughput (2 n^3 FLOP per n x n product, random data, best of
    the repeats) in the dtype: the ceiling of FLOP-bound ops. Without n, n doubles from 512 until one product
    takes min_call_s (or reaches max_n), so the measurement stays short on slow machines."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def mats(k):
        a = torch.randn(k, k, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(k, k, generator=gen).to(device=device, dtype=dtype)
        return a, b, torch.empty(k, k, device=device, dtype=dtype)

    if n is None:
        n = 512
        while n < max_n:
            a, b, c = mats(n)
            if time_call(lambda: torch.mm(a, b, out=c), device, repeats=1)["median_s"] >= min_call_s:
                break
            n *= 2
    a, b, c = mats(n)
    t = time_call(lambda: torch.mm(a, b, out=c), device, repeats=repeats, warmup=1 if not is_cuda(device) else 3)
    # a ceiling is what the machine can reach: the best of the repeats
    return {"matmul_tflops": 2 * n**3 / t["min_s"] / 1e12, "matmul_n": n, "matmul_s": t["min_s"]}


def copy_gb_per_s(device: str, nbytes: int, repeats: int | None = None) -> dict:
    """Measured copy bandwidth of a copy of nbytes, bytes read plus bytes written (best of the
    repeats): the ceiling of memory-bound ops. Short copies (a cache-sized ceiling) get more
    repeats by default (5 at 256 MiB and above, up to 50): their best is less noisy."""
    if repeats is None:
        repeats = max(5, min(50, (1 << 28) // max(nbytes, 1)))
    x = torch.rand(nbytes // 4, device=device)
    y = torch.empty_like(x)
    t = time_call(lambda: y.copy_(x), device, repeats=repeats, warmup=1 if not is_cuda(device) else 3)
    return {"copy_gb_per_s": 2 * x.numel() * 4 / t["min_s"] / 1e9, "copy_bytes": x.numel() * 4}


def ceilings(device: str, dtype: torch.dtype, *, copy_bytes: int | None = None, matmul_n: int | None = None) -> dict:
    """Both ceilings on the machine at hand: matmul TFLOP/s in `dtype` and copy GB/s of a copy of
    copy_bytes (default 256 MiB on the CPU, 2 GiB on CUDA; recorded as copy_bytes)."""
    cuda = is_cuda(device)
    out = {"dtype": str(dtype).replace("torch.", "")}
    out.update(matmul_tflops(device, dtype, n=matmul_n or (8192 if cuda else None)))
    out.update(copy_gb_per_s(device, copy_bytes or ((1 << 31) if cuda else (1 << 28))))
    return out


def gpu_ceilings(n: int = 8192, copy_bytes: int = 1 << 31) -> dict:
    """The GPU record written by gpu_check.sh: device properties, bf16 matmul, copy."""
    mm = matmul_tflops("cuda", torch.bfloat16, n=n, repeats=20)
    cp = copy_gb_per_s("cuda", copy_bytes, repeats=20)
    props = torch.cuda.get_device_properties(0)
    return {
        "device_name": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "multiprocessors": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bf16_matmul_tflops": mm["matmul_tflops"],
        "bf16_matmul_n": n,
        "copy_gb_per_s": cp["copy_gb_per_s"],
        "copy_bytes": cp["copy_bytes"],
    }


# ---- environment ---------------------------------------------------------------------------

def environment(device: str = "cpu") -> dict:
    """Date, commit, versions and the machine, recorded with every result."""
    try:
        commit = os.environ.get("SEMCOMP_GIT_COMMIT") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
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
    try:
        env["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if is_cuda(device):
        import semcomp_ext

        env["device_name"] = torch.cuda.get_device_name()
        env["infonce_dk_accumulate"] = semcomp_ext.build_info()["infonce_dk_accumulate"]
    return env
