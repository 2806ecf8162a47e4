"""Segment mean (centroids) and column gather (random feature selection) against their torch
peers: index_add_ / scatter_reduce_ for the mean, index_select for the gather.

GB/s counts bytes read plus bytes written once (x, ids, output; for the gather only the cache
lines of x that hold a kept column): the memory-bound floor, to be compared with the copy
bandwidth measured once per run at the size of the run's smallest working set (run.py), so that
a case served from a cache is compared with a copy served from the same level. Inputs are random (never zeros); every method is
checked against the reference before it is timed.
"""

from __future__ import annotations

import torch

from .timing import interleaved_times, is_cuda, peak_extra_bytes, time_call

SEGMENT_METHODS = ("semcomp_unsorted", "semcomp_sorted", "torch_index_add", "torch_scatter_reduce")
GATHER_METHODS = ("semcomp", "torch_index_select")


def make_x(n: int, d: int, dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    gen_dev = "cuda" if str(device).startswith("cuda") else "cpu"  # large GPU inputs made on the GPU
    g = torch.Generator(device=gen_dev).manual_seed(seed)
    return torch.randn(n, d, generator=g, device=gen_dev).to(device=device, dtype=dtype)


def segment_bytes(n: int, d: int, groups: int, element_size: int) -> int:
    """Bytes a segment mean must move at least: x read, int64 ids read, the means written."""
    return n * d * element_size + n * 8 + groups * d * element_size


def gather_bytes(n: int, d: int, index: torch.Tensor, element_size: int, line: int = 64) -> int:
    """Bytes a column gather moves: of each row of x, the cache lines that hold a kept column
    (read; whole lines, as the memory system moves them), and the (N, K) result (written)."""
    lines = torch.unique(index.detach().cpu().long() * element_size // line).numel()
    return n * min(d * element_size, lines * line) + n * index.numel() * element_size


def working_set_bytes(op: str, n: int, d: int, element_size: int, *, groups: int = 0, keep: float = 0.0) -> int:
    """Upper bound of the bytes one call of a memory-bound op moves (gather: whole rows read), known
    before its inputs exist: what the run's copy ceiling is sized by."""
    if op == "segment":
        return segment_bytes(n, d, groups, element_size)
    return n * d * element_size + n * max(1, round(keep * d)) * element_size


def _segment_methods(x, ids, sorted_ids, groups: int):
    import semcomp_ext as sc

    d = x.shape[1]

    def index_add():
        return torch.zeros(groups, d, device=x.device, dtype=x.dtype).index_add_(0, ids, x) / torch.bincount(
            ids, minlength=groups).clamp(min=1).unsqueeze(1)

    def scatter_reduce():
        return torch.zeros(groups, d, device=x.device, dtype=x.dtype).scatter_reduce_(
            0, ids.unsqueeze(1).expand(-1, d), x, "mean", include_self=False)

    return {
        "semcomp_unsorted": lambda: sc.centroids(x, ids, groups),
        "semcomp_sorted": lambda: sc.centroids(x, sorted_ids, groups),
        "torch_index_add": index_add,
        "torch_scatter_reduce": scatter_reduce,
    }


def _run_rows(cases: dict, expected, base: dict, nbytes: int, out_bytes: int, device: str,
              repeats: int, tol: float, memory: bool, progress) -> list[dict]:
    """Check every method against the reference, time them (CPU: in shared rounds, see
    interleaved_times; CUDA: each by events), then measure each one's peak extra memory."""
    rows, ok = {}, {}

    def fail(row, exc):
        row["error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"

    for name, fn in cases.items():
        row = rows[name] = dict(base, method=name)
        try:
            got = fn()
            want = expected[name] if isinstance(expected, dict) else expected
            torch.testing.assert_close(got.to(want.dtype), want, rtol=tol, atol=tol)
            del got
            if is_cuda(device):
                row.update(time_call(fn, device, repeats=repeats))
            ok[name] = fn
        except Exception as exc:  # noqa: BLE001  (recorded in the results and the table)
            fail(row, exc)
    if not is_cuda(device):
        timed, errors = interleaved_times(ok, device, repeats)
        for name, exc in errors.items():
            fail(rows[name], exc)
            del ok[name]
        for name, t in timed.items():
            rows[name].update(t)
    for name in cases:
        row = rows[name]
        try:
            if name in ok:
                row["gb_per_s"] = nbytes / row["median_s"] / 1e9
                if memory:
                    peak = peak_extra_bytes(ok[name], device)
                    if peak is not None:
                        row.update(peak_bytes=peak, extra_bytes=max(0, peak - out_bytes))
        except Exception as exc:  # noqa: BLE001
            fail(row, exc)
        finally:
            if progress is not None:
                progress(name)
    return list(rows.values())


def bench_segment(x: torch.Tensor, groups: int, device: str, repeats: int, *, methods=SEGMENT_METHODS,
                  memory: bool = True, progress=None, seed: int = 0) -> list[dict]:
    """Segment mean of x (N, D) over `groups` random groups, every method; rows with time, GB/s
    and peak extra memory (above the returned means)."""
    n, d = x.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, groups, (n,), generator=g).to(device)
    sorted_ids = ids.sort().values
    def mean(i):  # fp32 (fp64 for fp64) reference
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.zeros(groups, d, device=device, dtype=acc).index_add_(0, i, x.to(acc)) / torch.bincount(
            i, minlength=groups).clamp(min=1).unsqueeze(1)

    # the sorted case groups the same rows by the sorted ids (same sizes, contiguous groups)
    expected = {m: mean(sorted_ids if m == "semcomp_sorted" else ids) for m in methods}
    tol = 1e-4 if x.dtype in (torch.float32, torch.float64) else 1e-2
    all_cases = _segment_methods(x, ids, sorted_ids, groups)
    cases = {m: all_cases[m] for m in methods}
    base = {"op": "segment_mean", "n": n, "d": d, "groups": groups, "dtype": str(x.dtype).replace("torch.", ""),
            "device": device}
    return _run_rows(cases, expected, base, segment_bytes(n, d, groups, x.element_size()),
                     groups * d * x.element_size(), device, repeats, tol, memory, progress)


def bench_gather(x: torch.Tensor, keep_frac: float, device: str, repeats: int, *, methods=GATHER_METHODS,
                 memory: bool = True, progress=None) -> list[dict]:
    """Column gather of round(keep_frac * D) random columns of x (N, D), every method."""
    import semcomp_ext as sc

    n, d = x.shape
    sel = sc.RandomFeatureSelector(d, keep=max(1, round(keep_frac * d)), seed=0)
    idx = sel.index.to(device)
    expected = x.index_select(1, idx).float()
    all_cases = {"semcomp": lambda: sc.select_features(x, idx), "torch_index_select": lambda: x.index_select(1, idx)}
    cases = {m: all_cases[m] for m in methods}
    k = idx.numel()
    base = {"op": "gather_columns", "n": n, "d": d, "keep": k, "dtype": str(x.dtype).replace("torch.", ""),
            "device": device}
    return _run_rows(cases, expected, base, gather_bytes(n, d, idx, x.element_size()), n * k * x.element_size(),
                     device, repeats, 0.0, memory, progress)
