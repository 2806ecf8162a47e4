"""Segment mean (centroids) and column gather (RFS) throughput vs their torch peers.

GB/s counts bytes read plus bytes written once (x, ids, output), the memory-bound floor.
Inputs are random (never zeros); every method is checked against the others before timing.

    python -m benchmarks.bench_segment_gather                     # CPU defaults
    python -m benchmarks.bench_segment_gather --device cuda --n 4194304 --d 512
"""

from __future__ import annotations

import argparse

import torch

try:
    from .common import environment, median_time, write_result
except ImportError:
    from common import environment, median_time, write_result


def copy_bandwidth(x: torch.Tensor, device: str) -> float:
    """Measured copy bandwidth (read + write) of a tensor the size of x: the ceiling."""
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device, repeats=5)["median_s"]
    return 2 * x.numel() * x.element_size() / t / 1e9


def bench_segment(x, groups: int, device: str, repeats: int) -> list[dict]:
    import semcomp_ext as sc

    n, d = x.shape
    ids = torch.randint(0, groups, (n,), device=device)
    sorted_ids = ids.sort().values
    ref = torch.zeros(groups, d, device=device, dtype=torch.float32).index_add_(0, ids, x.float()) / torch.bincount(ids, minlength=groups).clamp(min=1).unsqueeze(1)
    tol = 1e-4 if x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(sc.centroids(x, ids, groups).float(), ref, rtol=tol, atol=tol)
    nbytes = x.numel() * x.element_size() + ids.numel() * 8 + groups * d * x.element_size()
    cases = {
        "semcomp_unsorted": lambda: sc.centroids(x, ids, groups),
        "semcomp_sorted": lambda: sc.centroids(x, sorted_ids, groups),
        "torch_index_add": lambda: torch.zeros(groups, d, device=device, dtype=x.dtype).index_add_(0, ids, x)
        / torch.bincount(ids, minlength=groups).clamp(min=1).unsqueeze(1),
        "torch_scatter_reduce": lambda: torch.zeros(groups, d, device=device, dtype=x.dtype).scatter_reduce_(
            0, ids.unsqueeze(1).expand(-1, d), x, "mean", include_self=False),
    }
    rows = []
    for name, fn in cases.items():
        t = median_time(fn, device, repeats=repeats)
        rows.append({"op": "segment_mean", "method": name, "n": n, "d": d, "groups": groups, **t,
                     "gb_per_s": nbytes / t["median_s"] / 1e9})
    return rows


def bench_gather(x, keep_frac: float, device: str, repeats: int) -> list[dict]:
    import semcomp_ext as sc

    n, d = x.shape
    sel = sc.RandomFeatureSelector(d, keep=max(1, round(keep_frac * d)), seed=0)
    idx = sel.index.to(device)
    torch.testing.assert_close(sc.select_features(x, idx), x.index_select(1, idx))
    nbytes = x.numel() * x.element_size() + n * idx.numel() * x.element_size()  # reads whole rows
    rows = []
    for name, fn in {"semcomp": lambda: sc.select_features(x, idx), "torch_index_select": lambda: x.index_select(1, idx)}.items():
        t = median_time(fn, device, repeats=repeats)
        rows.append({"op": "gather_columns", "method": name, "n": n, "d": d, "keep": idx.numel(), **t,
                     "gb_per_s": nbytes / t["median_s"] / 1e9})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=1 << 20)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--groups", type=int, nargs="+", default=[1000, 1 << 19])
    p.add_argument("--keep", type=float, nargs="+", default=[0.05, 0.25, 0.5])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    x = torch.randn(args.n, args.d, device=args.device).to(getattr(torch, args.dtype))
    ceiling = copy_bandwidth(x, args.device)
    rows = []
    for g in args.groups:
        rows += bench_segment(x, g, args.device, args.repeats)
    for k in args.keep:
        rows += bench_gather(x, k, args.device, args.repeats)
    for r in rows:
        r["fraction_of_copy_bw"] = r["gb_per_s"] / ceiling
        extra = f"groups={r['groups']}" if "groups" in r else f"keep={r['keep']}"
        print(f"{r['op']:<15}{extra:<15}{r['method']:<22}{r['median_s'] * 1e3:9.1f} ms {r['gb_per_s']:7.2f} GB/s "
              f"({r['fraction_of_copy_bw']:.0%} of copy)")
    suffix = "" if args.dtype == "float32" else f"_{args.dtype}"
    name = args.out or f"segment_gather_{args.device.split(':')[0]}{suffix}.json"
    path = write_result(name, {"benchmark": "segment mean + column gather", "dtype": args.dtype,
                               "copy_bandwidth_gb_per_s": ceiling,
                               "env": environment(args.device), "rows": rows})
    print(f"copy bandwidth {ceiling:.2f} GB/s; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
