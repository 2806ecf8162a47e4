"""`semcomp reproduce` on a minimal config: every artefact, a report naming each claim, and the
same seed giving a byte-identical results.json."""

import json

import pytest

from semcomp_ext.cli import main
from semcomp_ext.train.report import claims

try:  # through the shim: a plain import fails on CPU torch with a CUDA torchvision
    from semcomp_ext._compat import import_open_clip

    import_open_clip()
except ImportError:
    pytest.skip("open_clip is not installed", allow_module_level=True)
pytest.importorskip("matplotlib")

ARGS = ["--dataset", "digits", "--temperatures", "0.05,0.4", "--steps", "6", "--warmup", "1", "--limit", "320",
        "--batch-size", "64", "--probe-iter", "15", "--drop-rates", "0,0.9", "--rfs-seeds", "0,1", "--quiet"]
ARTEFACTS = ["results.json", "timings.json", "report.md", "geometry.csv", "classification.csv", "rfs.csv", "baselines.csv",
             "codecs.csv", "retrieval.csv", "gap_vs_tau.png", "acc_vs_drop.png", "acc_vs_bytes.png"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outs = [tmp_path_factory.mktemp(f"rep{i}") for i in range(2)]
    for out in outs:
        assert main(["reproduce", "--out", str(out), *ARGS]) == 0
    return outs


def test_every_artefact_and_report(runs):
    out = runs[0]
    for name in ARTEFACTS:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "gap_vs_tau.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for claim in ("(a)", "(b)", "(c)", "(d)"):
        assert f"**{claim}" in report
    res = json.loads((out / "results.json").read_text())
    assert set(res["temperatures"]) == {"0.05", "0.4"}
    r = res["temperatures"]["0.4"]
    assert {"modality_gap", "true_pair_cosine", "fisher_ratio", "n95_pooled"} <= set(r["geometry"])
    assert set(r["classification"]["forms"]) == {"image", "text", "concat", "centroid"}
    assert [x["drop_rate"] for x in r["classification"]["rfs"]] == [0.0, 0.9]
    assert r["classification"]["rfs"][1]["probe"]["n"] == 2
    assert {b["method"] for b in r["baselines"]} >= {"pca", "pca+int8"}
    assert set(r["retrieval"]["image_to_text"]) == {"1", "5", "10"}
    assert all(0 <= x["probe"] <= 1 for x in r["baselines"])
    header = (out / "rfs.csv").read_text().splitlines()[0]
    assert header.startswith("tau,drop_rate,keep,bytes,compression,probe_mean,probe_std")
    assert set(res["claims"]) == {"a", "b", "c", "d"}
    assert {c["codec"] for c in r["codecs"]} >= {"int8", "binary"}
    assert set(res["codec_compression"]["per_tau"]["0.4"]) >= {"float32", "int8", "binary"}
    assert "Storage codecs" in report


def test_same_seed_same_results(runs):
    assert (runs[0] / "results.json").read_bytes() == (runs[1] / "results.json").read_bytes()


def test_rerun_reuses_finished_training(runs, tmp_path):
    # A second reproduce into the same folder resumes: training is complete, results equal.
    before = (runs[0] / "results.json").read_bytes()
    assert main(["reproduce", "--out", str(runs[0]), *ARGS]) == 0
    assert (runs[0] / "results.json").read_bytes() == before
    timings = json.loads((runs[0] / "timings.json").read_text())
    assert all(t < 30 for t in timings["train_s"].values())


def test_claim_verdicts_follow_the_numbers():
    def tau(gap, concat, centroid, rfs):
        return {"geometry": {"modality_gap": gap},
                "classification": {"forms": {"concat": {"probe": concat, "knn": concat}, "centroid": {"probe": centroid, "knn": centroid}},
                                   "rfs": [{"drop_rate": d, "compression": c, "probe": {"mean": m}} for d, c, m in rfs]}}

    res = {"temperatures": {
        "0.01": tau(0.9, 0.90, 0.85, [(0.0, 2.0, 0.85), (0.95, 40.0, 0.60)]),
        "0.4": tau(0.3, 0.90, 0.91, [(0.0, 2.0, 0.91), (0.95, 40.0, 0.90)])}}
    c = claims(res)
    assert c["a"]["verdict"] == "held" and c["a"]["strictly_decreasing"]
    assert c["b"]["verdict"] == "partly held" and not c["b"]["per_tau"]["0.01"]["ok"]
    assert c["c"]["verdict"] == "held" and c["c"]["loss_low"] == pytest.approx(0.25)
    assert c["d"]["per_tau"] == {"0.01": None, "0.4": 40.0} and c["d"]["verdict"] == "held"
    res["temperatures"]["0.4"]["geometry"]["modality_gap"] = 1.0
    assert claims(res)["a"]["verdict"] == "did not hold"
