"""Files of `semcomp compress`: a missing input root named, output files made with the umask's
permissions, block readers closed safely when abandoned."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from semcomp_ext.cli import main
from semcomp_ext.compress import CompressOptions, compress, verify

from _compress_data import ROWS, load_centroids, make_clip_layout


def _run(capsys, *args):
    rc = main(["compress", *map(str, args), "-q"])
    return rc, capsys.readouterr().err


def test_mistyped_root_says_it_does_not_exist(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    rc, err = _run(capsys, tmp_path / "inn", "-o", tmp_path / "out")
    assert rc == 2 and "does not exist" in err and str(tmp_path / "inn") in err
    assert "at least 2 modality" not in err


def _modes(out):
    return {os.path.relpath(os.path.join(d, f), out): stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode)
            for d, _, fs in os.walk(out) for f in fs}


def test_output_files_follow_the_umask(tmp_path):
    make_clip_layout(tmp_path / "in")
    out = tmp_path / "out"
    compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), drop_rate=0.5, quiet=True))
    umask = os.umask(0)
    os.umask(umask)
    modes = _modes(out)
    assert len(modes) == 7 and set(modes.values()) == {0o666 & ~umask}, modes
    # a process with another umask: what open() would give there
    out2 = tmp_path / "out2"
    code = "import os, sys; os.umask(0o027); from semcomp_ext.cli import main; sys.exit(main(sys.argv[1:]))"
    subprocess.run([sys.executable, "-c", code, "compress", str(tmp_path / "in"), "-o", str(out2), "-q"], check=True)
    assert set(_modes(out2).values()) == {0o640}



def test_abandoned_reader_closes_inside_threading_bookkeeping(tmp_path):
    # A consumer that stops early leaves a block reader to the garbage collector, which can run
    # while threading holds its internal shutdown-locks lock (seen as a hang in the suite). The
    # reader's clean-up must not join its read-ahead thread there. Old code: hangs (timeout).
    import subprocess
    import sys
    import textwrap
    import threading

    if not hasattr(threading, "_shutdown_locks_lock"):
        pytest.fail("this Python has no threading._shutdown_locks_lock: adapt the test")
    path = tmp_path / "x.npy"
    np.save(path, np.arange(4000 * 8, dtype=np.float32).reshape(4000, 8))
    src = textwrap.dedent(f"""
        import threading
        from semcomp_ext.compress import readers
        gen = readers.iter_chunks(readers.open_npy({str(path)!r}), 1000)
        first = next(gen)          # the read-ahead thread is now running
        with threading._shutdown_locks_lock:
            gen.close()            # as the collector would, inside threading's bookkeeping
        print("closed", first.shape)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("closing an abandoned reader deadlocked")
    assert r.returncode == 0 and "closed (1000, 8)" in r.stdout, r.stderr[-2000:]


def test_write_errors_name_their_file(tmp_path):
    """A file-size limit (EFBIG, "[Errno 27] File too large" with no file name) is one line
    naming the file being written."""
    import resource

    rng = np.random.default_rng(0)
    for m in ("img", "text"):
        np.save(tmp_path / f"{m}.npy", rng.standard_normal((4000, 64)).astype(np.float32))

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    r = subprocess.run([sys.executable, "-m", "semcomp_ext.cli", "compress", str(tmp_path / "img.npy"),
                        str(tmp_path / "text.npy"), "-o", str(tmp_path / "out"), "-q"],
                       capture_output=True, text=True, timeout=120, preexec_fn=limit)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "File too large" in err and "centroids_00000.npy" in err, err


# ---- mixed float dtypes: promoted as the losses promote them --------------------------------


def _shard_bytes(out):
    folder = out / "centroids"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("fmt", ["npy", "parquet"])
@pytest.mark.parametrize("normalize", ["none", "both"])
def test_mixed_fp16_fp32_inputs_compress_as_both_fp32(tmp_path, fmt, normalize):
    import json

    from _compress_data import make_parquet_layout

    rng = np.random.default_rng(3)
    n = sum(ROWS)
    img16 = rng.standard_normal((n, 16)).astype(np.float16)
    text32 = rng.standard_normal((n, 16)).astype(np.float32)
    outs = {}
    for name, img in (("mixed", img16), ("fp32", img16.astype(np.float32))):  # fp16 values exact in fp32
        root = tmp_path / name
        if fmt == "npy":
            root.mkdir()
            np.save(root / "img_emb.npy", img), np.save(root / "text_emb.npy", text32)
            inputs = [str(root / "img_emb.npy"), str(root / "text_emb.npy")]
        else:
            inputs = make_parquet_layout(root, {"img": img, "text": text32})
        out = tmp_path / f"out_{name}"
        compress(CompressOptions(inputs=inputs, out=str(out), drop_rate=0.5, normalize=normalize, quiet=True))
        assert verify(str(out)) == []
        outs[name] = out
    man = json.loads((outs["mixed"] / "manifest.json").read_text())
    assert man["parameters"]["in_dtype"] == "float32" and man["parameters"]["out_dtype"] == "float32"
    assert _shard_bytes(outs["mixed"]) == _shard_bytes(outs["fp32"])


def test_compress_arrays_promotes_mixed_dtypes():
    from semcomp_ext.compress import compress_arrays

    rng = np.random.default_rng(4)
    a16 = rng.standard_normal((300, 24)).astype(np.float16)
    b32 = rng.standard_normal((300, 24)).astype(np.float32)
    mixed = compress_arrays([a16, b32], drop_rate=0.5, normalize="both", batch_size=128)
    ref = compress_arrays([a16.astype(np.float32), b32], drop_rate=0.5, normalize="both", batch_size=128)
    assert mixed.in_dtype == "float32" and mixed.codes.dtype == np.float32
    assert mixed.codes.tobytes() == ref.codes.tobytes()
    # float32 + float64: float64, as the losses promote (computed in float32 like any float64 input)
    wide = compress_arrays([b32, a16.astype(np.float64)], keep=12)
    assert wide.in_dtype == "float64" and wide.codes.dtype == np.float32
    assert wide.codes.tobytes() == compress_arrays([b32.astype(np.float64), a16.astype(np.float64)], keep=12).codes.tobytes()
