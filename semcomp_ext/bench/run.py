"""One benchmark run: the ceilings, then every selected op at every size, as one payload
(what `semcomp bench --json` writes)."""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import torch

from . import infonce, segment_gather
from .results import add_fractions, add_ratios
from .timing import ceilings, environment, is_cuda, prepare_cpu_memory_measurement

OP_NAMES = ("infonce", "segment", "gather")
# Defaults sized so that `semcomp bench all --device cpu` takes well under a minute on 2 cores.
DEFAULT_SIZES = {
    ("infonce", "cpu"): [1024, 2048, 4096], ("infonce", "cuda"): [4096, 16384, 32768],
    ("segment", "cpu"): [1 << 16, 1 << 18, 1 << 20], ("segment", "cuda"): [1 << 20, 1 << 22],
    ("gather", "cpu"): [1 << 16, 1 << 18, 1 << 20], ("gather", "cuda"): [1 << 20, 1 << 22],
}
DEFAULT_D = {("infonce", "cpu"): 512, ("infonce", "cuda"): 512, ("segment", "cpu"): 128, ("segment", "cuda"): 512,
             ("gather", "cpu"): 128, ("gather", "cuda"): 512}


@dataclasses.dataclass
class BenchConfig:
    ops: tuple = OP_NAMES
    device: str = "cpu"
    dtype: str = "float32"
    sizes: tuple | None = None       # N values for every op; None: the per-op defaults
    d: int | None = None             # feature dimension; None: the per-op default
    groups: tuple = (1000,)          # segment mean: number of groups
    keep: tuple = (0.25,)            # gather: fraction of the columns kept
    repeats: int | None = None       # timed calls per method (after warm-up); None: 3 CPU, 10 CUDA
    methods: tuple | None = None     # InfoNCE methods; None: semcomp + the installed peers
    compile_reference: bool | None = None  # torch.compile of the reference; None: on CUDA only
    memory: bool = True
    quiet: bool = False

    def kind(self) -> str:
        return "cuda" if is_cuda(self.device) else "cpu"

    def sizes_for(self, op: str) -> list[int]:
        return list(self.sizes) if self.sizes else DEFAULT_SIZES[(op, self.kind())]

    def d_for(self, op: str) -> int:
        return self.d or DEFAULT_D[(op, self.kind())]

    def n_repeats(self) -> int:
        return self.repeats or (10 if self.kind() == "cuda" else 3)

    def infonce_methods(self) -> list[str]:
        if self.methods:
            return list(self.methods)
        return infonce.default_methods(self.device, self.dtype, self.compile_reference)


def _units(cfg: BenchConfig) -> int:
    n = 1  # ceilings
    if "infonce" in cfg.ops:
        n += len(cfg.sizes_for("infonce")) * len(cfg.infonce_methods())
    if "segment" in cfg.ops:
        n += len(cfg.sizes_for("segment")) * len(cfg.groups) * len(segment_gather.SEGMENT_METHODS)
    if "gather" in cfg.ops:
        n += len(cfg.sizes_for("gather")) * len(cfg.keep) * len(segment_gather.GATHER_METHODS)
    return n


_OP_ROW = {"infonce": "infonce", "segment": "segment_mean", "gather": "gather_columns"}


def _failed(op: str, n: int, d: int, cfg: BenchConfig, methods, exc: BaseException, progress, **extra) -> list[dict]:
    """Error rows for a case whose inputs could not be made (every method of it)."""
    msg = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    rows = []
    for m in methods:
        rows.append({"op": op, "method": m, "n": n, "d": d, "dtype": cfg.dtype, "device": cfg.device, **extra,
                     "error": msg})
        progress(m)
    return rows


def select_device(device: str) -> None:
    """"cuda:N" makes GPU N the current device (for every allocation and event); "cuda" keeps
    the current one."""
    if is_cuda(device):
        index = torch.device(device).index
        if index is not None:
            torch.cuda.set_device(index)


def copy_ceiling_bytes(cfg: BenchConfig) -> int | None:
    """Size of the run's one copy-bandwidth measurement: a copy that moves (reads plus writes) as
    many bytes as the smallest segment/gather case, so that no case is compared with a copy
    served from a slower memory level than its own (a small input stays in cache across the
    timed calls; a 256 MiB copy does not). None (the default size) without such cases."""
    es = torch.empty((), dtype=infonce.DTYPES[cfg.dtype]).element_size()
    sizes = []
    if "segment" in cfg.ops:
        sizes += [segment_gather.working_set_bytes("segment", n, cfg.d_for("segment"), es, groups=g)
                  for n in cfg.sizes_for("segment") for g in cfg.groups]
    if "gather" in cfg.ops:
        sizes += [segment_gather.working_set_bytes("gather", n, cfg.d_for("gather"), es, keep=k)
                  for n in cfg.sizes_for("gather") for k in cfg.keep]
    return max(1 << 16, min(sizes) // 2) if sizes else None


def _load():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run(cfg: BenchConfig) -> dict:
    """Measure; returns {"benchmark", "ops", "config", "env", "ceilings", "rows", "wall_s"}."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    load_start = _load()
    dtype = infonce.DTYPES[cfg.dtype]
    memory_ok = cfg.memory and (is_cuda(cfg.device) or prepare_cpu_memory_measurement())
    bar = tqdm(total=_units(cfg), desc="ceilings", unit="run", file=sys.stderr, disable=cfg.quiet, leave=False)

    def step(label):
        def progress(method):
            bar.set_postfix_str(method, refresh=False)
            bar.update(1)
        bar.set_description(label)
        return progress

    select_device(cfg.device)
    rows: list[dict] = []
    try:
        ceil = ceilings(cfg.device, dtype, copy_bytes=copy_ceiling_bytes(cfg))
        bar.update(1)
        if "infonce" in cfg.ops:
            d = cfg.d_for("infonce")
            methods = cfg.infonce_methods()
            for n in cfg.sizes_for("infonce"):
                progress = step(f"infonce N={n}")
                try:
                    rows += infonce.bench_case(n, d, cfg.dtype, cfg.device, methods, cfg.n_repeats(),
                                               memory=memory_ok, progress=progress)
                except (RuntimeError, MemoryError) as exc:  # the inputs themselves (out of memory)
                    rows += _failed("infonce", n, d, cfg, methods, exc, progress)
        # segment and gather read the same x: made once per (N, D)
        todo: dict[tuple, list[str]] = {}
        for op in ("segment", "gather"):
            if op in cfg.ops:
                for n in cfg.sizes_for(op):
                    todo.setdefault((n, cfg.d_for(op)), []).append(op)
        for (n, d), ops in todo.items():
            try:
                x = segment_gather.make_x(n, d, dtype, cfg.device)
            except (RuntimeError, MemoryError) as exc:
                for op in ops:
                    for variant in (cfg.groups if op == "segment" else cfg.keep):
                        methods = segment_gather.SEGMENT_METHODS if op == "segment" else segment_gather.GATHER_METHODS
                        rows += _failed(_OP_ROW[op], n, d, cfg, methods, exc, step(f"{op} N={n}"),
                                        **({"groups": variant} if op == "segment" else {"keep_fraction": variant}))
                continue
            for op in ops:
                if op == "segment":
                    for g in cfg.groups:
                        rows += segment_gather.bench_segment(x, g, cfg.device, cfg.n_repeats(), memory=memory_ok,
                                                             progress=step(f"segment N={n} groups={g}"))
                else:
                    for k in cfg.keep:
                        rows += segment_gather.bench_gather(x, k, cfg.device, cfg.n_repeats(), memory=memory_ok,
                                                            progress=step(f"gather N={n} keep={k}"))
            del x
            if is_cuda(cfg.device):
                torch.cuda.empty_cache()
    finally:
        bar.close()
    add_ratios(rows)
    add_fractions(rows, ceil)
    env = environment(cfg.device)
    if load_start is not None:
        env["load_average_start"] = load_start
    config = dataclasses.asdict(cfg)
    config.update(infonce_methods=cfg.infonce_methods(), repeats=cfg.n_repeats(), memory=memory_ok,
                  sizes={op: cfg.sizes_for(op) for op in cfg.ops}, d={op: cfg.d_for(op) for op in cfg.ops})
    return {"benchmark": "semcomp bench", "ops": list(cfg.ops), "config": config,
            "flop_convention": {"infonce": infonce.FLOP_CONVENTION},
            "bytes_convention": {"segment_mean": "x + int64 ids + means", "gather_columns": "x + result"},
            "memory_convention": "peak extra memory of one call minus the returned outputs (gradients for InfoNCE)",
            "env": env, "ceilings": ceil, "rows": rows,
            "torch_threads": torch.get_num_threads(), "wall_s": time.perf_counter() - t0}
