"""Storage codecs (semcomp_ext.compress.codecs): round trips, manifests, and `compress --codec`."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from semcomp_ext.compress.codecs import (BinaryCodec, FloatCodec, Int8Codec, PQCodec, codec_from_manifest,
                                         parse_codec)

faiss = pytest.importorskip("faiss")


def _x(n=600, k=32, seed=0):
    return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


def _fitted(spec, x, seed=0):
    c = parse_codec(spec, seed=seed)
    if c.needs_fit:
        c.fit(x)
    return c


def _reload(c):
    """Through JSON, as a manifest stores it."""
    return codec_from_manifest(json.loads(json.dumps(c.to_manifest())))


# ---- round trips -----------------------------------------------------------------------------


def test_float_codecs_unchanged():
    x = _x()
    c32, c16 = parse_codec("float32"), parse_codec("float16")
    assert not c32.needs_fit and not c16.needs_fit
    assert c32.encode(x).dtype == np.float32 and np.array_equal(c32.decode(c32.encode(x)), x)
    codes = c16.encode(x)
    assert codes.dtype == np.float16 and np.array_equal(codes, x.astype(np.float16))
    h = x.astype(np.float16).astype(np.float32)  # fp16-representable values come back exactly
    assert np.array_equal(c16.decode(c16.encode(h)), h)
    assert c32.bytes_per_vector(32) == 128 and c16.bytes_per_vector(32) == 64


def test_int8_error_bounded_by_half_scale():
    x = _x()
    c = _fitted("int8", x)
    codes = c.encode(x)
    assert codes.dtype == np.int8 and codes.shape == x.shape and np.abs(codes).max() == 127
    err = np.abs(c.decode(codes) - x)
    assert (err <= c.scale / 2 * (1 + 1e-5)).all()
    assert c.bytes_per_vector(32) == 32
    # outside the fitted range: clipped to ±127 * scale
    big = np.full((1, 32), 1e3, np.float32)
    assert np.allclose(c.decode(c.encode(big)), 127 * c.scale)
    # an all-zero column is stored (and decoded) as zeros
    z = x.copy()
    z[:, 3] = 0
    cz = _fitted("int8", z)
    assert cz.scale[3] == 1 and (cz.decode(cz.encode(z))[:, 3] == 0).all()


@pytest.mark.parametrize("k", [32, 13])
def test_binary_signs_exact(k):
    x = _x(k=k)
    c = parse_codec("binary")
    codes = c.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (len(x), (k + 7) // 8)
    d = c.decode(codes)
    assert np.array_equal(d > 0, x > 0)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1, rtol=1e-6)
    # inner products of decoded vectors = 1 - 2 * hamming / K
    ham = (np.unpackbits(codes[:5, None] ^ codes[None, :5], axis=2, count=k)).sum(2)
    np.testing.assert_allclose(d[:5] @ d[:5].T, 1 - 2 * ham / k, atol=1e-6)
    assert c.bytes_per_vector(k) == (k + 7) // 8
    r = _reload(c)
    assert r.dim == k and np.array_equal(r.decode(codes), d)


def test_pq_decode_matches_faiss():
    x = _x(n=2000)
    c = _fitted("pq:8", x, seed=5)
    codes = c.encode(x)
    assert codes.dtype == np.uint8 and codes.shape == (2000, 8) and c.bytes_per_vector(32) == 8
    pq = faiss.ProductQuantizer(32, 8, 8)
    faiss.copy_array_to_vector(c.codebooks.ravel(), pq.centroids)
    assert np.array_equal(codes, pq.compute_codes(x))
    np.testing.assert_array_equal(c.decode(codes), pq.decode(codes))
    # decoding from the manifest alone, and after pickling (Ray), gives the same
    assert np.array_equal(_reload(c).decode(codes), c.decode(codes))
    assert np.array_equal(pickle.loads(pickle.dumps(c)).encode(x), codes)
    # fitting is deterministic for a given seed
    assert np.array_equal(_fitted("pq:8", x, seed=5).codebooks, c.codebooks)


def test_faiss_factory_round_trip():
    x = _x(n=1000)
    c = _fitted("faiss:SQ8", x)
    codes = c.encode(x)
    assert codes.shape == (1000, 32) and c.bytes_per_vector(32) == 32
    np.testing.assert_array_equal(c.decode(codes), c.index.sa_decode(codes))
    assert np.array_equal(_reload(c).decode(codes), c.decode(codes))
    assert np.array_equal(pickle.loads(pickle.dumps(c)).encode(x), codes)


@pytest.mark.parametrize("spec", ["float32", "float16", "int8", "binary", "pq:4", "faiss:SQ4"])
def test_manifest_round_trip(spec):
    x = _x(n=400, k=16)
    c = _fitted(spec, x)
    codes = c.encode(x)
    r = _reload(c)
    assert type(r) is type(c) and r.name == spec
    assert np.array_equal(r.encode(x), codes) and np.array_equal(r.decode(codes), c.decode(codes))


# ---- fitting progress ------------------------------------------------------------------------


class _SlowInt8(Int8Codec):
    """An int8 codec whose fit blocks like a faiss k-means does (one call, no output)."""

    def fit(self, sample):
        time.sleep(1.3)
        super().fit(sample)


def test_fit_codec_heartbeat_and_real_duration():
    import io

    from semcomp_ext.compress.codecs import fit_codec

    out = io.StringIO()
    x = _x()
    c = _SlowInt8()
    t = time.perf_counter()
    seconds = fit_codec(c, x, quiet=False, stream=out, every=0.3)
    wall = time.perf_counter() - t
    assert c.fitted and 1.3 <= seconds <= wall  # the fit's own time, not the time after it
    lines = out.getvalue().splitlines()
    assert lines[0] == "semcomp codec int8: fitting on 600 x 32 ..."
    beats = [ln for ln in lines if ln.endswith(" s elapsed")]
    assert len(beats) >= 3  # printed while the fit blocked
    assert lines[-1] == f"semcomp codec int8: fitting on 600 x 32 ... done in {seconds:.1f} s"
    quiet = io.StringIO()
    assert fit_codec(_SlowInt8(), x, quiet=True, stream=quiet, every=0.3) >= 1.3 and quiet.getvalue() == ""


def test_fit_codec_faiss_threads_restored():
    from semcomp_ext.compress.codecs import fit_codec

    before = faiss.omp_get_max_threads()
    c = parse_codec("faiss:PQ4")
    fit_codec(c, _x(n=1000, k=16), threads=1)
    assert c.fitted and faiss.omp_get_max_threads() == before


def test_heartbeat_reports_failure_and_reraises():
    import io

    from semcomp_ext.compress.heartbeat import Heartbeat

    out = io.StringIO()
    with pytest.raises(RuntimeError, match="boom"):
        with Heartbeat("step", quiet=False, stream=out, every=5):
            raise RuntimeError("boom")
    assert out.getvalue().splitlines()[-1].startswith("semcomp step ... failed in ")
    with pytest.raises(ValueError, match="every"):
        Heartbeat("step", every=0)


def test_faiss_threads_follow_env_and_load(monkeypatch):
    from semcomp_ext.compress import heartbeat

    monkeypatch.setattr(heartbeat, "usable_cores", lambda: 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(heartbeat.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    assert heartbeat.default_threads() == 4  # only this process runs
    monkeypatch.setattr(heartbeat.os, "getloadavg", lambda: (3.2, 1.0, 1.0))
    assert heartbeat.default_threads() == 2
    monkeypatch.setattr(heartbeat.os, "getloadavg", lambda: (40.0, 1.0, 1.0))
    assert heartbeat.default_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert heartbeat.default_threads() == 3
    before = faiss.omp_get_max_threads()
    with heartbeat.faiss_threads() as n:
        assert n == 3 and faiss.omp_get_max_threads() == 3
    assert faiss.omp_get_max_threads() == before


def test_manifest_without_codec_is_float_storage():
    for dt in ("float16", "float32"):
        c = codec_from_manifest({"format": "semcomp-compress/1", "parameters": {"out_dtype": dt}})
        assert isinstance(c, FloatCodec) and c.name == dt


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["int4", "pq", "pq:0", "pq:x", "faiss:", "FLOAT16", ""])
def test_bad_specs(spec):
    with pytest.raises(ValueError, match="^codec ") as e:  # the field's name; the CLI says --codec
        parse_codec(spec)
    assert repr(spec) in str(e.value)


def test_fit_errors():
    x = _x(k=30)
    with pytest.raises(ValueError, match=r"pq:7.*must divide.*K=30"):
        parse_codec("pq:7").fit(x)
    with pytest.raises(ValueError, match=r"at least 256"):
        parse_codec("pq:5").fit(x[:100])
    with pytest.raises(ValueError, match="rejects 'Nope'"):
        parse_codec("faiss:Nope").fit(x)
    with pytest.raises(ValueError, match="not fitted"):
        Int8Codec().encode(x)
    with pytest.raises(ValueError, match="not fitted"):
        PQCodec(5).to_manifest()
    c = _fitted("int8", x)
    with pytest.raises(ValueError, match="31 columns.*K=30"):
        c.encode(_x(k=31))
    with pytest.raises(ValueError, match="codes must be 2-D int8"):
        c.decode(np.zeros((2, 30), np.uint8))
    with pytest.raises(ValueError, match="unknown"):
        BinaryCodec().decode(np.zeros((2, 4), np.uint8))


def test_corrupt_payload_is_detected():
    c = _fitted("pq:4", _x(n=400, k=16))
    d = c.to_manifest()
    b = d["codebooks"]["base64"]
    d["codebooks"]["base64"] = ("A" if b[0] != "A" else "B") + b[1:]
    with pytest.raises(ValueError, match="sha256"):
        codec_from_manifest(d)


# ---- semcomp compress --codec ----------------------------------------------------------------

pytest.importorskip("pyarrow")

from _compress_data import load_centroids, make_clip_layout, make_labelled_clusters, tree_sha  # noqa: E402

from semcomp_ext.cli import main  # noqa: E402
from semcomp_ext.compress import CompressOptions, compress, verify  # noqa: E402

ROWS = (300, 210, 260)


def _compress(tmp_path, name, **kw):
    out = str(tmp_path / name)
    m = compress(CompressOptions(inputs=[str(tmp_path / "in")], out=out, keep=16, batch_size=64, quiet=True, **kw))
    return out, m


@pytest.mark.parametrize("spec", ["int8", "binary", "pq:4"])
def test_compress_codec(tmp_path, spec):
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=24)
    ref, _ = _compress(tmp_path, "ref")
    out, m = _compress(tmp_path, "out", codec=spec, codec_sample_rows=400)
    x = load_centroids(ref)
    codec = codec_from_manifest(m)
    assert m["parameters"]["codec"] == spec and codec.dim == 16
    codes = load_centroids(out)
    assert codes.dtype == np.dtype(codec.code_dtype) and codes.shape == codec.code_shape(sum(ROWS), 16)
    # the shards hold exactly the codes of the float32 output, with a codec fitted on its first 400 rows
    fit = parse_codec(spec)
    if fit.needs_fit:
        fit.fit(x[:400])
    assert np.array_equal(codes, fit.encode(x))
    assert verify(out) == []
    assert main(["verify", out, "-q"]) == 0
    # an uninterrupted rerun is byte-identical (fitting is deterministic)
    again, _ = _compress(tmp_path, "again", codec=spec, codec_sample_rows=400)
    assert tree_sha(again) == tree_sha(out)


def test_compress_job_reports_the_codec_fit(tmp_path, capsys):
    """The CLI job (stderr not a terminal) says when the fit starts and how long the fit itself
    took, before the compress progress line; -q says nothing."""
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=24)
    assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--keep", "16",
                 "--codec", "pq:4", "--codec-sample-rows", "400"]) == 0
    err = capsys.readouterr().err.splitlines()
    start = err.index("semcomp codec pq:4: fitting on 400 x 16 ...")
    assert err[start + 1].startswith("semcomp codec pq:4: fitting on 400 x 16 ... done in ")
    assert any(line.startswith("semcomp compress: ") for line in err[start + 2:])
    assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "q"), "--keep", "16",
                 "--codec", "pq:4", "--codec-sample-rows", "400", "-q"]) == 0
    assert "fitting" not in capsys.readouterr().err


def test_compress_arrays_fits_through_fit_codec_like_the_job(tmp_path, monkeypatch, capsys):
    """compress_arrays fits its codec as the job does (codecs.fit_codec, quiet: faiss on the
    usable cores, nothing printed), on the same rows: the codes the job writes."""
    from semcomp_ext.compress import arrays, compress_arrays

    data = make_clip_layout(tmp_path / "in", rows=ROWS, dim=24)
    fits = []
    real = arrays.fit_codec

    def recorded(codec, sample, **kw):
        fits.append((codec.name, np.shape(sample), kw))
        return real(codec, sample, **kw)

    monkeypatch.setattr(arrays, "fit_codec", recorded)
    ca = compress_arrays([data["img"], data["text"]], keep=16, codec="pq:4", codec_sample_rows=400, batch_size=64)
    assert fits == [("pq:4", (400, 16), {"quiet": True})]
    assert capsys.readouterr().err == ""
    out, _ = _compress(tmp_path, "job", codec="pq:4", codec_sample_rows=400)
    assert np.array_equal(ca.codes, load_centroids(out))


def test_verify_checks_codec(tmp_path):
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=24)
    out, m = _compress(tmp_path, "out", codec="int8", codec_sample_rows=400)
    bad = dict(m, codec=dict(m["codec"], scale=m["codec"]["scale"][:-1]))
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(bad, f)
    problems = verify(out)
    assert any("codec" in p and "K=15" in p for p in problems), problems


def test_codec_option_errors(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", rows=ROWS, dim=24)
    assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "o"), "--codec", "pq:x", "-q"]) == 2
    assert "'pq:x'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="codec or out_dtype"):
        _compress(tmp_path, "o2", codec="int8", out_dtype="float16")
    with pytest.raises(ValueError, match="M=5 must divide.*K=16"):
        _compress(tmp_path, "o3", codec="pq:5")


def test_kill9_then_resume_is_identical_with_fitted_codec(tmp_path):
    rows = (300, 41, 42, 43, 44, 45)
    make_clip_layout(tmp_path / "in", rows=rows)
    cmd = lambda out, *a: [sys.executable, "-m", "semcomp_ext.cli", "compress", str(tmp_path / "in"), "-o", str(out),  # noqa: E731
                           "--drop-rate", "0.5", "--batch-size", "16", "--codec", "pq:2", "--codec-sample-rows", "300",
                           "-q", *a]
    ref, out = tmp_path / "ref", tmp_path / "out"
    subprocess.run(cmd(ref), check=True)
    p = subprocess.Popen(cmd(out), env=dict(os.environ, SEMCOMP_TEST_SLEEP_PER_SHARD="0.3"))
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("centroids/centroids_*.npy"))) < 2:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads((out / "manifest.json").read_text())["status"] == "in_progress"
    subprocess.run(cmd(out, "--resume"), check=True)
    assert tree_sha(out) == tree_sha(ref)


# ---- semcomp reproduce: centroid + RFS + codec, and the compression answer ---------------------


def test_rfs_codecs_rows():
    import torch

    from semcomp_ext.train.evaluate import rfs_codecs

    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (360,), generator=g)
    x = torch.nn.functional.one_hot(y, 3).float().repeat(1, 16) + 0.3 * torch.randn(360, 48, generator=g)
    rows = rfs_codecs(x[:300], x[300:], y[:300], y[300:], drop_rates=(0.0, 0.5), rfs_seeds=(0, 1), probe_iter=20)
    assert [(r["codec"], r["spec"], r["keep"], r["bytes"]) for r in rows] == [
        ("int8", "int8", 48, 48), ("int8", "int8", 24, 24), ("binary", "binary", 48, 6), ("binary", "binary", 24, 3),
        ("pq", "pq:6", 48, 6), ("pq", "pq:3", 24, 3)]
    assert rows[0]["compression"] == 2 * 48 * 4 / 48 and rows[0]["probe"]["n"] == 2 and rows[-1]["probe"]["n"] == 1
    assert all(r["probe"]["mean"] > 0.9 for r in rows)  # separable classes survive every codec


def test_codec_compression_answer():
    from semcomp_ext.train.report import codec_compression, codec_text

    def row(codec, rate, comp, acc):
        return {"codec": codec, "spec": codec, "drop_rate": rate, "keep": 8, "bytes": 512 / comp,
                "compression": comp, "probe": {"mean": acc}}

    def tau(concat, rfs, codecs):
        return {"classification": {"forms": {"concat": {"probe": concat}}, "rfs": rfs}, "codecs": codecs}

    res = {"temperatures": {
        "0.1": tau(0.90, [row("float32", 0.0, 2, 0.90), row("float32", 0.9, 20, 0.85)],
                   [row("int8", 0.0, 8, 0.895), row("int8", 0.9, 80, 0.80), row("binary", 0.0, 64, 0.70)]),
        "0.4": tau(0.90, [row("float32", 0.0, 2, 0.90), row("float32", 0.9, 20, 0.895)],
                   [row("int8", 0.9, 80, 0.891), row("binary", 0.9, 640, 0.5)]),
    }}
    cc = codec_compression(res)
    per = cc["per_tau"]
    assert per["0.1"]["float32"]["compression"] == 2 and per["0.1"]["int8"]["compression"] == 8
    assert per["0.1"]["binary"] is None and per["0.4"]["int8"]["compression"] == 80
    assert cc["best_per_tau"] == {"0.1": 8, "0.4": 80}
    assert cc["goal_reached"] == ["0.4"] and cc["verdict"] == "reached at τ ∈ {0.4} only"
    text = "\n".join(codec_text(cc))
    assert "80×" in text and "none" in text
    assert codec_compression({"temperatures": {"0.1": {}}})["verdict"].startswith("not measured")


def test_eval_decodes_codec(tmp_path):
    from semcomp_ext.compress.analysis import eval_report

    make_labelled_clusters(tmp_path)
    compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(tmp_path / "out"), drop_rate=0.5, codec="binary", quiet=True))
    rep = eval_report([str(tmp_path / "in")], str(tmp_path / "out"), str(tmp_path / "lab"), k=5)
    assert rep["codec"] == "binary" and rep["stored_compression_ratio"] == 2 * 32 * 4 / 2
    assert rep["accuracy"]["compressed"]["knn@5"] > 0.9, rep["accuracy"]
