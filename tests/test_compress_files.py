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
