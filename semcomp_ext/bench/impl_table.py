"""The table behind impl="auto" (semcomp_ext/kernel_choice.py) from GPU timing results:

    python -m benchmarks.impl_table benchmarks/results/timing_h100.json ...   # writes the packaged table
    python -m benchmarks.impl_table RESULTS.json --out /tmp/table.json --margin 0.05

Per op family (infonce, sigmoid), device compute capability ("9.0"), dtype and (N, D) bucket
(powers of two: round(log2 N), round(log2 D); kernel_choice.shape_bucket), it keeps the fastest
measured implementation only when it takes at least `margin` (default 5%) less time than gemm,
else gemm; a bucket where gemm was not measured keeps gemm. Several measurements of one
implementation in a bucket: the fastest counts. Every entry records the times it compared and,
per implementation, the results file, commit and date the time came from. The table holds only
what the given files measured: pass every file that should count (it is rewritten whole,
atomically). Devices, dtypes and buckets it does not name choose gemm.

Results files read:
  * `python -m benchmarks.gpu_timing --out ...` ({"device", "env", "capability", "infonce": [...],
    "siglip": [...]}): every row names its implementation ("impl"); SigLIP rows without one come
    from runs before SigLIP had a choice, when it ran gemm.
  * `semcomp bench infonce --json` ({"benchmark": "infonce fwd+bwd", "env", "rows"}): rows with
    an "impl" field, "semcomp_tile" rows (tile), and rows of methods mapped by --method-impl
    (e.g. `--method-impl semcomp=gemm` for runs made before impl="auto" read this table, when
    the "semcomp" method ran gemm).
The compute capability comes from the file ("capability", or env["capability"]), else from the
device name for a few known GPUs, else --capability.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from ..kernel_choice import FALLBACK, IMPLS, TABLE_FORMAT, shape_bucket, table_path

DEFAULT_MARGIN = 0.05
# GPU name tokens -> compute capability, for result files that predate recording it
KNOWN_CAPABILITY = {"H100": "9.0", "H200": "9.0", "GH200": "9.0", "H800": "9.0", "H20": "9.0",
                    "A100": "8.0", "A800": "8.0", "A30": "8.0", "A10": "8.6", "A40": "8.6",
                    "L4": "8.9", "L40": "8.9", "L40S": "8.9"}
BENCH_METHOD_IMPL = {"semcomp_tile": "tile", "semcomp_mma": "mma", "semcomp_wgmma": "wgmma"}


def _capability(res: dict, path: str, override: str | None) -> str:
    if override:
        return override
    env = res.get("env") or {}
    cap = res.get("capability") or env.get("capability")
    if isinstance(cap, (list, tuple)):
        cap = f"{cap[0]}.{cap[1]}"
    if cap:
        return str(cap)
    name = env.get("device_name") or res.get("device") or ""
    for token in name.replace("-", " ").split():
        if token in KNOWN_CAPABILITY:
            return KNOWN_CAPABILITY[token]
    raise ValueError(f"{path}: no compute capability recorded for device {name!r}; pass --capability X.Y")


def _source(path: str) -> str:
    """The results file as a path relative to the working directory when it lies below it."""
    rel = os.path.relpath(os.path.abspath(path))
    return path if rel.startswith("..") else rel


def measurements(path: str, *, capability: str | None = None, method_impl: dict | None = None) -> list[dict]:
    """The CUDA timings of one results file as dicts (op, impl, capability, dtype, n, d, ms,
    source, commit, date); CPU files give none."""
    with open(path) as f:
        res = json.load(f)
    if not isinstance(res, dict):
        raise ValueError(f"{path}: not a timing results file (a JSON object)")
    env = res.get("env") or {}
    if env.get("device", "cuda") == "cpu" or res.get("device") == "cpu":
        return []
    base = {"source": _source(path), "commit": env.get("git_commit", ""), "date": env.get("date", "")}
    out = []

    def add(op, impl, row, ms):
        if impl not in IMPLS[op] or row.get("dtype") is None or not ms or ms <= 0:
            return
        out.append(dict(base, op=op, impl=impl, dtype=row["dtype"], n=int(row["n"]), d=int(row["d"]), ms=float(ms),
                        capability=cap))

    if "infonce" in res or "siglip" in res:  # benchmarks.gpu_timing
        cap = _capability(res, path, capability)
        for row in res.get("infonce", []):
            add("infonce", row.get("impl"), row, row.get("median_ms"))
        for row in res.get("siglip", []):
            add("sigmoid", row.get("impl", "gemm"), row, row.get("median_ms"))
    elif str(res.get("benchmark", "")).startswith("infonce") and "rows" in res:  # semcomp bench infonce
        cap = _capability(res, path, capability)
        methods = dict(BENCH_METHOD_IMPL, **(method_impl or {}))
        for row in res["rows"]:
            if row.get("device", env.get("device")) != "cuda":
                continue
            impl = row.get("impl") or methods.get(row.get("method"))
            if impl:
                add("infonce", impl, row, 1e3 * row["median_s"] if row.get("median_s") else None)
    else:
        raise ValueError(f"{path}: neither a benchmarks.gpu_timing nor a `semcomp bench infonce` results file")
    return out


def choose(times: dict, margin: float) -> tuple[str, str]:
    """(implementation, reason) for one bucket's best time per implementation (ms): the fastest
    when it takes at least `margin` less time than gemm, else gemm."""
    if FALLBACK not in times:
        return FALLBACK, "gemm not measured here: kept"
    best = min(times, key=lambda i: (times[i], i != FALLBACK))
    if best != FALLBACK and times[best] <= (1.0 - margin) * times[FALLBACK]:
        return best, f"{best} {times[best]:.4g} ms <= (1 - {margin:g}) x gemm {times[FALLBACK]:.4g} ms"
    if len(times) == 1:
        return FALLBACK, "only gemm measured"
    if best == FALLBACK:
        return FALLBACK, "gemm fastest"
    return FALLBACK, f"{best} {times[best]:.4g} ms within {margin:g} of gemm {times[FALLBACK]:.4g} ms: gemm kept"


def _range(k: int) -> list[int]:
    """[lo, hi): the integers of bucket k."""
    return [math.ceil(2.0 ** (k - 0.5)), math.ceil(2.0 ** (k + 0.5))]


def build_table(rows: list[dict], margin: float = DEFAULT_MARGIN, sources: list[str] | None = None) -> dict:
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"impl_table: margin must be in [0, 1), got {margin}")
    buckets: dict = {}
    for r in rows:
        key = (r["op"], r["capability"], r["dtype"], shape_bucket(r["n"]), shape_bucket(r["d"]))
        best = buckets.setdefault(key, {})
        if r["impl"] not in best or r["ms"] < best[r["impl"]]["ms"]:
            best[r["impl"]] = r
    ops: dict = {}
    for (op, cap, dtype, nb, db), best in sorted(buckets.items()):
        times = {i: r["ms"] for i, r in sorted(best.items())}
        impl, reason = choose(times, margin)
        chosen = best.get(impl) or next(iter(best.values()))
        ops.setdefault(op, {}).setdefault(cap, {}).setdefault(dtype, []).append({
            "n_bucket": nb, "d_bucket": db, "n_range": _range(nb), "d_range": _range(db),
            "impl": impl, "reason": reason, "times_ms": times,
            "source": chosen["source"], "commit": chosen["commit"],
            "measured": {i: {"n": r["n"], "d": r["d"], "source": r["source"], "commit": r["commit"], "date": r["date"]}
                         for i, r in sorted(best.items())},
        })
    return {
        "format": TABLE_FORMAT,
        "about": ("CUDA implementation chosen by impl='auto' per op family, compute capability, dtype and "
                  "(N, D) bucket (round(log2 N), round(log2 D)); anything not listed runs gemm. Written by "
                  "python -m benchmarks.impl_table; see semcomp_ext/kernel_choice.py."),
        "margin": margin,
        "fallback": FALLBACK,
        "sources": sorted(set(sources or [r["source"] for r in rows])),
        "ops": ops,
    }


def write_table(table: dict, path: str | os.PathLike) -> None:
    """Atomically (a temp file in the same folder, renamed over path)."""
    from ..compress.atomic import write_json_atomic

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(str(path), table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.impl_table", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="timing results JSON files")
    p.add_argument("--out", default=None, help=f"table path (default: the packaged {table_path()})")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help="keep gemm unless another implementation takes at least this fraction less time (0.05)")
    p.add_argument("--capability", default=None, help="X.Y for files that do not record it")
    p.add_argument("--method-impl", action="append", default=[], metavar="METHOD=IMPL",
                   help="bench rows of METHOD count as IMPL (e.g. semcomp=gemm for runs before the table)")
    args = p.parse_args(argv)
    method_impl = {}
    for item in args.method_impl:
        method, _, impl = item.partition("=")
        if not method or impl not in IMPLS["infonce"]:
            p.error(f"--method-impl must be METHOD=IMPL with IMPL one of {IMPLS['infonce']}, got {item!r}")
        method_impl[method] = impl
    rows = []
    try:
        for path in args.results:
            rows += measurements(path, capability=args.capability, method_impl=method_impl)
        if not rows:
            raise ValueError("no CUDA timings with a named implementation in the given files; table not written")
        table = build_table(rows, args.margin, [_source(r) for r in args.results])
    except (OSError, ValueError) as exc:
        print(f"impl_table: {exc}", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else table_path()
    write_table(table, out)
    n = sum(len(e) for op in table["ops"].values() for cap in op.values() for e in cap.values())
    print(f"impl_table: {len(rows)} timings from {len(args.results)} files -> {n} buckets, {out}")
    for op, caps in table["ops"].items():
        for cap, dtypes in caps.items():
            for dtype, entries in dtypes.items():
                for e in entries:
                    print(f"  {op} {cap} {dtype} N~2^{e['n_bucket']} D~2^{e['d_bucket']}: {e['impl']} ({e['reason']})")
    return 0
