"""The index benchmark's implementation (semcomp_ext.bench.index) on a small case: the CLI job
in a child, its timing and RSS fields, recall against exact search, and the data generator."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("faiss")


def test_clustered_rows_are_unit_and_share_centres():
    from semcomp_ext.bench.index import clustered

    a = clustered(500, 24, clusters=5, latent=8, seed=0)
    b = clustered(500, 24, clusters=5, latent=8, seed=1)
    assert a.shape == (500, 24) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)
    assert not np.array_equal(a, b)
    # 5 clusters: every row of b has a close row in a (same centres), unlike uniform noise
    assert (b @ a.T).max(1).mean() > 0.5
    assert clustered(10, 24, clusters=5, dtype=np.float16).dtype == np.float16


def test_run_index_benchmark_small(tmp_path):
    from semcomp_ext.bench.index import run_index_benchmark

    lines = []
    payload = run_index_benchmark([(12_000, 32, "float16")], work=str(tmp_path), queries=100, log=lines.append)
    (r,) = payload["results"]
    assert r["factory"] == "IVF256,SQfp16" and r["nprobe"] >= 1 and r["recall@10"] >= 0.9
    assert r["index_wall_s"] > 0 and 0 < r["index_cpu_s"] and r["index_peak_rss_mb"] > 50
    assert r["choice"]["nlist"] == 256 and r["nprobe_tuning"]["recall"] >= 0.95
    assert payload["faiss"] and len(lines) == 1 and list(tmp_path.iterdir()) == []  # the folder removed
