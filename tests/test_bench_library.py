"""semcomp_ext.bench, the one implementation of the benchmarks: byte counts, the size of the
run's copy ceiling, the SigLIP case, and benchmarks/ as thin entry points over it."""

import ast
import pathlib

import torch

from semcomp_ext.bench import run, segment_gather, siglip

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def test_gather_bytes_count_the_cache_lines_read():
    # fp32, D=128: 8 cache lines per row; columns 0..15 lie in the first line only
    assert segment_gather.gather_bytes(10, 128, torch.arange(16), 4) == 10 * 64 + 10 * 16 * 4
    # one column in every line: whole rows read
    assert segment_gather.gather_bytes(10, 128, torch.arange(0, 128, 16), 4) == 10 * 512 + 10 * 8 * 4
    # a row shorter than a line is read once, not a full line
    assert segment_gather.gather_bytes(3, 4, torch.tensor([1]), 4) == 3 * 16 + 3 * 4


def test_copy_ceiling_is_sized_by_the_smallest_memory_bound_case():
    cfg = run.BenchConfig(ops=("segment", "gather"), sizes=(1 << 12, 1 << 16), d=64, groups=(10,), keep=(0.25,))
    smallest = min(segment_gather.working_set_bytes("segment", 1 << 12, 64, 4, groups=10),
                   segment_gather.working_set_bytes("gather", 1 << 12, 64, 4, keep=0.25))
    assert run.copy_ceiling_bytes(cfg) == smallest // 2  # read + write of the copy = the case's bytes
    assert run.copy_ceiling_bytes(run.BenchConfig(ops=("infonce",))) is None  # the default size then


def test_siglip_case_checks_times_and_compares_every_method():
    rows = siglip.bench_case(48, 8, repeats=1, memory=False)
    assert [r["method"] for r in rows] == list(siglip.METHODS)
    for r in rows:
        assert "error" not in r, r
        assert r["loss_rel_err_vs_fp64"] < 1e-4 and r["median_s"] > 0
        assert r["time_vs_open_clip"] > 0


def test_benchmark_scripts_are_thin_entry_points():
    """No sys.path edits and no timing loop of their own in the scripts over semcomp_ext.bench."""
    for name in ("bench_infonce", "bench_siglip", "bench_segment_gather", "bench_distributed", "distributed_parity",
                 "report", "run_all", "common", "gpu_ceilings"):
        tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) not in {("sys", "path"), ("time", "perf_counter"),
                                                          ("time", "time")}, f"{name}.py: {node.value.id}.{node.attr}"
