"""`semcomp index`'s faiss index choice (semcomp_ext.compress.index_choice) and what
build_index makes of it: the factory per size and budget, nprobe tuned to a recall target,
recall against exact search, the explicit --index-factory path, progress lines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from semcomp_ext.compress.index_choice import choose_index, default_time_budget, estimate_seconds

faiss = pytest.importorskip("faiss")


# ---- the rule ---------------------------------------------------------------------------------


def test_small_collections_are_exact():
    assert choose_index(9_999, 384, threads=2).factory == "Flat"
    assert choose_index(500_000, 4, threads=2).factory == "Flat"
    assert choose_index(0, 16, threads=2).factory == "Flat"


@pytest.mark.parametrize("n, dim, dtype, factory", [
    (20_000, 64, "float32", "IVF512,Flat"),        # autofaiss's 4·sqrt(N) lists fit the budget
    (200_000, 384, "float32", "IVF1024,Flat"),     # 2048 lists would not (k-means on 131k rows)
    (1_000_000, 768, "float16", "IVF1024,SQfp16"),  # fp16 rows kept exactly, at half the bytes
    (1_000_000, 768, "float32", "IVF1024,Flat"),
])
def test_factory_by_size(n, dim, dtype, factory):
    c = choose_index(n, dim, dtype=dtype, threads=2)
    assert c.factory == factory
    assert c.estimated_seconds <= c.time_budget_s == pytest.approx(default_time_budget(n, dim))
    assert c.train_rows == min(n, 64 * c.nlist)
    # the next power of two (up to autofaiss's 4·sqrt(N)) would not have fitted the budget
    if 2 * c.nlist <= 4 * np.sqrt(n):
        assert estimate_seconds(n, dim, 2 * c.nlist, c.storage, 2) > c.time_budget_s


def test_time_budget_trades_lists_for_speed():
    big = choose_index(200_000, 384, threads=2, time_budget_s=1e6)
    small = choose_index(200_000, 384, threads=2, time_budget_s=4)
    assert big.factory == "IVF2048,Flat"  # autofaiss's own choice when time is no object
    assert small.nlist < 1024 and small.estimated_seconds <= 4
    assert choose_index(200_000, 384, threads=2, time_budget_s=1e-3).nlist == 16  # the floor
    # more threads, more lists in the same budget
    assert choose_index(1_000_000, 768, threads=16).nlist > choose_index(1_000_000, 768, threads=2).nlist


def test_memory_budget_picks_the_storage():
    n, d = 200_000, 384
    assert choose_index(n, d, threads=2, max_memory=n * d * 2).storage == "SQfp16"
    assert choose_index(n, d, threads=2, max_memory=n * d).storage == "SQ8"
    pq = choose_index(n, d, threads=2, max_memory=n * 64)
    assert pq.storage == "PQ64x8" and pq.factory.endswith(",PQ64x8")
    assert choose_index(n, d, threads=2, max_memory=1).storage == "PQ4x8"  # nothing fits: the smallest
    faiss.index_factory(d, pq.factory, faiss.METRIC_INNER_PRODUCT)  # a factory faiss builds


def test_many_lists_get_an_hnsw_coarse_quantizer():
    c = choose_index(20_000_000, 64, threads=2, time_budget_s=1e9)
    assert c.factory == "IVF65536_HNSW32,Flat"
    faiss.index_factory(64, c.factory, faiss.METRIC_INNER_PRODUCT)


@pytest.mark.parametrize("kwargs, field", [
    ({"time_budget_s": 0}, "time_budget_s"), ({"time_budget_s": float("nan")}, "time_budget_s"),
    ({"threads": 0}, "threads"), ({"max_memory": -1}, "max_memory"), ({"max_memory": 1.5}, "max_memory"),
])
def test_bad_budgets_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        choose_index(100_000, 64, **kwargs)


# ---- built indexes ----------------------------------------------------------------------------
# Clustered synthetic rows (semcomp_ext.bench.index.clustered: 400 random unit centres, each row a
# centre plus Gaussian noise of norm 1, normalised; cosine ~0.7 to its centre), as embedding
# collections are clustered. Uniform noise is not, and no IVF index recalls it at a useful nprobe.

N, D, CLUSTERS = 20_000, 64, 400


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    from semcomp_ext.bench.index import clustered

    return clustered(N, D, clusters=CLUSTERS), clustered(300, D, clusters=CLUSTERS, seed=1)


def _folder(tmp_path, x):
    from semcomp_ext.bench.index import compress_rows

    return compress_rows(str(tmp_path), str(tmp_path / "c"), x)


@pytest.mark.parametrize("dtype, factory", [("float32", "IVF512,Flat"), ("float16", "IVF512,SQfp16")])
def test_default_index_recalls_exact_search(collection, tmp_path, capsys, dtype, factory):
    from semcomp_ext.compress.index import build_index, recall_at_k, search

    x, q = collection
    out = _folder(tmp_path, x.astype(dtype))
    info = build_index(out, quiet=False, threads=2)
    err = capsys.readouterr().err
    assert info["factory"] == factory and info["factory_source"] == "auto"
    assert info["choice"]["nlist"] == 512 and info["choice"]["threads"] == 2 == info["threads"]  # as given
    tuning = info["nprobe_tuning"]
    assert tuning["recall"] >= 0.95 and tuning["curve"][-1] == [info["nprobe"], tuning["recall"]]
    assert all(r < 0.95 for _, r in tuning["curve"][:-1])  # the smallest nprobe that reaches the target
    assert 1 < info["nprobe"] < 512
    saved = json.loads((tmp_path / "c" / "index" / "index.json").read_text())
    assert saved["factory"] == factory and saved["nprobe"] == info["nprobe"]
    got, exact = search(out, q, 10), search(out, q, 10, exact=True)
    assert got.method == factory and exact.method == "exact"
    assert recall_at_k(got.rows, exact.rows, 10) >= 0.9
    # progress: the choice, training and adding with their own durations, the tuned nprobe
    assert f"semcomp index: {factory} for 20,000 x 64" in err
    assert f"training {factory} on 20,000 x 64 ... done in " in err
    assert "adding 20,000 vectors ... done in " in err and f"nprobe {info['nprobe']} of 512 lists" in err


def test_explicit_factory_is_kept(collection, tmp_path):
    from semcomp_ext.cli import main
    from semcomp_ext.compress.index import search

    x, q = collection
    out = _folder(tmp_path, x)
    assert main(["index", out, "--index-factory", "IVF32,Flat", "-q"]) == 0
    info = json.loads((tmp_path / "c" / "index" / "index.json").read_text())
    assert info["factory"] == "IVF32,Flat" and info["factory_source"] == "explicit" and info["choice"] is None
    assert info["train_rows"] == 32 * 64 and info["nprobe_tuning"]["recall"] >= 0.95  # nprobe still tuned
    assert search(out, q, 5).method == "IVF32,Flat"
    assert main(["index", out, "--index-factory", "Flat", "-q"]) == 0
    info = json.loads((tmp_path / "c" / "index" / "index.json").read_text())
    assert info["factory"] == "Flat" and info["nprobe"] is None and info["train_rows"] == 0
    np.testing.assert_array_equal(search(out, q, 5).rows, search(out, q, 5, exact=True).rows)


def test_cli_time_budget_and_threads(collection, tmp_path, capsys):
    from semcomp_ext.cli import main

    x, _ = collection
    out = _folder(tmp_path, x)
    assert main(["index", out, "--time-budget", "1e-3", "--threads", "1", "-q"]) == 0
    info = json.loads((tmp_path / "c" / "index" / "index.json").read_text())
    assert info["factory"] == "IVF16,Flat" and info["threads"] == 1  # the smallest list count fits no budget
    assert info["choice"]["time_budget_s"] == 1e-3 and info["choice"]["threads"] == 1
    for flag, value in (("--time-budget", "0"), ("--time-budget", "nan"), ("--threads", "0")):
        with pytest.raises(SystemExit) as e:
            main(["index", out, flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_tune_nprobe_stops_at_the_target():
    from semcomp_ext.bench.index import clustered
    from semcomp_ext.compress.index import tune_nprobe

    x = clustered(4000, 32, clusters=80)
    index = faiss.index_factory(32, "IVF64,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    rows = np.arange(0, 4000, 40)
    truth = faiss.knn(x[rows], x, 11, metric=faiss.METRIC_INNER_PRODUCT)[1]
    p, r, curve = tune_nprobe(index, x[rows], rows, truth, target=0.9)
    assert r >= 0.9 and [c[0] for c in curve] == [2 ** i for i in range(len(curve))] and curve[-1][0] == p
    p1, r1, _ = tune_nprobe(index, x[rows], rows, truth, target=1.0)
    assert p1 >= p and (r1 == 1.0 or p1 == 64)
