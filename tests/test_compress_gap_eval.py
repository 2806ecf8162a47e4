"""`semcomp gap` equals the library metrics on the whole data; `semcomp eval` runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("pyarrow")

import semcomp_ext as sc
from semcomp_ext.cli import main
from semcomp_ext.compress.analysis import gap_report

from _compress_data import ROWS, make_clip_layout, make_labelled_clusters


def test_gap_streamed_matches_metrics(tmp_path):
    data = make_clip_layout(tmp_path / "in", metadata=False)
    rep = gap_report([str(tmp_path / "in")], batch_size=8, quiet=True)
    a, b = (torch.from_numpy(data[k]) for k in ("img", "text"))
    assert rep["rows"] == sum(ROWS)
    assert rep["modality_gap"]["img-text"] == pytest.approx(float(sc.modality_gap(a, b)), rel=1e-9)
    assert rep["true_pair_cosine"]["img-text"] == pytest.approx(float(sc.true_pair_cosine(a, b)), rel=1e-9)
    ev = sc.explained_variance([a, b])
    assert rep["explained_variance_components"] == {str(k): v for k, v in ev.components.items()}
    np.testing.assert_allclose(rep["explained_variance_ratio_top10"], ev.ratio[:10].numpy(), rtol=1e-6)


def test_eval_compressed_vs_original(tmp_path, capsys):
    # three classes with separated means so accuracies are meaningful
    make_labelled_clusters(tmp_path)
    assert main(["compress", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--drop-rate", "0.5", "-q"]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "in"), "--compressed", str(tmp_path / "out"), "--labels", str(tmp_path / "lab"),
                 "--k", "5", "--json", "-q"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["compression_ratio"] == 4.0 and rep["test"] == 48
    for name in ("original_img", "original_concat", "compressed"):
        assert rep["accuracy"][name]["knn@5"] > 0.9, rep["accuracy"]
    # neighbour recall: the concat's own neighbours are the reference (1.0); the others recover some
    nr = rep["neighbour_recall"]
    assert set(nr) == {"original_img", "original_text", "original_concat", "compressed"}
    assert nr["original_concat"] == 1.0 and 0 < nr["compressed"] < 1
    comp = next(r for r in rep["table"] if r["representation"].startswith("compressed"))
    base = next(r for r in rep["table"] if r["representation"] == "original concat")
    assert comp["delta_pt"]["linear_probe"] == round(100 * comp["linear_probe"] - 100 * base["linear_probe"], 2)
    # the human report states the same numbers
    assert main(["eval", str(tmp_path / "in"), "--compressed", str(tmp_path / "out"), "--labels", str(tmp_path / "lab"),
                 "--k", "5", "-q"]) == 0
    text = capsys.readouterr().out
    assert "all 240 rows" in text and "negative = lost" in text and "4.00x" in text


def test_eval_seed_without_sample_seed_says_it_is_the_rfs_seed(tmp_path, capsys):
    make_labelled_clusters(tmp_path)
    base = ["eval", str(tmp_path / "in"), "--labels", str(tmp_path / "lab"), "--drop-rates", "0.5", "--json"]
    reports = {}
    for extra in (["--seed", "3"], ["--seed", "3", "-q"], ["--seed", "3", "--sample-seed", "0"], ["--rfs-seed", "3"]):
        assert main(base + extra) == 0
        cap = capsys.readouterr()
        notes = [ln for ln in cap.err.splitlines() if "--sample-seed" in ln]
        if extra == ["--seed", "3"]:
            assert len(notes) == 1 and "--seed is the RFS seed" in notes[0], cap.err
        else:  # -q, the sample seed given, or the old RFS spelling: no such line
            assert notes == [], (extra, cap.err)
        reports[tuple(extra)] = json.loads(cap.out)
    # the sample seed stays 0 and --seed is the RFS seed in each case: the same report
    rows = [r["rows"] for r in reports.values()]
    assert all(r == rows[0] for r in rows)
