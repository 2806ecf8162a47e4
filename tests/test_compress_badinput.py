"""Bad input: each a clear error naming the problem, and no output that looks complete."""

from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest

pytest.importorskip("pyarrow")

from semcomp_ext.cli import main
from semcomp_ext.compress import CompressOptions, compress, verify

from _compress_data import ROWS, load_centroids, make_clip_layout


def _run(capsys, *args):
    rc = main(["compress", *map(str, args), "-q"])
    return rc, capsys.readouterr().err


def _not_complete(out):
    m = out / "manifest.json"
    return not m.exists() or json.loads(m.read_text())["status"] != "complete"


def test_row_count_mismatch(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    np.save(tmp_path / "in" / "text_emb" / "text_emb_0001.npy", np.zeros((32, 16), np.float32))
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out")
    assert rc == 2 and "row counts differ" in err and "text_emb_0001.npy" in err
    assert not (tmp_path / "out").exists()


def test_dim_mismatch(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    np.save(tmp_path / "in" / "img_emb" / "img_emb_0002.npy", np.zeros((5, 12), np.float32))
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out")
    assert rc == 2 and "dimension mismatch" in err and "img_emb_0002.npy" in err


def test_nan_row_names_file_and_row(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    p = tmp_path / "in" / "text_emb" / "text_emb_0001.npy"
    a = np.load(p)
    a[20, 3] = np.nan
    np.save(p, a)
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out", "--batch-size", "8")
    assert rc == 2 and "text_emb_0001.npy" in err and "row 20" in err and "--skip-invalid" in err
    assert _not_complete(tmp_path / "out")
    assert verify(str(tmp_path / "out")) != []


def test_skip_invalid_counts_and_filters_metadata(tmp_path):
    import pyarrow.parquet as pq

    data = make_clip_layout(tmp_path / "in")
    p = tmp_path / "in" / "img_emb" / "img_emb_0000.npy"
    a = np.load(p)
    a[3, 0], a[40, 5] = np.inf, np.nan
    np.save(p, a)
    out = tmp_path / "out"
    m = compress(CompressOptions(inputs=[str(tmp_path / "in")], out=str(out), batch_size=16, skip_invalid=True, quiet=True))
    assert m["invalid_rows_skipped"] == 2 and m["shards"][0]["invalid_rows"] == 2
    assert m["shards"][0]["rows"] == ROWS[0] - 2
    got = load_centroids(out)
    assert got.shape == (sum(ROWS) - 2, 16) and np.isfinite(got).all()
    meta = pq.read_table(out / "metadata" / "metadata_00000.parquet").column("row").to_pylist()
    assert meta == [r for r in range(ROWS[0]) if r not in (3, 40)]
    keep = np.ones(sum(ROWS), bool)
    keep[[3, 40]] = False
    np.testing.assert_allclose(got, ((data["img"] + data["text"]) / 2)[keep], rtol=1e-6)
    assert verify(str(out)) == []


def test_truncated_npy(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    p = tmp_path / "in" / "img_emb" / "img_emb_0001.npy"
    p.write_bytes(p.read_bytes()[:-100])
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out")
    assert rc == 2 and "truncated or corrupt .npy" in err and "img_emb_0001.npy" in err
    p.write_bytes(b"garbage, not an npy file")
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out")
    assert rc == 2 and "corrupt .npy" in err


def test_corrupt_parquet_metadata(tmp_path, capsys):
    make_clip_layout(tmp_path / "in")
    p = tmp_path / "in" / "metadata" / "metadata_0002.parquet"
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out")
    assert rc == 2 and "corrupt parquet" in err and "metadata_0002.parquet" in err


def test_missing_files(tmp_path, capsys):
    make_clip_layout(tmp_path / "in", metadata=False)
    rc, err = _run(capsys, tmp_path / "in" / "img_emb", tmp_path / "nope", "-o", tmp_path / "out")
    assert rc == 2 and "nope" in err
    os.unlink(tmp_path / "in" / "text_emb" / "text_emb_0002.npy")
    rc, err = _run(capsys, tmp_path / "in", "-o", tmp_path / "out")
    assert rc == 2 and "shard counts differ" in err
    rc, err = _run(capsys, tmp_path / "in" / "img_emb", "-o", tmp_path / "out")
    assert rc == 2 and "at least 2 modalities" in err and "expected one of these input layouts" in err


def test_disk_full_leaves_no_complete_output(tmp_path, monkeypatch, capsys):
    from semcomp_ext.compress import atomic

    make_clip_layout(tmp_path / "in", metadata=False)
    real = atomic.HashingWriter.write
    calls = {"n": 0}

    def flaky(self, data):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(atomic.HashingWriter, "write", flaky)
    out = tmp_path / "out"
    rc, err = _run(capsys, tmp_path / "in", "-o", out, "--batch-size", "16")
    assert rc == 2 and "disk full" in err and "centroids_0000" in err
    assert _not_complete(out)
    assert not [f for _, _, fs in os.walk(out) for f in fs if ".tmp-" in f]  # temp files removed


def test_library_errors_name_fields_and_the_cli_names_flags(tmp_path, capsys):
    from semcomp_ext.compress.options import OptionError

    make_clip_layout(tmp_path / "in", metadata=False)
    inp = tmp_path / "in"
    img, text = inp / "img_emb", inp / "text_emb"
    cases = [  # (options, CLI arguments, library message start, CLI message start)
        (dict(inputs=[], modalities=[f"img={tmp_path / 'nope'}", f"text={text}"]),
         ["--modality", f"img={tmp_path / 'nope'}", "--modality", f"text={text}"],
         "modalities: img: no such file", "--modality: img: no such file"),
        (dict(inputs=[], modalities=[f"img={img}", f"img={text}"]),
         ["--modality", f"img={img}", "--modality", f"img={text}"],
         "modalities: img given twice", "--modality: img given twice"),
        (dict(inputs=[str(inp)], codec="int4"), [inp, "--codec", "int4"],
         "codec 'int4' is not a codec", "--codec 'int4' is not a codec"),
    ]
    for i, (kw, argv, lib, flag) in enumerate(cases):
        with pytest.raises((OptionError, FileNotFoundError)) as e:
            compress(CompressOptions(out=str(tmp_path / f"o{i}"), quiet=True, **kw))
        assert str(e.value).startswith(lib), e.value
        rc, err = _run(capsys, *argv, "-o", tmp_path / f"c{i}")
        assert rc == 2 and err.startswith(f"semcomp compress: error: {flag}"), err

    # --resume with other parameters: `resume: ...` from the library, `--resume: ...` on the CLI
    out = tmp_path / "out"
    assert _run(capsys, inp, "-o", out, "--keep", "8")[0] == 0
    m = json.loads((out / "manifest.json").read_text())
    m["status"] = "in_progress"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(OptionError, match=r"^resume: parameters differ from the interrupted run: \['drop_rate', 'keep'\]"):
        compress(CompressOptions(inputs=[str(inp)], out=str(out), keep=4, resume=True, quiet=True))
    rc, err = _run(capsys, inp, "-o", out, "--keep", "4", "--resume")
    assert rc == 2 and err.startswith("semcomp compress: error: --resume: parameters differ"), err
    # --resume on a folder without a manifest: a FileExistsError naming the field
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    with pytest.raises(FileExistsError, match=r"^resume: .* has no manifest.json"):
        compress(CompressOptions(inputs=[str(inp)], out=str(tmp_path / "other"), resume=True, quiet=True))
    rc, err = _run(capsys, inp, "-o", tmp_path / "other", "--resume")
    assert rc == 2 and err.startswith("semcomp compress: error: --resume: ") and "has no manifest.json" in err, err
