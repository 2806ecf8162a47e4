"""`semcomp bench`: the command on tiny sizes (JSON, PNG, table), the pure functions behind its
figures (ratios, fractions, markdown, plot series), the CUDA timing path with stand-in events,
and one-line errors for bad arguments."""

import json
import subprocess
import sys

import pytest
import torch

from semcomp_ext.bench import results, timing
from semcomp_ext.bench.cli import parse_list
from semcomp_ext.cli import main


def _row(op, method, n, t, extra=None, **kw):
    r = {"op": op, "method": method, "n": n, "d": 8, "dtype": "float32", "device": "cpu", "median_s": t, **kw}
    if extra is not None:
        r["extra_bytes"] = extra
    return r


def test_ratios_are_time_over_each_peer_in_the_same_case():
    rows = [
        _row("infonce", "semcomp", 64, 0.5, extra=10, tflops=2.0),
        _row("infonce", "open_clip", 64, 2.0, extra=1000, tflops=0.5),
        _row("infonce", "reference", 64, 1.0, extra=500, tflops=1.0),
        _row("infonce", "inf_cl", 64, 9.0, error="ImportError: no inf_cl"),
        _row("infonce", "semcomp", 128, 3.0, extra=20, tflops=1.0),   # another case: its own peers only
        _row("infonce", "open_clip", 128, 4.0, extra=4000, tflops=0.75),
        _row("segment_mean", "semcomp_sorted", 64, 0.1, groups=4, gb_per_s=5.0),
        _row("segment_mean", "torch_index_add", 64, 0.4, groups=4, gb_per_s=1.25),
        _row("segment_mean", "torch_index_add", 64, 0.8, groups=8, gb_per_s=0.6),  # other group count
    ]
    results.add_ratios(rows)
    assert rows[0]["time_ratio"] == {"open_clip": 0.25, "reference": 0.5}  # failed peer not used
    assert rows[0]["memory_ratio"] == {"open_clip": 0.01, "reference": 0.02}
    assert rows[4]["time_ratio"] == {"open_clip": 0.75}
    assert rows[6]["time_ratio"] == {"torch_index_add": 0.25}  # groups=8 is another case
    assert "memory_ratio" not in rows[6]  # no memory measured there
    assert all("time_ratio" not in r for r in rows if not r["method"].startswith("semcomp"))
    assert "time_ratio" not in rows[3]

    ceil = {"matmul_tflops": 4.0, "copy_gb_per_s": 10.0}
    results.add_fractions(rows, ceil)
    assert rows[0]["fraction_of_ceiling"] == 0.5 and rows[0]["unit"] == "TFLOP/s"
    assert rows[6]["fraction_of_ceiling"] == 0.5 and rows[6]["unit"] == "GB/s"
    assert "fraction_of_ceiling" not in rows[3]

    lines = results.series(rows)
    assert lines["infonce"]["semcomp"] == [(64, 2.0), (128, 1.0)]
    assert set(lines["segment_mean"]) == {"semcomp_sorted groups=4", "torch_index_add groups=4", "torch_index_add groups=8"}
    text = results.format_table(rows)
    assert "0.25x open_clip, 0.50x reference" in text and "error" in text


def test_sizes_and_lists_are_parsed_or_rejected():
    assert parse_list(["1024,2k", "1M", "2^10"], "--sizes") == (1024, 2048, 1 << 20, 1024)
    assert parse_list(["0.5", "1"], "--keep", allow_frac=True) == (0.5, 1.0)
    for bad in (["abc"], ["0"], ["-4"], ["1.5"], [","]):
        with pytest.raises(ValueError, match="--sizes"):
            parse_list(bad, "--sizes")
    with pytest.raises(ValueError, match="--keep"):
        parse_list(["1.5"], "--keep", allow_frac=True)


def _args(*argv):
    from semcomp_ext.cli import build_parser

    return build_parser().parse_args(["bench", *argv])


def test_cuda_configuration_without_a_gpu(monkeypatch):
    """The CUDA path's choices, decided without a GPU: sizes, repeats, methods."""
    from semcomp_ext.bench.cli import config_from_args
    from semcomp_ext.train import cli as tcli

    monkeypatch.setattr(tcli, "_torch_has_cuda", lambda: True)  # as with a CUDA build of torch

    cfg = config_from_args(_args("infonce", "--device", "cuda", "--dtype", "bfloat16"), cuda_available=True)
    assert cfg.ops == ("infonce",) and cfg.device == "cuda" and cfg.n_repeats() == 10
    assert cfg.sizes_for("infonce") == [4096, 16384, 32768] and cfg.sizes_for("segment") == [1 << 20, 1 << 22]
    methods = cfg.infonce_methods()
    assert methods[:4] == ["semcomp", "semcomp_tile", "semcomp_mma", "semcomp_wgmma"]
    assert "compiled_reference" in methods and "reference" in methods
    cpu = config_from_args(_args("all", "--sizes", "64", "128", "--groups", "8"), cuda_available=False)
    assert cpu.sizes_for("gather") == [64, 128] and "compiled_reference" not in cpu.infonce_methods()
    assert "semcomp_tile" not in cpu.infonce_methods() and cpu.n_repeats() == 3
    assert "compiled_reference" in config_from_args(_args("--compile"), False).infonce_methods()
    with pytest.raises(ValueError, match="CUDA is not available"):
        config_from_args(_args("--device", "cuda:1"), cuda_available=False)


class _FakeEvent:
    """Stands in for torch.cuda.Event: records the host clock; elapsed_time in ms."""
    clock = [0.0]

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.t = None

    def record(self):
        self.t = self.clock[0]

    def synchronize(self):
        assert self.t is not None

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def test_cuda_timing_and_memory_logic_with_stand_in_events(monkeypatch):
    durations = iter([5.0, 5.0, 1.0, 2.0, 3.0, 100.0])  # two warm-up calls, then four timed
    seen = []

    def fn(x):
        seen.append(x)
        _FakeEvent.clock[0] += next(durations)

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    t = timing.cuda_median_time(fn, sets=["a", "b", "c"], repeats=4, warmup=2)
    assert t == {"median_s": 2.5, "min_s": 1.0, "max_s": 100.0, "repeats": 4}
    assert seen == ["a", "b", "a", "b", "c", "a"]  # inputs rotated

    mem = {"alloc": 1000, "peak": 0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: mem.update(peak=mem["alloc"]))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: mem["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: mem["peak"])

    def grow():
        mem["peak"] = mem["alloc"] + 4096

    assert timing.peak_extra_bytes(grow, "cuda:0") == 4096


def test_command_writes_json_plot_and_table(tmp_path):
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    proc = subprocess.run([sys.executable, "-m", "semcomp_ext.cli", "bench", "all", "--sizes", "256,512", "--d", "32",
                           "--groups", "8", "--repeats", "1", "--methods", "semcomp", "reference",
                           "-o", str(out), "--plot", str(png), "-q"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr == ""  # -q: no progress
    payload = json.loads(out.read_text())
    assert payload["ops"] == ["infonce", "segment", "gather"]
    c = payload["ceilings"]
    assert c["matmul_tflops"] > 0 and c["copy_gb_per_s"] > 0 and c["dtype"] == "float32"
    rows = payload["rows"]
    assert {(r["op"], r["method"]) for r in rows} == {
        ("infonce", "semcomp"), ("infonce", "reference"), ("segment_mean", "semcomp_unsorted"),
        ("segment_mean", "semcomp_sorted"), ("segment_mean", "torch_index_add"), ("segment_mean", "torch_scatter_reduce"),
        ("gather_columns", "semcomp"), ("gather_columns", "torch_index_select")}
    assert len(rows) == 16 and not [r for r in rows if "error" in r]
    by = {(r["op"], r["method"], r["n"]): r for r in rows}
    for r in rows:
        assert r["median_s"] > 0 and r["throughput"] > 0 and r["fraction_of_ceiling"] > 0
        assert r["extra_bytes"] >= 0 and r["unit"] in ("TFLOP/s", "GB/s")
    s, ref = by[("infonce", "semcomp", 512)], by[("infonce", "reference", 512)]
    assert s["impl"] == "cpu" and "impl" not in ref  # the implementation that ran (semcomp rows only)
    assert s["time_ratio"]["reference"] == pytest.approx(s["median_s"] / ref["median_s"])
    assert s["tflops"] == pytest.approx(8 * 512**2 * 32 / s["median_s"] / 1e12)
    assert s["fraction_of_ceiling"] == pytest.approx(s["tflops"] / c["matmul_tflops"])
    g = by[("gather_columns", "semcomp", 256)]
    assert g["keep"] == 8 and g["time_ratio"]["torch_index_select"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "semcomp_sorted" in proc.stdout and "TFLOP/s" in proc.stdout and "wrote" in proc.stdout


def test_markdown_is_rendered_from_the_json(tmp_path, capsys):
    rows = results.add_fractions(results.add_ratios([
        _row("infonce", "semcomp", 64, 0.5, extra=10, tflops=2.0),
        _row("infonce", "open_clip", 64, 2.0, extra=1000, tflops=0.5)]), {"matmul_tflops": 4.0, "copy_gb_per_s": 10.0})
    payload = {"ops": ["infonce"], "rows": rows, "wall_s": 12.0,
               "ceilings": {"dtype": "float32", "matmul_tflops": 4.0, "matmul_n": 1024, "copy_gb_per_s": 10.0,
                            "copy_bytes": 1 << 28},
               "env": {"device": "cpu", "machine": "test machine", "torch": "x", "git_commit": "abc", "date": "2026-01-01T00"}}
    path = results.write_json(payload, tmp_path / "r.json")
    assert main(["bench", "--markdown", str(path)]) == 0
    md = capsys.readouterr().out
    assert "| infonce | 64x8 | float32 | semcomp | 500.00 | 2 TFLOP/s | 50% | 0.0 | 0.25x open_clip |" in md
    assert "test machine" in md and "copy 10 GB/s" in md
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench", "--markdown", str(tmp_path / "bad.json")]) == 2
    assert "not a `semcomp bench --json` result" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--sizes", "12x"], "--sizes expects positive integers"),
    (["--sizes", "0"], "--sizes expects positive integers"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--device", "cuda"], "--device cuda: "),  # a CPU build of torch, or no GPU
    (["matmul"], "unknown benchmark 'matmul'"),
    (["--keep", "2"], "--keep expects numbers in (0, 1]"),
    (["--methods", "flash"], "unknown InfoNCE method 'flash'"),
    (["--plot", "out.txt"], "--plot: the file must end in"),
    (["segment", "--sizes", "10", "--groups", "100"], "smaller than --groups"),
    (["--markdown", "/nonexistent/b.json"], "no such file"),
    (["--json", "b.json"], "--json takes no value (it prints JSON on stdout): write the file with -o b.json"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = main(["bench", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("semcomp bench: error: ") and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--out"], "argument -o/--out: expected one argument"),
    (["all", "--json", "b.json"], "unrecognized arguments: b.json (--json takes no value: it prints JSON on stdout; "
                                  "write the file with -o b.json)"),
    (["infonce", "--sizez", "64"], "unrecognized arguments: --sizez 64 (did you mean --sizes?)"),
])
def test_usage_errors_show_the_bench_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("usage: semcomp bench ")
    assert err.splitlines()[-1] == f"semcomp bench: error: {message}"


def test_cuda_without_a_gpu_is_refused_in_one_line(monkeypatch, capsys):
    """A CUDA build of torch on a machine without a GPU: refused when the command starts."""
    from semcomp_ext.train import cli as tcli

    monkeypatch.setattr(tcli, "_torch_has_cuda", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "infonce", "--device", "cuda:0", "--sizes", "64"]) == 2
    err = capsys.readouterr().err
    assert err == "semcomp bench: error: --device cuda:0: CUDA is not available on this machine (no GPU or a CPU build of torch)\n"


def test_console_launcher_rejects_bad_arguments_without_torch():
    proc = subprocess.run([sys.executable, "-c", "import sys, semcomp_cli; rc = semcomp_cli.main(sys.argv[1:]); "
                           "assert 'torch' not in sys.modules; sys.exit(rc)", "bench", "--dtype", "int8"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "semcomp bench: error: --dtype must be one of float32, bfloat16, float16, float64, got 'int8'"]


def test_registering_the_command_imports_no_torch():
    code = ("import sys, argparse, importlib.util, types\n"
            "spec = importlib.util.find_spec('semcomp_ext')\n"
            "sys.modules['semcomp_ext'] = importlib.util.module_from_spec(spec)\n"
            "from semcomp_ext.bench import cli\n"
            "cli.register(argparse.ArgumentParser().add_subparsers())\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cpu_peak_memory_follows_a_large_temporary():
    """The measured CPU peak of a call that holds a 64 MiB temporary is about 64 MiB (run in a
    fresh process: the allocator settings apply to the whole process)."""
    code = ("import torch\n"
            "from semcomp_ext.bench import timing\n"
            "assert timing.prepare_cpu_memory_measurement()\n"
            "small = torch.empty(1 << 18).fill_(1.0); del small\n"
            "def f():\n"
            "    t = torch.empty(1 << 24).fill_(2.0)\n"   # 64 MiB, touched
            "    return float(t[::4096].sum())\n"
            "print(timing.cpu_peak_extra_bytes(f))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 60 << 20 <= int(out.strip().splitlines()[-1]) <= 80 << 20


def test_inputs_that_cannot_be_made_give_error_rows(monkeypatch):
    from semcomp_ext.bench import run as brun

    def no_memory(*a, **k):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(brun, "ceilings", lambda device, dtype, **kw: {"matmul_tflops": 1.0, "copy_gb_per_s": 1.0})
    monkeypatch.setattr(brun.segment_gather, "make_x", no_memory)
    cfg = brun.BenchConfig(ops=("segment", "gather"), sizes=(1 << 20,), d=1 << 20, groups=(10,), memory=False, quiet=True)
    payload = brun.run(cfg)
    rows = payload["rows"]
    assert len(rows) == 6 and all("not enough memory" in r["error"] for r in rows)
    assert {r["op"] for r in rows} == {"segment_mean", "gather_columns"}
    assert "error" in results.format_table(rows)


def test_cuda_device_selection(monkeypatch):
    from semcomp_ext.bench.run import select_device

    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    select_device("cuda")
    select_device("cpu")
    select_device("cuda:1")
    assert calls == [1]


def test_interleaved_rounds_drop_a_failing_method():
    order = []
    state = {"n": 0}

    def bad():
        order.append("bad")
        state["n"] += 1
        if state["n"] == 3:
            raise RuntimeError("out of memory")

    timed, errors = timing.interleaved_times({"a": lambda: order.append("a"), "bad": bad}, "cpu", repeats=3, warmup=1)
    assert order == ["a", "bad", "a", "bad", "a", "bad", "a"]  # rounds; "bad" dropped after it raised
    assert timed["a"]["repeats"] == 3 and "bad" not in timed and isinstance(errors["bad"], RuntimeError)
