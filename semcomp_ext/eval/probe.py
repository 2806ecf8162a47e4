"""Classification and retrieval metrics on embeddings, in plain torch (no sklearn needed).

All functions take (N, D) float tensors (any float dtype; computed in fp32 on their device) and
integer labels, and return Python floats in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _xy(fn: str, x, y, name: str):
    if not torch.is_tensor(x) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{fn}: {name}_x must be a 2-D float tensor, got {getattr(x, 'shape', type(x).__name__)}")
    y = torch.as_tensor(y, device=x.device)
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"{fn}: {name}_y must be ({x.shape[0]},) integers, got shape {tuple(y.shape)} {y.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: {name}_x is empty")
    return x.float(), y.long()


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, weight_decay: float = 1e-3, max_iter: int = 200, seed: int = 0) -> float:
    """Multinomial logistic regression (full-batch L-BFGS, L2 penalty) on standardised features,
    trained on (train_x, train_y) and scored on (test_x, test_y). Deterministic for a seed."""
    fn = "linear_probe_accuracy"
    xtr, ytr = _xy(fn, train_x, train_y, "train")
    xte, yte = _xy(fn, test_x, test_y, "test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"{fn}: train and test widths differ: {xtr.shape[1]} vs {xte.shape[1]}")
    classes, ytr_i = torch.unique(ytr, return_inverse=True)
    mu, sd = xtr.mean(0), xtr.std(0).clamp(min=1e-6)
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = (0.01 * torch.randn(xtr.shape[1], len(classes), generator=gen)).to(xtr.device).requires_grad_()
    bias = torch.zeros(len(classes), device=xtr.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + bias, ytr_i) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = classes[(xte @ w + bias).argmax(1)]
    return float((pred == yte).float().mean())


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 10, chunk: int = 4096) -> float:
    """Cosine k-nearest-neighbour majority vote (ties -> smallest label), chunked over queries."""
    fn = "knn_accuracy"
    xtr, ytr = _xy(fn, train_x, train_y, "train")
    xte, yte = _xy(fn, test_x, test_y, "test")
    if k < 1:
        raise ValueError(f"{fn}: k must be >= 1, got {k}")
    k = min(k, xtr.shape[0])
    classes, ytr_i = torch.unique(ytr, return_inverse=True)
    xtr, xte = F.normalize(xtr, dim=1), F.normalize(xte, dim=1)
    correct = 0
    for i in range(0, xte.shape[0], chunk):
        nn_idx = (xte[i : i + chunk] @ xtr.T).topk(k, dim=1).indices
        votes = F.one_hot(ytr_i[nn_idx], len(classes)).sum(1)
        correct += int((classes[votes.argmax(1)] == yte[i : i + chunk]).sum())
    return correct / xte.shape[0]


def retrieval_recall(queries, keys, ks=(1, 5, 10), *, chunk: int = 4096) -> dict:
    """Recall@k of row-aligned pairs: query i's match is key i (cosine similarity).
    Returns {k: fraction of queries whose match ranks in the top k}."""
    fn = "retrieval_recall"
    if not (torch.is_tensor(queries) and torch.is_tensor(keys)) or queries.dim() != 2 or queries.shape != keys.shape:
        raise ValueError(f"{fn}: queries and keys must be row-aligned 2-D tensors of one shape")
    q, kx = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
    n = q.shape[0]
    ranks = torch.empty(n, dtype=torch.long, device=q.device)
    for i in range(0, n, chunk):
        sim = q[i : i + chunk] @ kx.T
        pos = sim.gather(1, torch.arange(i, min(i + chunk, n), device=q.device).unsqueeze(1))
        ranks[i : i + chunk] = (sim > pos).sum(1)
    return {int(k): float((ranks < k).float().mean()) for k in ks}
