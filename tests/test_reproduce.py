"""`semcomp reproduce` on a minimal config: every artefact, a report whose every verdict shows
its interval and sample sizes, the same settings giving a byte-identical results.json, and the
documentation regenerated from a run."""

import json

import pytest

from semcomp_ext.cli import main

try:  # through the shim: a plain import fails on CPU torch with a CUDA torchvision
    from semcomp_ext._compat import import_open_clip

    import_open_clip()
except ImportError:
    pytest.skip("open_clip is not installed", allow_module_level=True)
pytest.importorskip("matplotlib")

ARGS = ["--datasets", "digits", "--temperatures", "0.05,0.4", "--steps", "6", "--warmup", "1", "--limit", "320",
        "--batch-size", "64", "--drop-rates", "0,0.9", "--train-seeds", "0,1", "--rfs-seeds", "0,1", "--reps", "200", "--quiet"]
ARTEFACTS = ["results.json", "timings.json", "report.md", "geometry.csv", "classification.csv", "rfs.csv", "baselines.csv",
             "retrieval.csv", "gap_vs_tau.png", "gap_vs_tau.svg", "acc_vs_kept.png", "acc_vs_kept.svg",
             "acc_vs_bytes_digits.png", "acc_vs_bytes_digits.svg"]
VERDICTS = {"held", "not held", "inconclusive"}


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
    assert b"<svg" in (out / "gap_vs_tau.svg").read_bytes()[:400]
    res = json.loads((out / "results.json").read_text())
    D = res["datasets"]["digits"]
    assert (D["num_train"], D["num_test"], D["dim"]) == (320, 80, 64)
    assert set(D["temperatures"]) == {"0.05", "0.4"}
    r = D["temperatures"]["0.4"]
    assert set(r["forms"]) == {"image", "text", "concat", "centroid"}
    s = r["forms"]["concat"]["probe"]
    assert s["lo"] <= s["mean"] <= s["hi"] and (s["n_seeds"], s["n_rfs"], s["n_test"]) == (2, 1, 80)
    assert [x["keep"] for x in r["rfs"]] == [64, 51, 12, 6]  # drop 0 and 0.9, and the 2.5x/10x/20x targets
    assert r["rfs"][1]["probe"]["n_rfs"] == 2
    assert set(r["recovery_r2"]) == {"image", "text"} and r["recovery_r2"]["image"]["mean"] < 0.999
    methods = set(r["budgets"][0]["methods"])
    assert methods >= {"rfs", "rfs+int8", "rfs+binary", "pca", "pca+int8", "truncation"}
    assert all(row["winner"] in row["methods"] for row in r["budgets"])
    assert set(r["retrieval"]["image_to_text"]) == {"1", "5", "10"}
    assert set(res["claims"]) == {"a", "b", "c", "d"}
    assert all(c["verdict"] in VERDICTS for c in res["claims"].values())
    assert set(D["claims"]["d"]["per_target"]) == {"2.5", "10", "20"}
    header = (out / "rfs.csv").read_text().splitlines()[0]
    assert header.startswith("dataset,tau,keep,drop_rate,bytes,compression,probe,probe_lo,probe_hi")
    report = (out / "report.md").read_text()
    for claim in ("(a)", "(b)", "(c)", "(d)"):
        line = next(ln for ln in report.splitlines() if ln.startswith(f"**{claim}"))
        assert "training seeds" in line and "test items" in line, line  # sample sizes
        assert any(v in line for v in VERDICTS)
        if claim != "(a)":
            assert " pt [" in line, line  # interval
    assert "2.0000" not in report


def test_same_settings_same_results(runs):
    assert (runs[0] / "results.json").read_bytes() == (runs[1] / "results.json").read_bytes()


def test_rerun_reuses_finished_training(runs):
    before = (runs[0] / "results.json").read_bytes()
    assert main(["reproduce", "--out", str(runs[0]), *ARGS]) == 0
    assert (runs[0] / "results.json").read_bytes() == before
    timings = json.loads((runs[0] / "timings.json").read_text())
    assert all(t < 30 for t in timings["train_s"].values())


def test_render_docs(runs, tmp_path, capsys):
    from semcomp_ext.train.docs import BEGIN, END

    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(f"# x\n\n## What the reproduction finds\n\n{BEGIN}\nold\n{END}\n\nrest\n")
    (tmp_path / "docs" / "reproduce.md").write_text(f"# r\n\n## Results\n{BEGIN}\n{END}\n")
    from semcomp_ext.train.docs import render_docs

    written = render_docs(str(runs[0]), root=str(tmp_path))
    readme = (tmp_path / "README.md").read_text()
    assert "old" not in readme and "rest" in readme and "| (b) Centroid" in readme and "docs/results/full/report.md" in readme
    assert (tmp_path / "docs" / "results" / "full" / "results.json").is_file()
    assert (tmp_path / "docs" / "results" / "full" / "acc_vs_kept.svg").is_file()
    assert "(results/full/report.md)" in (tmp_path / "docs" / "reproduce.md").read_text()
    assert len(written) == 3
    with pytest.raises(ValueError, match="markers"):
        (tmp_path / "README.md").write_text("no markers")
        render_docs(str(runs[0]), root=str(tmp_path))


def test_wide_embedding_config_refused(tmp_path):
    from semcomp_ext.train.models import open_clip
    from semcomp_ext.train.reproduce import ReproduceConfig, check_config

    cfg = json.loads(json.dumps(open_clip().get_model_config("semcomp-tiny")))
    cfg["embed_dim"] = 256
    (tmp_path / "semcomp-wide.json").write_text(json.dumps(cfg))
    open_clip().add_model_config(str(tmp_path))
    with pytest.raises(ValueError, match="wider than the image tower"):
        check_config(ReproduceConfig(out_dir=str(tmp_path / "o"), model="semcomp-wide"))


def test_report_marks_a_tau_whose_training_loss_is_at_chance(runs, tmp_path):
    import math

    from semcomp_ext.train.report import write_report

    res = json.loads((runs[0] / "results.json").read_text())
    timings = json.loads((runs[0] / "timings.json").read_text())
    D = res["datasets"]["digits"]
    chance = math.log(res["config"]["batch_size"])
    D["temperatures"]["0.05"]["train"]["final_loss"]["mean"] = chance + 0.001
    D["temperatures"]["0.4"]["train"]["final_loss"]["mean"] = chance - 0.5
    write_report(res, timings, str(tmp_path))
    marked = [ln for ln in (tmp_path / "report.md").read_text().splitlines() if "(≈ chance)" in ln]
    assert len(marked) == 1 and marked[0].startswith("| 0.05 |"), marked
