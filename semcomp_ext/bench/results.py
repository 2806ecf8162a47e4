"""Pure functions over benchmark rows: ratios to the peers, fractions of the ceilings, the
printed table, the markdown table and the throughput plot. No torch here (cheap to import,
testable without measuring)."""

from __future__ import annotations

import json
import math
from pathlib import Path

INFONCE_METHODS = ("semcomp", "semcomp_tile", "semcomp_mma", "semcomp_wgmma", "open_clip", "inf_cl", "reference", "compiled_reference")
# what makes two rows the same case (they differ only by method)
CASE_KEYS = ("op", "n", "d", "dtype", "device", "groups", "keep")
OPS = {  # op -> (throughput field, unit, ceiling field)
    "infonce": ("tflops", "TFLOP/s", "matmul_tflops"),
    "segment_mean": ("gb_per_s", "GB/s", "copy_gb_per_s"),
    "gather_columns": ("gb_per_s", "GB/s", "copy_gb_per_s"),
}


def is_ours(method: str) -> bool:
    return method.startswith("semcomp")


def case_key(row: dict) -> tuple:
    return tuple(row.get(k) for k in CASE_KEYS)


def add_ratios(rows: list[dict]) -> list[dict]:
    """For every timed semcomp row: time_ratio[peer] = its median time / the peer's median time
    in the same case (< 1: semcomp is faster), and memory_ratio[peer] likewise for the peak
    extra memory where both were measured. Rows with an error are neither given nor used."""
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            cases.setdefault(case_key(r), []).append(r)
    for group in cases.values():
        peers = [p for p in group if not is_ours(p["method"])]
        for r in group:
            if not is_ours(r["method"]):
                continue
            r["time_ratio"] = {p["method"]: r["median_s"] / p["median_s"] for p in peers}
            mem = {p["method"]: r["extra_bytes"] / max(1, p["extra_bytes"]) for p in peers
                   if r.get("extra_bytes") is not None and p.get("extra_bytes") is not None}
            if mem:
                r["memory_ratio"] = mem
    return rows


def add_fractions(rows: list[dict], ceilings: dict) -> list[dict]:
    """throughput, unit and fraction_of_ceiling (throughput / the measured ceiling) per row."""
    for r in rows:
        if "error" in r or r.get("op") not in OPS:
            continue
        field, unit, ceiling = OPS[r["op"]]
        r["throughput"], r["unit"] = r[field], unit
        if ceilings.get(ceiling):
            r["fraction_of_ceiling"] = r[field] / ceilings[ceiling]
    return rows


def _case_text(r: dict) -> str:
    extra = f" g={r['groups']}" if "groups" in r else (f" k={r['keep']}" if "keep" in r else "")
    return f"{r['n']}x{r['d']}{extra}"


def _mib(b) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _ratios_text(r: dict) -> str:
    tr = r.get("time_ratio") or {}
    return ", ".join(f"{v:.2f}x {k}" for k, v in tr.items())


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the results table (shared by the printed and the markdown form)."""
    header = ["op", "N x D", "dtype", "method", "ms", "throughput", "of ceiling", "extra MiB", "time vs peers"]
    cells = []
    for r in rows:
        if "error" in r:
            cells.append([r.get("op", ""), _case_text(r), r.get("dtype", ""), r["method"], "error",
                          r["error"][:48], "", "", ""])
            continue
        frac = r.get("fraction_of_ceiling")
        cells.append([r["op"], _case_text(r), r.get("dtype", ""), r["method"], f"{r['median_s'] * 1e3:.2f}",
                      f"{r['throughput']:.3g} {r['unit']}" if "throughput" in r else "",
                      "" if frac is None else f"{frac:.0%}", _mib(r.get("extra_bytes")), _ratios_text(r)])
    return header, cells


def format_table(rows: list[dict]) -> str:
    header, cells = table_rows(rows)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *cells)]
    line = lambda cs: "  ".join(str(c).ljust(w) for c, w in zip(cs, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, cells)])


def ceilings_text(c: dict) -> str:
    return (f"ceilings: matmul {c['matmul_tflops']:.3g} TFLOP/s ({c['dtype']}, n={c['matmul_n']}), "
            f"copy {c['copy_gb_per_s']:.3g} GB/s ({c['copy_bytes'] / 2**20:.3g} MiB)")


def markdown(payload: dict, source: str = "") -> str:
    """The results of `semcomp bench --json` as a markdown paragraph and table."""
    env, c = payload["env"], payload["ceilings"]
    load0, load1 = env.get("load_average_start"), env.get("load_average")
    ops = "all" if len(payload["ops"]) == 3 else " ".join(payload["ops"])
    head = (f"`semcomp bench {ops} --device {env['device']}` — "
            f"{env.get('device_name', env['machine'])}, torch {env['torch']}, commit {env['git_commit']}, "
            f"{env['date'][:10]}, {payload.get('wall_s', float('nan')):.0f} s of measurement"
            + (f", 1-minute load average {load0[0]:.1f} at the start" if load0 else "")
            + (f" and {load1[0]:.1f} at the end" if load0 and load1 else "")
            + (f" (`{source}`)" if source else "") + f". Measured {ceilings_text(c)}.\n")
    header, cells = table_rows(payload["rows"])
    align = ["---", "---:", "---", "---", "---:", "---:", "---:", "---:", "---"]
    out = [head, "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(x).replace("|", "/") for x in row) + " |" for row in cells]
    return "\n".join(out) + "\n"


def read_payload(path) -> dict:
    """A `semcomp bench --json` file, checked to be one (ValueError otherwise)."""
    try:
        payload = json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(payload, dict) or not {"rows", "ceilings", "env", "ops"} <= payload.keys():
        raise ValueError(f"{path} is not a `semcomp bench --json` result (needs rows, ceilings, env, ops)")
    return payload


def series(rows: list[dict]) -> dict:
    """{op: {label: [(n, throughput), ...]}} for the plot: one line per method (and per
    group count / kept columns where an op was run with several)."""
    out: dict[str, dict[str, list]] = {}
    keys = ("groups", "keep", "d", "dtype")
    seen: dict[str, dict[str, set]] = {}
    for r in rows:
        for k in keys:
            seen.setdefault(r.get("op"), {}).setdefault(k, set()).add(r.get(k))
    for r in rows:
        if "error" in r or "throughput" not in r:
            continue
        varying = [k for k in keys if len(seen[r["op"]][k]) > 1]
        label = r["method"] + "".join(f" {k}={r.get(k)}" for k in varying)
        out.setdefault(r["op"], {}).setdefault(label, []).append((r["n"], r["throughput"]))
    for op in out.values():
        for pts in op.values():
            pts.sort()
    return out


def plot(payload: dict, path) -> Path:
    """Throughput vs N per method, one panel per op, with the measured ceiling as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(payload["rows"])
    if not data:
        raise ValueError("nothing to plot: every method failed")
    c = payload["ceilings"]
    fig, axes = plt.subplots(1, len(data), figsize=(5.2 * len(data), 4.2), squeeze=False)
    for ax, (op, lines) in zip(axes[0], data.items()):
        field, unit, ceiling = OPS[op]
        for label, pts in lines.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                    linestyle="-" if is_ours(label) else "--")
        if c.get(ceiling):
            ax.axhline(c[ceiling], color="k", linestyle=":", linewidth=1,
                       label=f"measured {'matmul' if unit == 'TFLOP/s' else 'copy'} {c[ceiling]:.3g} {unit}")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("N (rows)")
        ax.set_ylabel(unit)
        ax.set_title(op)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    env = payload["env"]
    fig.suptitle(f"semcomp bench — {env.get('device_name', env['machine'])}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def nan_to_none(x):
    """JSON has no NaN/Inf: such floats are written as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [nan_to_none(v) for v in x]
    return x


def write_json(payload: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nan_to_none(payload), indent=2) + "\n")
    return path
