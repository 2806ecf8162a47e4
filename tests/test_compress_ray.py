"""--engine ray (local Ray, 2 CPUs) writes exactly what the local engine writes."""

from __future__ import annotations

import pytest

pytest.importorskip("pyarrow")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from semcomp_ext.compress import CompressOptions, compress, verify

from _compress_data import make_clip_layout, make_concepts, tree_sha


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_equals_local(tmp_path, local_ray):
    make_clip_layout(tmp_path / "in")
    make_concepts(tmp_path / "ids")
    for extra in ({}, {"concepts": str(tmp_path / "ids"), "partitions": 2}):
        name = "c" if extra else "p"
        outs = {}
        for engine in ("local", "ray"):
            out = tmp_path / f"{name}-{engine}"
            compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), drop_rate=0.5, batch_size=16,
                                     engine=engine, quiet=True, **extra))
            assert verify(str(out)) == []
            outs[engine] = tree_sha(out)
        assert outs["local"] == outs["ray"] and len(outs["local"]) >= 4
