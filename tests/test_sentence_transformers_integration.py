"""semcomp_ext.integrations.sentence_transformers against sentence-transformers itself.

A tiny randomly initialised BERT (hand-written vocabulary, saved and loaded as a
SentenceTransformer: no download) is trained one step by the fused loss and by upstream's loss
from the same RNG state (dropout on); loss values and every parameter gradient must agree
(fp32, 1e-5). Every direction set and partition mode upstream accepts, with and without hard
negatives, with row blocks small enough that the masked directions use both the rectangular
kernel and the dense blocks; the cached loss against upstream's cached loss; the fallback for
non-cosine similarities; and 2 gloo ranks with gather_across_devices.
"""

from __future__ import annotations

import itertools
import os
import random
import warnings

import pytest
import torch

pytest.importorskip("sentence_transformers")

from sentence_transformers.sentence_transformer import losses as st_losses  # noqa: E402
from sentence_transformers.util import dot_score  # noqa: E402

from semcomp_ext.integrations import sentence_transformers as sc  # noqa: E402

TOL = 1e-5
WORDS = [f"w{i}" for i in range(60)]
DIRS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
# every configuration upstream accepts: query_to_doc plus any subset of the others with
# partition_mode="joint"; "per_direction" only without the same-type directions
CONFIGS = [(("query_to_doc",) + extra, "joint")
           for r in range(4) for extra in itertools.combinations(DIRS[1:], r)]
CONFIGS += [(("query_to_doc",), "per_direction"), (("query_to_doc", "doc_to_query"), "per_direction")]


def build_model(path: str):
    """A 1-layer, 32-wide BERT with a 65-word vocabulary as a SentenceTransformer (mean pooling)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    if not os.path.exists(os.path.join(path, "config.json")):
        os.makedirs(path, exist_ok=True)
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
        with open(os.path.join(path, "vocab.txt"), "w") as f:
            f.write("\n".join(vocab) + "\n")
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
        BertModel(cfg).save_pretrained(path)
        BertTokenizerFast(vocab_file=os.path.join(path, "vocab.txt")).save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = Transformer(path)
        pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device="cpu")


def make_features(model, n: int, columns: int, seed: int):
    rng = random.Random(seed)
    return [model.preprocess([" ".join(rng.choices(WORDS, k=rng.randint(2, 9))) for _ in range(n)])
            for _ in range(columns)]


def step(loss_obj, model, features, seed=1):
    """Loss and parameter gradients of one forward/backward from the RNG state `seed`."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_obj([dict(f) for f in features], None)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def max_diffs(a, b):
    (la, ga), (lb, gb) = a, b
    assert ga.keys() == gb.keys() and len(ga) > 10
    return float((la - lb).abs()), max(float((ga[k] - gb[k]).abs().max()) for k in ga)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = build_model(str(tmp_path_factory.mktemp("tiny_bert")))
    m.train()  # dropout on: both losses see the same masks from the same RNG state
    return m


@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("directions,partition_mode", CONFIGS, ids=lambda v: "+".join(v) if isinstance(v, tuple) else v)
def test_mnrl_matches_upstream(model, monkeypatch, directions, partition_mode, negatives):
    # 3-row blocks over 10 rows: the masked directions use short dense pieces, own blocks and
    # the rectangular kernel (pieces of at least a block's rows)
    monkeypatch.setattr(sc, "MASKED_BLOCK", 3)
    feats = make_features(model, 10, 2 + negatives, seed=len(directions) + negatives)
    kw = dict(scale=20.0, directions=directions, partition_mode=partition_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path must not warn
        ours = step(sc.MultipleNegativesRankingLoss(model, **kw), model, feats)
    ref = step(st_losses.MultipleNegativesRankingLoss(model, **kw), model, feats)
    dl, dg = max_diffs(ours, ref)
    assert dl <= TOL and dg <= TOL, (dl, dg)


def test_masked_directions_one_block_and_scale(model, monkeypatch):
    """All four directions, block larger than the batch (the default path), another scale."""
    assert sc.MASKED_BLOCK >= 12
    feats = make_features(model, 12, 3, seed=7)
    kw = dict(scale=7.5, directions=DIRS)
    dl, dg = max_diffs(step(sc.MultipleNegativesRankingLoss(model, **kw), model, feats),
                       step(st_losses.MultipleNegativesRankingLoss(model, **kw), model, feats))
    assert dl <= TOL and dg <= TOL, (dl, dg)


@pytest.mark.parametrize("directions,partition_mode,negatives", [
    (("query_to_doc",), "joint", 1),
    (("query_to_doc", "doc_to_query"), "per_direction", 0),
    (DIRS, "joint", 1),
], ids=["default-1neg", "symmetric-per_direction", "all-joint-1neg"])
def test_cached_mnrl_matches_upstream_cached(model, directions, partition_mode, negatives):
    """GradCache with 4-row mini-batches over 11 rows (a ragged last one), dropout replayed."""
    feats = make_features(model, 11, 2 + negatives, seed=3 + negatives)
    kw = dict(scale=20.0, directions=directions, partition_mode=partition_mode, mini_batch_size=4)
    ours_obj = sc.CachedMultipleNegativesRankingLoss(model, **kw)
    assert isinstance(ours_obj.loss, sc.MultipleNegativesRankingLoss)
    ours = step(ours_obj, model, feats)
    ref = step(st_losses.CachedMultipleNegativesRankingLoss(model, **kw), model, feats)
    dl, dg = max_diffs(ours, ref)
    assert dl <= TOL and dg <= TOL, (dl, dg)


def test_cached_equals_uncached_without_dropout(model):
    model.eval()
    try:
        feats = make_features(model, 9, 3, seed=11)
        a = step(sc.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2), model, feats)
        b = step(sc.MultipleNegativesRankingLoss(model), model, feats)
    finally:
        model.train()
    dl, dg = max_diffs(a, b)
    assert dl <= TOL and dg <= TOL, (dl, dg)


@pytest.mark.parametrize("cached", [False, True])
def test_inside_matryoshka_loss(model, cached):
    """Upstream's MatryoshkaLoss wraps the fused losses (it calls compute_loss_from_embeddings,
    or decorates calculate_loss of a cached loss) as it wraps its own. The loss is a sum of three
    losses: the tolerance is three times the single-loss one."""
    feats = make_features(model, 10, 3, seed=1)
    kw = {"mini_batch_size": 4} if cached else {}
    ours = (sc.CachedMultipleNegativesRankingLoss if cached else sc.MultipleNegativesRankingLoss)(model, **kw)
    ref = (st_losses.CachedMultipleNegativesRankingLoss if cached else st_losses.MultipleNegativesRankingLoss)(model, **kw)
    dl, dg = max_diffs(step(st_losses.MatryoshkaLoss(model, ours, [32, 16, 8]), model, feats),
                       step(st_losses.MatryoshkaLoss(model, ref, [32, 16, 8]), model, feats))
    assert dl <= 3 * TOL and dg <= 3 * TOL, (dl, dg)


def test_upstream_interface(model):
    ours = sc.CachedMultipleNegativesRankingLoss(model, scale=10.0, mini_batch_size=8, directions=("query_to_doc", "doc_to_query"))
    assert isinstance(ours, st_losses.CachedMultipleNegativesRankingLoss)
    assert isinstance(sc.MultipleNegativesRankingLoss(model), st_losses.MultipleNegativesRankingLoss)
    ref = st_losses.CachedMultipleNegativesRankingLoss(model, scale=10.0, mini_batch_size=8, directions=("query_to_doc", "doc_to_query"))
    assert ours.get_config_dict() == ref.get_config_dict()
    ours.scale = 5.0  # upstream delegates hyperparameters to the wrapped loss
    assert ours.loss.scale == 5.0 and ours.temperature == 0.2
    with pytest.raises(ValueError, match="per_direction"):
        sc.MultipleNegativesRankingLoss(model, directions=("query_to_doc", "doc_to_doc"), partition_mode="per_direction")
    with pytest.raises(ValueError, match="[Ss]cale"):
        sc.MultipleNegativesRankingLoss(model, scale=0.0)


@pytest.mark.parametrize("cached", [False, True])
def test_non_cosine_falls_back_with_one_warning(model, cached):
    feats = make_features(model, 6, 2, seed=5)
    up_cls = st_losses.CachedMultipleNegativesRankingLoss if cached else st_losses.MultipleNegativesRankingLoss
    our_cls = sc.CachedMultipleNegativesRankingLoss if cached else sc.MultipleNegativesRankingLoss
    kw = dict(scale=1.0, similarity_fct=dot_score, **({"mini_batch_size": 4} if cached else {}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours_obj = our_cls(model, **kw)
        ours = step(ours_obj, model, feats)
        step(ours_obj, model, feats)
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning) and "unfused" in str(w.message)]
    assert len(msgs) == 1 and "similarity_fct=dot_score" in msgs[0], msgs
    dl, dg = max_diffs(ours, step(up_cls(model, **kw), model, feats))
    assert dl <= TOL and dg <= TOL, (dl, dg)


def test_model_similarity_is_fused_when_cosine(model):
    """similarity_fct=model.similarity follows the model's similarity_fn_name at each call."""
    assert model.similarity_fn_name == "cosine"
    feats = make_features(model, 6, 2, seed=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = sc.MultipleNegativesRankingLoss(model, similarity_fct=model.similarity)
        step(loss, model, feats)
    model.similarity_fn_name = "dot"
    try:
        with pytest.warns(UserWarning, match="similarity_fct=similarity is not cosine"):
            step(loss, model, feats)
    finally:
        model.similarity_fn_name = "cosine"


def test_hardness_weighting_falls_back(model):
    feats = make_features(model, 6, 3, seed=6)
    kw = dict(hardness_mode="hard_negatives", hardness_strength=5.0)
    with pytest.warns(UserWarning, match="hardness_mode='hard_negatives'"):
        ours_obj = sc.MultipleNegativesRankingLoss(model, **kw)
    dl, dg = max_diffs(step(ours_obj, model, feats), step(st_losses.MultipleNegativesRankingLoss(model, **kw), model, feats))
    assert dl <= TOL and dg <= TOL, (dl, dg)


def test_fused_loss_never_builds_the_score_matrix():
    """No tensor of N x N (or more) elements is created, forward or backward, in the fused
    default and symmetric configurations with a hard-negative column (every op recorded)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n = 64

    class Sizes(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t):
                    Sizes.largest = max(Sizes.largest, t.numel())
            return out

    q, p, neg = (torch.randn(n, 16, requires_grad=True) for _ in range(3))
    for directions in (("query_to_doc",), ("query_to_doc", "doc_to_query")):
        with Sizes():
            loss = sc.fused_mnrl_loss([q, p, neg], 20.0, directions, "joint")
            loss.backward()
        assert 0 < Sizes.largest < n * n, Sizes.largest
        ref = st_losses.MultipleNegativesRankingLoss(_NoModel(), directions=directions)
        assert abs(float(loss.detach()) - float(ref.compute_loss_from_embeddings([q, p, neg], None).detach())) <= TOL


class _NoModel(torch.nn.Module):
    pass


@pytest.mark.parametrize("directions,partition_mode", [(DIRS, "joint"), (("query_to_doc", "doc_to_query"), "per_direction")])
def test_fp32_error_against_fp64_within_upstreams_on_700_rows(directions, partition_mode):
    """700 rows (3 row blocks of the masked directions), 2 negative columns, correlated columns
    (high same-type similarities): the fused fp32 loss and gradients are as close to upstream's
    fp64 result as upstream's own fp32 computation is (within 2x + 1e-7), and no tensor of
    N x N elements is created."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, d = 700, 64
    base = torch.randn(n, d)
    embs = [base + 0.7 * torch.randn(n, d) for _ in range(4)]
    upstream = st_losses.MultipleNegativesRankingLoss(_NoModel(), directions=directions, partition_mode=partition_mode)

    def run(fn, dtype):
        xs = [x.to(dtype, copy=True).requires_grad_() for x in embs]
        loss = fn(xs)
        loss.backward()
        return loss.detach().double(), [x.grad.double() for x in xs]

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if torch.is_tensor(t):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    ref = run(lambda xs: upstream.compute_loss_from_embeddings(xs, None), torch.float64)
    up32 = run(lambda xs: upstream.compute_loss_from_embeddings(xs, None), torch.float32)
    with Largest():
        ours = run(lambda xs: sc.fused_mnrl_loss(xs, 20.0, directions, partition_mode), torch.float32)
    assert Largest.numel < n * n, Largest.numel

    def err(r):
        return float((r[0] - ref[0]).abs()), max(float((a - b).abs().max()) for a, b in zip(r[1], ref[1]))

    (lo, go), (lu, gu) = err(ours), err(up32)
    assert lo <= 2 * lu + 1e-7 and go <= 2 * gu + 1e-7, (lo, lu, go, gu)


# ---- two gloo ranks --------------------------------------------------------------------------


def _gather_worker(rank, world, path, configs):
    """Each rank: its own 6 rows of a 12-row global batch; fused and upstream losses with
    gather_across_devices=True from the same RNG state; max differences per configuration."""
    model = build_model(path)
    model.train()
    out = {}
    for directions, partition_mode, negatives, cached in configs:
        feats = make_features(model, 12, 2 + negatives, seed=negatives)
        local = [{k: v[rank * 6:(rank + 1) * 6] if torch.is_tensor(v) else v for k, v in f.items()} for f in feats]
        kw = dict(scale=20.0, directions=directions, partition_mode=partition_mode, gather_across_devices=True)
        if cached:
            kw["mini_batch_size"] = 4
        ours_cls = sc.CachedMultipleNegativesRankingLoss if cached else sc.MultipleNegativesRankingLoss
        up_cls = st_losses.CachedMultipleNegativesRankingLoss if cached else st_losses.MultipleNegativesRankingLoss
        ours = step(ours_cls(model, **kw), model, local, seed=10 + rank)
        ref = step(up_cls(model, **kw), model, local, seed=10 + rank)
        out[(directions, partition_mode, negatives, cached)] = max_diffs(ours, ref) + (float(ours[0]),)
    return out


def test_gather_across_devices_two_gloo_ranks(tmp_path):
    from semcomp_ext.distributed.launch import launch

    path = str(tmp_path / "tiny_bert")
    build_model(path)
    configs = [(("query_to_doc",), "joint", 2, False), (DIRS, "joint", 1, False),
               (("query_to_doc", "doc_to_query"), "per_direction", 0, False), (DIRS, "joint", 1, True)]
    per_rank = launch(_gather_worker, 2, (path, configs), timeout=120, pg_timeout=30)
    for rank, res in enumerate(per_rank):
        assert len(res) == len(configs)
        for cfg, (dl, dg, _) in res.items():
            assert dl <= TOL and dg <= TOL, (rank, cfg, dl, dg)
    # the two ranks score different local rows of one global batch: their losses differ
    assert any(abs(per_rank[0][c][2] - per_rank[1][c][2]) > 1e-4 for c in per_rank[0])


def test_fused_loss_bad_arguments_name_themselves():
    q, p = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"embeddings\[1\] must be a 2-D tensor"):
        sc.fused_mnrl_loss([q, torch.randn(5, 8)], 20.0)
    with pytest.raises(ValueError, match="embeddings must hold at least 2"):
        sc.fused_mnrl_loss([q], 20.0)
    with pytest.raises(ValueError, match="directions must include 'query_to_doc'"):
        sc.fused_mnrl_loss([q, p], 20.0, ("doc_to_query",))
    with pytest.raises(ValueError, match="partition_mode"):
        sc.fused_mnrl_loss([q, p], 20.0, partition_mode="rows")
    with pytest.raises(ValueError, match="per_direction"):
        sc.fused_mnrl_loss([q, p], 20.0, ("query_to_doc", "query_to_query"), "per_direction")
