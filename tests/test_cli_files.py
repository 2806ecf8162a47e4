"""`semcomp compress / gap / eval` on the files users have: img_emb.npy + text_emb.npy,
float16/float64, without labels; human summaries, real-dtype ratios, and one-line errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import semcomp_ext as sc
from semcomp_ext.cli import main
from semcomp_ext.compress import CompressOptions, compress, compress_arrays
from semcomp_ext.compress.analysis import eval_report

from _compress_data import load_centroids


def _pairs(folder, n=240, d=32, classes=4, dtype=np.float16, seed=0, names=("img_emb.npy", "text_emb.npy")):
    """Two row-aligned modalities sharing class structure, and integer labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d)) * 2
    y = rng.integers(0, classes, n)
    os.makedirs(folder, exist_ok=True)
    arrs = []
    for name in names:
        a = (centres[y] + rng.standard_normal((n, d))).astype(dtype)
        np.save(os.path.join(folder, name), a)
        arrs.append(a)
    np.save(os.path.join(folder, "labels.npy"), y)
    return arrs, y


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return rc, out, err


def test_compress_two_files_fp16_keeps_dtype_and_reports(tmp_path, capsys):
    (img, txt), _ = _pairs(tmp_path)
    rc, out, _ = _run(capsys, "compress", tmp_path / "img_emb.npy", tmp_path / "text_emb.npy", "-o", tmp_path / "o",
                      "--drop-rate", "0.5", "-q")
    assert rc == 0 and out == ""  # -q: nothing
    got = load_centroids(tmp_path / "o")
    assert got.dtype == np.float16 and got.shape == (240, 16)  # fp16 in -> fp16 out
    idx = sc.rfs_index(32, 16, 0).numpy()
    want = ((img.astype(np.float32)[:, idx] + txt.astype(np.float32)[:, idx]) / 2).astype(np.float16)
    np.testing.assert_array_equal(got, want)
    man = json.load(open(tmp_path / "o" / "manifest.json"))
    assert man["parameters"]["modalities"] == ["img", "text"] and man["parameters"]["out_dtype"] == "float16"
    # the human summary: path, rows, bytes, the real ratio (2 x 32 fp16 -> 16 fp16 = 4x)
    rc, out, _ = _run(capsys, "compress", tmp_path / "img_emb.npy", tmp_path / "text_emb.npy", "-o", tmp_path / "o2",
                      "--drop-rate", "0.5", "--out-dtype", "float32")
    assert rc == 0 and str(tmp_path / "o2") in out and "240 rows" in out
    assert "2 x 32 float16 -> 16 float32: 2.00x smaller" in out  # fp16 -> fp32 output: 2x, not 4x
    rc, out, _ = _run(capsys, "compress", tmp_path / "img_emb.npy", tmp_path / "text_emb.npy", "-o", tmp_path / "o3",
                      "--keep", "8", "--json")
    st = json.loads(out)
    assert st["status"] == "complete" and st["rows_out"] == 240 and st["compression_ratio"] == 2 * 32 * 2 / (8 * 2)


def test_folder_with_both_files_and_named_modalities(tmp_path, capsys):
    _pairs(tmp_path / "d")
    rc, _, _ = _run(capsys, "compress", tmp_path / "d", "-o", tmp_path / "a", "-q")
    assert rc == 0
    rc, _, _ = _run(capsys, "compress", "--modality", f"img={tmp_path / 'd' / 'img_emb.npy'}",
                    "--modality", f"text={tmp_path / 'd' / 'text_emb.npy'}", "-o", tmp_path / "b", "-q")
    assert rc == 0
    np.testing.assert_array_equal(load_centroids(tmp_path / "a"), load_centroids(tmp_path / "b"))
    man = json.load(open(tmp_path / "a" / "manifest.json"))
    assert man["parameters"]["modalities"] == ["img", "text"]


@pytest.mark.parametrize("argv, expect", [
    (["{d}/img_emb.npy"], "need at least 2 modalities"),
    (["{d}/labels.npy", "{d}/img_emb.npy", "{d}/notes.txt"], "not a .npy or .parquet file"),
    (["{d}/empty"], "holds no *_emb folders"),
    (["--modality", "img"], "--modality must be NAME=PATH"),
    ([], "no inputs given"),
])
def test_unrecognised_layouts_list_the_expected_ones(tmp_path, capsys, argv, expect):
    _pairs(tmp_path)
    os.makedirs(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("x")
    for cmd in (["compress", "-o", str(tmp_path / "o")], ["gap"]):
        rc, out, err = _run(capsys, *cmd, *[a.format(d=tmp_path) for a in argv])
        assert rc == 2 and expect in err, err
        if "NAME=PATH" not in expect:
            assert "expected one of these input layouts" in err and "img_emb.npy" in err


def test_shards_follow_numeric_order(tmp_path, capsys):
    rng = np.random.default_rng(1)
    rows = {}
    for m in ("img", "text"):
        os.makedirs(tmp_path / "r" / f"{m}_emb")
        for i in range(12):  # img_emb_10.npy must be shard 10, not shard 2
            a = rng.standard_normal((i + 1, 4)).astype(np.float32)
            np.save(tmp_path / "r" / f"{m}_emb" / f"{m}_emb_{i}.npy", a)
            rows.setdefault(m, []).append(a)
    assert _run(capsys, "compress", tmp_path / "r", "-o", tmp_path / "o", "-q")[0] == 0
    c10 = np.load(tmp_path / "o" / "centroids" / "centroids_00010.npy")
    np.testing.assert_array_equal(c10, (rows["img"][10] + rows["text"][10]) / 2)


def test_float64_input_is_cast_and_said(tmp_path, capsys):
    (img, txt), _ = _pairs(tmp_path, dtype=np.float64)
    rc, _, err = _run(capsys, "compress", tmp_path / "img_emb.npy", tmp_path / "text_emb.npy", "-o", tmp_path / "o")
    assert rc == 0 and "float64" in err and "cast to float32" in err
    got = load_centroids(tmp_path / "o")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, (img.astype(np.float32) + txt.astype(np.float32)) / 2)


@pytest.mark.parametrize("codec", [None, "int8"])
def test_compress_arrays_equals_the_files(tmp_path, codec):
    (img, txt), _ = _pairs(tmp_path, n=300)
    compress(CompressOptions(inputs=[str(tmp_path / "img_emb.npy"), str(tmp_path / "text_emb.npy")], out=str(tmp_path / "o"),
                             drop_rate=0.75, seed=3, codec=codec, batch_size=64, codec_sample_rows=100, quiet=True))
    res = compress_arrays({"img": img, "text": txt}, drop_rate=0.75, seed=3, codec=codec, codec_sample_rows=100)
    files = load_centroids(tmp_path / "o")
    assert res.codes.dtype == files.dtype and res.codes.tobytes() == files.tobytes()
    np.testing.assert_array_equal(res.index, sc.rfs_index(32, 8, 3).numpy())
    assert res.vectors().shape == (300, 8) and res.rows.tolist() == list(range(300))
    assert sc.compress_arrays is compress_arrays  # also exported lazily from the package
    from semcomp_ext.compress.api import codebook_bytes  # every stored byte: int8's scales are its codebook

    assert res.compression_ratio == pytest.approx(2 * 32 * 2 / (8 * (1 if codec == "int8" else 2)
                                                                  + codebook_bytes(res.codec) / 300))
    with pytest.raises(ValueError, match="need at least 2"):
        compress_arrays([img])
    with pytest.raises(ValueError, match="has shape"):
        compress_arrays([img, txt[:10]])
    with pytest.raises(TypeError, match="float16, float32 or float64"):
        compress_arrays([img.astype(np.int32), txt])


def test_eval_on_files_without_compressing_first(tmp_path, capsys):
    _pairs(tmp_path, n=400)
    d = tmp_path
    rc, out, err = _run(capsys, "eval", d / "img_emb.npy", d / "text_emb.npy", "--labels", d / "labels.npy",
                        "--drop-rates", "0.5,0.9", "--max-rows", "300")
    assert rc == 0
    assert "a random sample of 300 of 400 rows (seed 0" in out  # the subsample is stated
    assert "centroid + RFS drop 0.5" in out and "centroid + RFS drop 0.9" in out and "negative = lost" in out
    assert "eval" in err  # progress on stderr
    rc, out2, err = _run(capsys, "eval", d / "img_emb.npy", d / "text_emb.npy", "--labels", d / "labels.npy",
                         "--drop-rates", "0.5,0.9", "--max-rows", "300", "-q", "--json")
    assert rc == 0 and err == ""  # -q silences the progress
    rep = json.loads(out2)
    assert rep["rows"] == 300 and rep["rows_total"] == 400
    rows = {r["representation"]: r for r in rep["table"]}
    r9 = rows["centroid + RFS drop 0.9"]
    assert r9["bytes_per_item"] == 3 * 2 and r9["compression_ratio"] == pytest.approx(2 * 32 * 2 / 6)
    base = rows["original concat"]["linear_probe"]
    assert r9["delta_pt"]["linear_probe"] == round(100 * r9["linear_probe"] - 100 * base, 2)
    assert rows["centroid + RFS drop 0.5"]["linear_probe"] > 0.9  # separable classes survive half the features
    nr = [rows[f"centroid + RFS drop {r}"]["neighbour_recall"] for r in ("0.5", "0.9")]
    assert rows["original concat"]["neighbour_recall"] == 1.0 and 1 > nr[0] > nr[1] > 0  # fewer features, fewer neighbours kept
    # same seed -> same sample and numbers; the human table states those numbers
    assert f"{100 * r9['linear_probe']:.1f}%" in out


def test_eval_labels_optional_and_checked(tmp_path, capsys):
    _, y = _pairs(tmp_path, n=200)
    d = tmp_path
    files = [d / "img_emb.npy", d / "text_emb.npy"]
    rc, out, _ = _run(capsys, "eval", *files, "--drop-rates", "0.5", "-q")
    assert rc == 0 and "no labels: neighbour recall only" in out and "probe" not in out.split("\n")[1]
    np.save(d / "short.npy", y[:150])
    rc, _, err = _run(capsys, "eval", *files, "--labels", d / "short.npy", "--drop-rates", "0.5", "-q")
    assert rc == 2 and "150 labels for 200 input rows" in err and len(err.strip().splitlines()) == 1
    np.save(d / "float.npy", np.random.default_rng(0).random(200))
    rc, _, err = _run(capsys, "eval", *files, "--labels", d / "float.npy", "--drop-rates", "0.5", "-q")
    assert rc == 2 and "labels must be integers, got dtype float64" in err
    rc, _, err = _run(capsys, "eval", *files, "-q")
    assert rc == 2 and "--compressed" in err and "--drop-rates" in err


def test_eval_ratio_uses_real_dtypes(tmp_path):
    _pairs(tmp_path, n=120)
    files = [str(tmp_path / "img_emb.npy"), str(tmp_path / "text_emb.npy")]
    compress(CompressOptions(inputs=files, out=str(tmp_path / "o"), drop_rate=0.5, out_dtype="float32", quiet=True))
    rep = eval_report(files, str(tmp_path / "o"))
    assert rep["compression_ratio"] == 2 * 32 * 2 / (16 * 4)  # fp16 in -> fp32 out: 2x (not 4x)


def test_resume_with_other_batch_size_and_after_nan(tmp_path, capsys):
    (img, txt), _ = _pairs(tmp_path, n=100, dtype=np.float32)
    bad = img.copy()
    bad[70] = np.nan
    np.save(tmp_path / "img_emb.npy", bad)
    files = [tmp_path / "img_emb.npy", tmp_path / "text_emb.npy"]
    rc, _, err = _run(capsys, "compress", *files, "-o", tmp_path / "o", "-q")
    assert rc == 2 and "--skip-invalid --resume" in err
    rc, _, err = _run(capsys, "compress", *files, "-o", tmp_path / "o", "-q", "--skip-invalid", "--resume")
    assert rc == 0, err
    assert load_centroids(tmp_path / "o").shape == (99, 32)
    # pairs mode: a changed --batch-size cannot change the output, so --resume accepts it
    np.save(tmp_path / "img_emb.npy", img)
    files = [tmp_path / "img_emb.npy", tmp_path / "text_emb.npy"]
    assert _run(capsys, "compress", *files, "-o", tmp_path / "p", "-q", "--batch-size", "16")[0] == 0
    man = json.load(open(tmp_path / "p" / "manifest.json"))
    man["status"] = "in_progress"
    man["shards"] = []
    json.dump(man, open(tmp_path / "p" / "manifest.json", "w"))
    os.unlink(tmp_path / "p" / "centroids" / "centroids_00000.npy")
    rc, _, err = _run(capsys, "compress", *files, "-o", tmp_path / "p", "-q", "--batch-size", "64", "--resume")
    assert rc == 0, err
    np.testing.assert_array_equal(load_centroids(tmp_path / "p"), (img + txt) / 2)
    # ... other parameter changes are still refused
    man["status"] = "in_progress"
    json.dump(man, open(tmp_path / "p" / "manifest.json", "w"))
    rc, _, err = _run(capsys, "compress", *files, "-o", tmp_path / "p", "-q", "--seed", "5", "--resume")
    assert rc == 2 and "parameters differ" in err


def test_normalize_needs_a_value(tmp_path, capsys):
    _pairs(tmp_path)
    with pytest.raises(SystemExit):  # a bare --normalize would swallow the next path
        main(["compress", "--normalize", str(tmp_path / "img_emb.npy"), str(tmp_path / "text_emb.npy"), "-o", "x"])
    assert "invalid choice" in capsys.readouterr().err
    rc, _, _ = _run(capsys, "compress", "--normalize", "input", tmp_path / "img_emb.npy", tmp_path / "text_emb.npy",
                    "-o", tmp_path / "o", "-q")
    assert rc == 0


def test_gap_from_files_human_and_json(tmp_path, capsys):
    _pairs(tmp_path)
    rc, out, _ = _run(capsys, "gap", tmp_path / "img_emb.npy", tmp_path / "text_emb.npy", "-q")
    assert rc == 0 and "img-text: modality gap" in out and "240 rows" in out
    rc, out, _ = _run(capsys, "gap", tmp_path, "-q", "--json")
    assert json.loads(out)["rows"] == 240


def test_ridge_loo_matches_brute_force_leave_one_out():
    import torch

    from semcomp_ext.eval import ridge_loo_accuracy
    from semcomp_ext.eval.probe import RIDGE_GRID

    g = torch.Generator().manual_seed(0)
    n, d = 40, 6
    y = torch.arange(n) % 3
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + torch.randn(3, d, generator=g, dtype=torch.float64)[y]
    acc, l2 = ridge_loo_accuracy(x, y, x, y)
    # brute force: refit ridge with an unpenalised intercept without row i, for every penalty
    xc = x - x.mean(0)
    xs = xc / xc.pow(2).sum(1).mean().sqrt()
    t = torch.nn.functional.one_hot(y, 3).double()
    scores = []
    for gl in RIDGE_GRID:
        ok = 0
        for i in range(n):
            m = torch.arange(n) != i
            a, b = xs[m], t[m]
            am, bm = a.mean(0), b.mean(0)
            w = torch.linalg.solve((a - am).T @ (a - am) + gl * n * torch.eye(d, dtype=torch.float64), (a - am).T @ (b - bm))
            ok += int(((xs[i] - am) @ w + bm).argmax() == y[i])
        scores.append(ok / n)
    best = max(scores)
    assert len(set(scores)) > 1  # the penalty matters on this data: the choice is tested
    assert l2 == max(gl for gl, s in zip(RIDGE_GRID, scores) if s >= best - 1e-12)
    # test accuracy of the chosen penalty, fitted on every train row
    w = torch.linalg.solve(xs.T @ xs + l2 * n * torch.eye(d, dtype=torch.float64), xs.T @ (t - t.mean(0)))
    assert acc == float(((xs @ w + t.mean(0)).argmax(1) == y).double().mean())
