"""`semcomp compress` / `verify` / `open_compressed` on URLs: a real S3 endpoint on 127.0.0.1
(moto's server mode) through s3fs, and fsspec's memory:// filesystem."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pyarrow")
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from semcomp_ext.compress import fsio
from semcomp_ext.compress.api import CompressOptions, compress
from semcomp_ext.compress.manifest import load_state

from _compress_data import make_clip_layout, make_concepts, tree_sha

KEY, SECRET = "AKIAsemcompTESTKEY01", "semcompSecretDoNotLog/0123456789abcdef"
ROWS = (40, 41, 42, 43, 44, 45)
ARGS = ["--drop-rate", "0.5", "--batch-size", "16"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port, a bucket holding a small clip-retrieval folder
    (`s3://semcomp-test/in`, rows ROWS, with metadata), and the storage options to reach it."""
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    so = {"key": KEY, "secret": SECRET, "endpoint_url": f"http://127.0.0.1:{port}"}
    try:
        fs = s3fs.S3FileSystem(**so)
        fs.mkdir("semcomp-test")
        local = tmp_path_factory.mktemp("s3src")
        make_clip_layout(local / "in", rows=ROWS)
        make_concepts(local / "ids", rows=ROWS)
        fs.put(str(local / "in"), "semcomp-test/in", recursive=True)
        fs.put(str(local / "ids"), "semcomp-test/ids", recursive=True)
        yield {"so": so, "fs": fs, "local": local, "bucket": "s3://semcomp-test"}
    finally:
        fsio.configure(None)
        server.stop()


def _remote_tree_sha(fs, url: str) -> dict:
    base = url.split("://", 1)[1].rstrip("/") + "/"
    fs.invalidate_cache()
    return {k[len(base):]: hashlib.sha256(fs.cat(k)).hexdigest() for k in fs.find(base)}


def _no_secret(blobs) -> None:
    for b in blobs:
        b = b if isinstance(b, bytes) else str(b).encode()
        assert SECRET.encode() not in b and KEY.encode() not in b


def _cli(*args):
    return [sys.executable, "-m", "semcomp_ext.cli", *map(str, args)]


def test_s3_bucket_to_bucket_kill9_resume_and_bucket_to_local(s3, tmp_path, capsys):
    so, fs, bucket = s3["so"], s3["fs"], s3["bucket"]
    src, out = f"{bucket}/in", f"{bucket}/out-pairs"
    sojson = json.dumps(so)

    # bucket -> local, in process; and the same folder read from local disk
    local_out, ref_out = tmp_path / "from_s3", tmp_path / "from_disk"
    m = compress(CompressOptions([src], str(local_out), drop_rate=0.5, batch_size=16, quiet=True, storage_options=so))
    assert m["status"] == "complete" and m["rows_out"] == sum(ROWS)
    assert all(s["path"].startswith(src + "/") for s in m["sources"])
    compress(CompressOptions([str(s3["local"] / "in")], str(ref_out), drop_rate=0.5, batch_size=16, quiet=True))
    a, b = tree_sha(local_out), tree_sha(ref_out)
    assert a.pop("manifest.json") != b.pop("manifest.json")  # the sources differ (URLs vs paths) ...
    assert a == b  # ... every shard is the same bytes

    # bucket -> bucket, killed (-9) once some shards are committed, then resumed
    env = dict(os.environ, SEMCOMP_TEST_SLEEP_PER_SHARD="0.4")
    p = subprocess.Popen(_cli("compress", src, "-o", out, *ARGS, "--workers", "1", "-q", "--storage-options", sojson),
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fsio.configure(so)
    deadline, done = time.time() + 60, 0
    while time.time() < deadline and p.poll() is None:
        try:
            done = len(load_state(out).get("shards", []))
        except (FileNotFoundError, ValueError):
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    _, err = p.communicate()
    _no_secret([err])
    st = load_state(out)
    assert st["status"] == "in_progress" and 2 <= len(st["shards"]) < len(ROWS)
    fs.invalidate_cache()
    keys = fs.find(out.split("://")[1])
    assert any("/manifest.journal/shards-" in k for k in keys)  # the journal: one object per shard
    assert not any(".tmp-" in k for k in keys)  # nothing half-written is ever on the store
    # each centroid object on the store is complete (its record's size), whatever the kill hit
    for rec in st["shards"]:
        assert fs.size(f"{out}/{rec['centroids']['file']}") == rec["centroids"]["bytes"]

    from semcomp_ext.cli import main

    capsys.readouterr()
    assert main(["compress", src, "-o", out, *ARGS, "--storage-options", sojson]) == 2  # no --resume: refused
    assert main(["compress", src, "-o", out, *ARGS, "--resume", "--storage-options", sojson]) == 0
    assert main(["verify", out, "--storage-options", sojson]) == 0
    cap = capsys.readouterr()
    _no_secret([cap.out, cap.err])
    assert "ok" in cap.out

    remote = _remote_tree_sha(fs, out)
    assert remote == tree_sha(local_out)  # every object, manifest included, byte-identical to bucket -> local
    _no_secret(fs.cat(k) for k in fs.find(out.split("://")[1]))
    _no_secret(open(os.path.join(d, f), "rb").read() for d, _, fl in os.walk(local_out) for f in fl)

    # open_compressed on the URL: the same rows, ids and metadata as the local folder
    from semcomp_ext import open_compressed

    r, l = open_compressed(out, storage_options=so), open_compressed(str(local_out))
    assert len(r) == len(l) == sum(ROWS)
    np.testing.assert_array_equal(r.vectors(), l.vectors())
    assert r.metadata().equals(l.metadata())
    assert [len(b) for b in r.iter_batches(50)] == [len(b) for b in l.iter_batches(50)]

    # a damaged object is found by verify (sizes from one listing, hashes streamed)
    key = out.split("://")[1] + "/" + st["shards"][0]["centroids"]["file"]
    data = bytearray(fs.cat(key))
    data[-1] ^= 1
    fs.pipe(key, bytes(data))
    assert main(["verify", out, "--storage-options", sojson]) == 1
    assert "xxh3_128 mismatch" in capsys.readouterr().err


def test_s3_concepts_and_overwrite(s3, tmp_path):
    """Concepts mode (spill and reduce on the store) equals the local run; --overwrite of a
    URL output replaces only what semcomp wrote."""
    so, bucket, fs = s3["so"], s3["bucket"], s3["fs"]
    out = f"{bucket}/out-concepts"
    opts = dict(drop_rate=0.5, batch_size=16, partitions=3, quiet=True)
    compress(CompressOptions([f"{bucket}/in"], out, concepts=f"{bucket}/ids", storage_options=so, **opts))
    compress(CompressOptions([str(s3["local"] / "in")], str(tmp_path / "ref"), concepts=str(s3["local"] / "ids"), **opts))
    remote, ref = _remote_tree_sha(fs, out), tree_sha(tmp_path / "ref")
    remote.pop("manifest.json"), ref.pop("manifest.json")
    assert remote == ref and any(k.startswith("concepts/") for k in ref)
    assert not any(k.startswith((".spill", "manifest.journal")) for k in remote)
    from semcomp_ext import open_compressed

    r, l = open_compressed(out, storage_options=so), open_compressed(str(tmp_path / "ref"))
    np.testing.assert_array_equal(r.ids(), l.ids())
    np.testing.assert_array_equal(r.vectors(), l.vectors())
    m = compress(CompressOptions([f"{bucket}/in"], out, concepts=f"{bucket}/ids", storage_options=so, overwrite=True, **opts))
    assert m["status"] == "complete"
    fs.pipe(out.split("://")[1] + "/notes.txt", b"mine")
    with pytest.raises(FileExistsError, match="did not write"):
        compress(CompressOptions([f"{bucket}/in"], out, concepts=f"{bucket}/ids", storage_options=so, overwrite=True,
                                 **opts))


def test_memory_filesystem_and_file_urls(tmp_path):
    """Any fsspec filesystem: memory:// in and out; file:// URLs are the local paths."""
    fsspec = pytest.importorskip("fsspec")
    make_clip_layout(tmp_path / "in", rows=(20, 7))
    fs = fsspec.filesystem("memory")
    fs.put(str(tmp_path / "in"), "/semcomp-mem/in", recursive=True)
    try:
        compress(CompressOptions(["memory://semcomp-mem/in"], "memory://semcomp-mem/out", keep=5, quiet=True))
        compress(CompressOptions([f"file://{tmp_path / 'in'}"], f"file://{tmp_path / 'out'}", keep=5, quiet=True))
        mem = {k.split("/semcomp-mem/out/", 1)[1]: hashlib.sha256(fs.cat(k)).hexdigest()
               for k in fs.find("/semcomp-mem/out")}
        loc = tree_sha(tmp_path / "out")
        assert mem.pop("manifest.json") != loc.pop("manifest.json") and mem == loc
        from semcomp_ext import open_compressed

        np.testing.assert_array_equal(open_compressed("memory://semcomp-mem/out").vectors(),
                                      open_compressed(str(tmp_path / "out")).vectors())
    finally:
        fs.rm("/semcomp-mem", recursive=True)


def test_storage_options_errors_do_not_echo(capsys):
    from semcomp_ext.cli import main

    assert main(["verify", "s3://nowhere/x", "--storage-options", '{"secret": "' + SECRET + '"']) == 2
    err = capsys.readouterr().err
    assert "--storage-options" in err and SECRET not in err and len(err.strip().splitlines()) == 1
    assert main(["verify", "s3://nowhere/x", "--storage-options", "[1]"]) == 2
    assert "JSON object" in capsys.readouterr().err
    # an option the backend does not take, an unknown protocol: one line each, no traceback
    assert main(["verify", "s3://nowhere/x", "--storage-options", '{"not_an_option": "' + SECRET + '"}']) == 2
    err = capsys.readouterr().err
    assert "not_an_option" in err and SECRET not in err and len(err.strip().splitlines()) == 1
    assert main(["verify", "nosuchproto://x/y"]) == 2
    err = capsys.readouterr().err
    assert "nosuchproto" in err and len(err.strip().splitlines()) == 1


def test_unreachable_endpoint_is_one_line(tmp_path, capsys):
    """compress and verify against an S3 endpoint nobody listens on: botocore's connection
    error (not an OSError) is one line, exit code 2, no secret."""
    from semcomp_ext.cli import main

    for m in ("a", "b"):
        np.save(tmp_path / f"{m}.npy", np.ones((4, 8), np.float32))
    so = json.dumps({"endpoint_url": f"http://127.0.0.1:{_free_port()}", "key": KEY, "secret": SECRET,
                     "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}})
    assert main(["compress", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "-o", "s3://nobucket/out",
                 "--drop-rate", "0.5", "--storage-options", so]) == 2
    err = capsys.readouterr().err
    assert "could not connect" in err.lower() and len(err.strip().splitlines()) == 1
    _no_secret([err])
    assert main(["verify", "s3://nobucket/out", "--storage-options", so]) == 2
    err = capsys.readouterr().err
    assert "could not connect" in err.lower() and len(err.strip().splitlines()) == 1
    _no_secret([err])


def test_s3_ray_engine_bucket_to_bucket(s3, capfd):
    """--engine ray, bucket -> bucket: the storage options reach the Ray workers with the plan
    (never the manifest or a log); every object equals the local engine's, manifest included."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    so, fs, bucket = s3["so"], s3["fs"], s3["bucket"]
    started = not ray.is_initialized()
    # one CPU: a single worker process (a separate process all the same, which gets the storage
    # options only with the plan); on 2 cores, 2 workers each importing torch took 10 s instead of 6
    ctx = ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False) if started else None
    try:
        for engine in ("local", "ray"):
            m = compress(CompressOptions([f"{bucket}/in"], f"{bucket}/out-{engine}", drop_rate=0.5, batch_size=16,
                                         engine=engine, quiet=True, storage_options=so))
            assert m["status"] == "complete" and m["rows_out"] == sum(ROWS)
        from semcomp_ext.compress.manifest import verify

        fsio.configure(so)
        assert verify(f"{bucket}/out-ray") == []
        ray_objs, local_objs = _remote_tree_sha(fs, f"{bucket}/out-ray"), _remote_tree_sha(fs, f"{bucket}/out-local")
        assert ray_objs == local_objs and len(ray_objs) == 1 + 2 * len(ROWS)  # manifest, centroids and metadata
        _no_secret(fs.cat(k) for k in fs.find("semcomp-test/out-ray"))
        cap = capfd.readouterr()
        _no_secret([cap.out, cap.err])  # Ray Data's progress lines on the driver
        if ctx is not None:  # the Ray session's own log files
            logs = os.path.join(ctx.address_info["session_dir"], "logs")
            _no_secret(open(os.path.join(d, f), "rb").read() for d, _, fl in os.walk(logs) for f in fl)
    finally:
        if started:
            ray.shutdown()


def test_s3_index_and_search(s3, tmp_path, monkeypatch, capsys):
    """`semcomp index` / `search` on a bucket: the index is written under OUT/index/ on the
    store (whole objects, nothing on local disk), loaded from there, and gives the same hits
    as on the same folder locally; a URL without an index is a one-line error; the storage
    options never appear in any output."""
    pytest.importorskip("faiss")
    from semcomp_ext.cli import main

    so, fs, bucket = s3["so"], s3["fs"], s3["bucket"]
    sojson = json.dumps(so)
    monkeypatch.chdir(tmp_path)  # a path mistaken for local would land here
    out, ref = f"{bucket}/out-search", str(tmp_path / "ref")
    opts = dict(drop_rate=0.5, batch_size=16, normalize="output", codec="int8", quiet=True)
    compress(CompressOptions([f"{bucket}/in"], out, storage_options=so, **opts))
    compress(CompressOptions([str(s3["local"] / "in")], ref, **opts))
    q = np.random.default_rng(5).standard_normal((6, 16)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    capsys.readouterr()

    def search_json(folder, *extra):
        assert main(["search", folder, "--query", str(tmp_path / "q.npy"), "-k", "10", "--json", *extra]) == 0
        return json.loads(capsys.readouterr().out)

    # no index yet: on the URL a clear one-line error (exact search only when asked for)
    assert main(["search", out, "--query", str(tmp_path / "q.npy"), "--storage-options", sojson]) == 2
    err = capsys.readouterr().err
    assert "no index in s3://semcomp-test/out-search/index" in err and "semcomp index" in err
    assert len(err.strip().splitlines()) == 1
    _no_secret([err])
    assert search_json(out, "--exact", "--storage-options", sojson) == search_json(ref)  # exact, both

    for folder, extra in ((out, ["--storage-options", sojson]), (ref, [])):
        assert main(["index", folder, "--index-factory", "IVF4,Flat", "--nprobe", "1", "--json", *extra]) == 0
        assert json.loads(capsys.readouterr().out)["factory"] == "IVF4,Flat"
    assert sorted(os.listdir(tmp_path)) == ["q.npy", "ref"]  # nothing written locally for the URL
    fs.invalidate_cache()
    keys = fs.find("semcomp-test/out-search/index")
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["ids.npy", "index.faiss", "index.json"]
    remote_ix = _remote_tree_sha(fs, f"{out}/index")
    local_ix = tree_sha(tmp_path / "ref" / "index")
    for name in ("ids.npy", "index.faiss"):
        assert remote_ix[name] == local_ix[name]  # the same index, byte for byte

    hits = search_json(out, "--storage-options", sojson)
    assert hits == search_json(ref) and len(hits) == 6 and all(len(h) == 10 for h in hits)
    assert {h["metadata"]["caption"] for h in hits[0]} <= {f"s{i}r{j}" for i, n in enumerate(ROWS) for j in range(n)}
    # the saved IVF index (1 of 4 lists probed) is what was searched, not an exact search
    from semcomp_ext.compress.index import search

    res = search(out, q, 10, storage_options=so)
    assert res.method == "IVF4,Flat"
    np.testing.assert_array_equal(res.ids, [[h["id"] for h in hs] for hs in hits])
    # a damaged object of the index is found (size, then sha256) and named in one line
    key = "semcomp-test/out-search/index/index.faiss"
    data = bytearray(fs.cat(key))
    data[-1] ^= 1
    fs.pipe(key, bytes(data))
    assert main(["search", out, "--query", str(tmp_path / "q.npy"), "--storage-options", sojson]) == 2
    err = capsys.readouterr().err
    assert "damaged index" in err and ("sha256" in err or "xxh3_128" in err) and len(err.strip().splitlines()) == 1
    # errors of index / search name the problem, never a storage option's value
    assert main(["index", f"{bucket}/nothing-here", "--storage-options", sojson]) == 2
    assert main(["index", out, "--storage-options", '{"not_an_option": "' + SECRET + '"}']) == 2
    assert main(["search", out, "--query", str(tmp_path / "q.npy"), "--storage-options", '{"key": "' + SECRET]) == 2
    # an endpoint nobody listens on (botocore's error is no OSError): one line, not a traceback
    dead = json.dumps(dict(so, endpoint_url=f"http://127.0.0.1:{_free_port()}",
                           config_kwargs={"retries": {"max_attempts": 1}}))
    assert main(["index", out, "--storage-options", dead]) == 2
    assert main(["search", out, "--query", str(tmp_path / "q.npy"), "--storage-options", dead]) == 2
    cap = capsys.readouterr()
    _no_secret([cap.out, cap.err])
    assert len(cap.err.strip().splitlines()) == 5 and "not_an_option" in cap.err
    assert cap.err.count("Could not connect to the endpoint") == 2
    _no_secret(fs.cat(k) for k in fs.find("semcomp-test/out-search"))


def test_s3_header_checks_fetch_only_headers(s3, tmp_path, monkeypatch):
    """Validating a URL input reads its .npy header / parquet footer, not the whole shard (a
    header read through fsspec's default 50 MiB block fetched every shard twice)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import s3fs.core

    from semcomp_ext.compress import readers

    so, fs, bucket = s3["so"], s3["fs"], s3["bucket"]
    x = np.random.default_rng(0).standard_normal((4096, 256)).astype(np.float32)  # 4 MiB
    np.save(tmp_path / "big.npy", x)
    pq.write_table(pa.table({"embedding": pa.array(list(x), type=pa.list_(pa.float32()))}), tmp_path / "big.parquet")
    fs.put(str(tmp_path / "big.npy"), "semcomp-test/big/big.npy")
    fs.put(str(tmp_path / "big.parquet"), "semcomp-test/big/big.parquet")
    fetched = []
    real = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range", lambda self, start, end: (fetched.append(end - start), real(self, start, end))[1])
    fsio.configure(so)
    try:
        shard = readers.open_npy(f"{bucket}/big/big.npy")
        assert (shard.rows, shard.dim) == (4096, 256)
        assert 0 < sum(fetched) <= 2 * fsio.HEAD_BLOCK
        fetched.clear()
        shard = readers.open_parquet(f"{bucket}/big/big.parquet", "embedding")
        assert (shard.rows, shard.dim) == (4096, 256)
        # the footer, and the first row group's column to learn the dimension: not the file twice
        assert sum(fetched) <= os.path.getsize(tmp_path / "big.parquet") + 2 * fsio.HEAD_BLOCK
        fetched.clear()
        # (URL blocks live in two reused buffers: copy each before asking for the next)
        blocks = [b.copy() for b in readers.iter_chunks(readers.open_npy(f"{bucket}/big/big.npy"), 1000)]
        assert np.array_equal(np.concatenate(blocks), x)
    finally:
        fsio.configure(None)


def test_s3_lock_is_a_conditional_create(s3):
    """Of two jobs on one bucket folder exactly one holds the lock object (If-None-Match: *);
    the lock object of a dead process of this host is stale and taken over."""
    from semcomp_ext.compress.lock import LOCK, FolderLockedError, OutputLock

    fsio.configure(s3["so"])
    url = f"{s3['bucket']}/out-locked"
    a = OutputLock(url).acquire()
    try:
        with pytest.raises(FolderLockedError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            OutputLock(url).acquire()
    finally:
        a.release()
    s3["fs"].pipe_file(f"semcomp-test/out-locked/{LOCK}",
                       json.dumps({"host": socket.gethostname(), "pid": 999999, "started": 0}).encode())
    b = OutputLock(url).acquire()
    assert b.stale["pid"] == 999999
    b.release()
    assert not s3["fs"].exists(f"semcomp-test/out-locked/{LOCK}")


def test_ctrl_c_stops_within_5_s_while_the_store_stalls(s3, tmp_path):
    """Uploads of shards hang (the moto server holds every PUT of a centroids object): SIGINT
    still ends the job within 5 s, with one line saying how to continue."""
    import threading

    from moto.s3.responses import S3Response

    make_clip_layout(tmp_path / "in", rows=ROWS)
    stalled, release = threading.Event(), threading.Event()
    orig = S3Response._key_response_put

    def put(self, query, key_name, *a, **kw):
        if "centroids/" in key_name:
            stalled.set()
            release.wait(120)
        return orig(self, query, key_name, *a, **kw)

    S3Response._key_response_put = put
    job = subprocess.Popen(_cli("compress", tmp_path / "in", "-o", f"{s3['bucket']}/out-stall", *ARGS, "--workers", "2",
                                "--storage-options", json.dumps(s3["so"])), stderr=subprocess.PIPE)
    try:
        assert stalled.wait(90), "the job never reached a shard upload"
        time.sleep(0.5)
        t0 = time.monotonic()
        job.send_signal(signal.SIGINT)
        rc = job.wait(30)
        took = time.monotonic() - t0
        err = job.stderr.read().decode()
    finally:
        release.set()
        S3Response._key_response_put = orig
        if job.poll() is None:
            job.kill()
            job.wait()
    assert took <= 5.0, f"Ctrl-C took {took:.1f} s"
    assert rc == 130 and "--resume" in err and "Traceback" not in err, err
