"""sentence-transformers' in-batch-negatives losses on the fused InfoNCE kernels.

:class:`MultipleNegativesRankingLoss` and :class:`CachedMultipleNegativesRankingLoss` are
subclasses of sentence-transformers' classes of the same names (tested with 6.3.0) with the
same constructor arguments, attributes, config dict and semantics; only the score matrix is
never built. Use them wherever the upstream losses go (``SentenceTransformerTrainer(loss=...)``)::

    from semcomp_ext.integrations.sentence_transformers import CachedMultipleNegativesRankingLoss

    loss = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=64)

What runs on the fused kernels (``similarity_fct`` is cosine: ``sentence_transformers.util.cos_sim``
or the bound ``model.similarity`` of a model whose ``similarity_fn_name`` is "cosine"):

* ``query_to_doc`` (with hard-negative columns: the documents are the positives followed by
  every negative column, the positive of local row i at column ``rank * n + i``) and
  ``doc_to_query``: one one-directional rectangular InfoNCE call each
  (:func:`semcomp_ext.infonce_rect_loss`), O(N) memory;
* ``query_to_query`` and ``doc_to_doc`` (which exclude a query's own columns): the rows are
  taken in blocks of ``MASKED_BLOCK`` rows; the columns outside a block's own columns go through
  the rectangular kernel (its log-sum-exp output), the block's own columns (with the excluded
  ones set to -inf) are scored densely, so the memory is O(N * MASKED_BLOCK) instead of O(N^2);
* ``partition_mode`` "joint" (one log-sum-exp over every selected direction) and
  "per_direction" (the mean of the per-direction losses); ``gather_across_devices`` (the
  embeddings are all-gathered with gradients as upstream does, each rank computes its own rows).

What falls back to the upstream computation, with one ``UserWarning`` per loss object: any other
``similarity_fct`` (dot product, Manhattan, ...), and ``hardness_mode`` with a positive
``hardness_strength`` (its penalty adds a detached per-entry term to the logits).

:class:`CachedMultipleNegativesRankingLoss` keeps upstream's GradCache mechanics (mini-batch
embedding without graph, RNG replay, cached embedding gradients, DDP synchronisation) and
replaces only the loss stage: the fused loss over the whole batch in one call, since it needs no
chunking to bound its memory.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .._ops import ops
from ..functional import infonce_rect_loss

try:
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss as _UpstreamCachedMNRL,
    )
    from sentence_transformers.sentence_transformer.losses import (
        MultipleNegativesRankingLoss as _UpstreamMNRL,
    )
    from sentence_transformers.util import all_gather_with_grad, cos_sim, get_rank
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "semcomp_ext.integrations.sentence_transformers needs sentence-transformers "
        f"(pip install 'semcomp-ext[sentence-transformers]'): {type(exc).__name__}: {exc}"
    ) from exc

__all__ = ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "fused_mnrl_loss", "MASKED_BLOCK"]

#: rows per block for the masked directions (query_to_query, doc_to_doc): the dense part of
#: the scores is MASKED_BLOCK x MASKED_BLOCK per block and per document column
MASKED_BLOCK = 256
_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _is_cosine(fct) -> bool:
    if fct is cos_sim:
        return True
    owner = getattr(fct, "__self__", None)
    return getattr(fct, "__name__", None) == "similarity" and getattr(owner, "similarity_fn_name", None) == "cosine"


def _fallback_reason(loss) -> str | None:
    if not _is_cosine(loss.similarity_fct):
        name = getattr(loss.similarity_fct, "__name__", type(loss.similarity_fct).__name__)
        return f"similarity_fct={name} is not cosine similarity"
    if loss.hardness_mode is not None and loss.hardness_strength > 0.0:
        return f"hardness_mode={loss.hardness_mode!r} adds a per-entry penalty to the logits"
    return None


def _warn_fallback(loss) -> bool:
    """True (and one UserWarning per loss object and reason) when the upstream computation runs."""
    reason = _fallback_reason(loss)
    if reason is None:
        return False
    warned = loss.__dict__.setdefault("_semcomp_warned", set())
    if reason not in warned:
        warned.add(reason)
        warnings.warn(
            f"{type(loss).__name__}: {reason}; using sentence-transformers' own (unfused, O(N^2) memory) loss",
            UserWarning,
            stacklevel=3,
        )
    return True


def _scale_tensor(scale: float, like: Tensor) -> Tensor:
    acc = torch.float64 if like.dtype == torch.float64 else torch.float32
    return torch.full((), float(scale), dtype=acc, device=like.device)


def _masked_terms(x: Tensor, blocks: list[Tensor], offset: int, s: Tensor, pos: Tensor, block: int) -> Tensor:
    """Per row i of x (n, D): log sum over every column of every key block (N_t, D) except column
    offset + i of each block, of exp(s <x_i, k_j>), minus pos_i. Rows in chunks of `block`: the
    columns before and after a chunk's own columns go through the rectangular kernel's
    log-sum-exp output (or densely when shorter than the chunk), its own columns densely with the
    excluded diagonal at -inf. Returns (n,)."""
    out = []
    n = x.shape[0]
    for c0 in range(0, n, block):
        xc = x[c0:c0 + block]
        m = xc.shape[0]
        lo, hi = offset + c0, offset + c0 + m
        dense, lses = [], []
        xa = xc.to(pos.dtype)  # the dense parts are small: scored in the accumulation dtype
        for k in blocks:
            own = s * (xa @ k[lo:hi].to(pos.dtype).T)
            eye = torch.eye(m, dtype=torch.bool, device=x.device)
            dense.append(own.masked_fill(eye, float("-inf")))
            for piece in (k[:lo], k[hi:]):
                if piece.shape[0] == 0:
                    continue
                if piece.shape[0] >= m:
                    lses.append(ops.infonce_rect_fwd(xc, piece, s, 0, 0)[1].unsqueeze(1))
                else:
                    dense.append(s * (xa @ piece.to(pos.dtype).T))
        terms = torch.cat(dense + lses, dim=1)
        out.append(torch.logsumexp(terms - pos[c0:c0 + m, None], dim=1))
    return torch.cat(out)


def fused_mnrl_loss(
    embeddings: list[Tensor],
    scale: float,
    directions=("query_to_doc",),
    partition_mode: str = "joint",
    gather_across_devices: bool = False,
) -> Tensor:
    """MultipleNegativesRankingLoss with cosine similarity on the fused kernels.

    embeddings: [queries (n, D), positives (n, D), negatives_1 (n, D), ...] of this rank.
    The same value and gradients as sentence-transformers'
    ``MultipleNegativesRankingLoss(similarity_fct=cos_sim, ...)`` (no hardness weighting);
    arguments as there. Returns the mean over this rank's n rows (fp32; fp64 for fp64 inputs).
    """
    fn = "fused_mnrl_loss"
    embeddings = list(embeddings)
    if len(embeddings) < 2:
        raise ValueError(f"{fn}: embeddings must hold at least 2 tensors (queries, positives), got {len(embeddings)}")
    for i, e in enumerate(embeddings):
        if not torch.is_tensor(e) or e.dim() != 2 or e.shape[0] != embeddings[0].shape[0]:
            shape = tuple(e.shape) if torch.is_tensor(e) else type(e).__name__
            raise ValueError(f"{fn}: embeddings[{i}] must be a 2-D tensor with as many rows as embeddings[0] "
                             f"({tuple(embeddings[0].shape)}), got {shape}")
    bad = [d for d in directions if d not in _DIRECTIONS]
    if bad or "query_to_doc" not in directions:
        raise ValueError(f"{fn}: directions must include 'query_to_doc' and only {_DIRECTIONS}, got {tuple(directions)}")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"{fn}: partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}")
    if partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
        raise ValueError(f"{fn}: partition_mode='per_direction' excludes query_to_query and doc_to_doc, got {tuple(directions)}")
    queries, docs = embeddings[0], embeddings[1:]
    n = queries.shape[0]
    offset = 0
    if gather_across_devices:
        queries = all_gather_with_grad(queries)
        docs = [all_gather_with_grad(d) for d in docs]
        offset = get_rank() * n
    dtype = torch.promote_types(queries.dtype, docs[0].dtype)
    for d in docs[1:]:
        dtype = torch.promote_types(dtype, d.dtype)
    q_all = torch.nn.functional.normalize(queries.to(dtype), p=2, dim=-1)
    d_all = [torch.nn.functional.normalize(d.to(dtype), p=2, dim=-1) for d in docs]
    q_loc, p_loc = q_all[offset:offset + n], d_all[0][offset:offset + n]
    keys = torch.cat(d_all, dim=0) if len(d_all) > 1 else d_all[0]
    s = _scale_tensor(scale, q_all)

    # each term is (log-sum-exp of the direction's scores) - (the positive score), per local row
    rows = {"query_to_doc": infonce_rect_loss(q_loc, keys, s, offset=offset)}
    if "doc_to_query" in directions:
        # the positive of document i among the queries is query i: the same score s <q_i, p_i>
        rows["doc_to_query"] = infonce_rect_loss(p_loc, q_all, s, offset=offset)
    if partition_mode == "per_direction":
        return torch.stack(list(rows.values())).mean(0).mean()
    masked = [d for d in ("query_to_query", "doc_to_doc") if d in directions]
    if not masked and len(rows) == 1:
        return rows["query_to_doc"].mean()
    terms = [r.unsqueeze(1) for r in rows.values()]
    if masked:
        acc = rows["query_to_doc"].dtype
        pos = s.to(acc) * (q_loc.to(acc) * p_loc.to(acc)).sum(1)
        if "query_to_query" in directions:
            terms.append(_masked_terms(q_loc, [q_all], offset, s, pos, MASKED_BLOCK).unsqueeze(1))
        if "doc_to_doc" in directions:
            terms.append(_masked_terms(p_loc, d_all, offset, s, pos, MASKED_BLOCK).unsqueeze(1))
    return torch.logsumexp(torch.cat(terms, dim=1), dim=1).mean()


class MultipleNegativesRankingLoss(_UpstreamMNRL):
    """sentence-transformers' ``MultipleNegativesRankingLoss`` (same arguments and semantics)
    with the cosine-similarity loss on the fused kernels; see the module docstring for what is
    fused and what falls back (with one warning)."""

    def __init__(self, model, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        _warn_fallback(self)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor) -> Tensor:
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        if _warn_fallback(self):
            return super().compute_loss_from_embeddings(embeddings, labels)
        return fused_mnrl_loss(
            embeddings, self.scale, self.directions, self.partition_mode, self.gather_across_devices
        )


class CachedMultipleNegativesRankingLoss(_UpstreamCachedMNRL):
    """sentence-transformers' ``CachedMultipleNegativesRankingLoss`` (same arguments and GradCache
    semantics: mini_batch_size, mini_batch_num_tokens, RNG replay) whose loss stage runs on the
    fused kernels over the whole batch at once (O(N) memory, no chunked N x N blocks). Falls back
    to upstream's chunked loss stage (with one warning) where the plain loss falls back."""

    def __init__(self, model, scale: float = 20.0, similarity_fct=cos_sim, mini_batch_size: int = 32,
                 mini_batch_num_tokens: int | None = None, gather_across_devices: bool = False,
                 directions=("query_to_doc",), partition_mode="joint", show_progress_bar: bool = False,
                 hardness_mode=None, hardness_strength: float = 0.0) -> None:
        super().__init__(
            model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
            mini_batch_num_tokens=mini_batch_num_tokens, gather_across_devices=gather_across_devices,
            directions=directions, partition_mode=partition_mode, show_progress_bar=show_progress_bar,
            hardness_mode=hardness_mode, hardness_strength=hardness_strength,
        )
        # the wrapped loss holds (and validates) the hyperparameters, as upstream's does
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # this object warns, once, for both
            self.loss = MultipleNegativesRankingLoss(
                model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=gather_across_devices,
                directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
                hardness_strength=hardness_strength,
            )
        _warn_fallback(self)

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        if _warn_fallback(self):
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        embeddings = [torch.cat(r) for r in reps]
        loss = fused_mnrl_loss(
            embeddings, self.scale, self.directions, self.partition_mode, self.gather_across_devices
        )
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss
