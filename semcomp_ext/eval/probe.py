"""Classification and retrieval metrics on embeddings, in plain torch (no sklearn needed).

All functions take (N, D) float tensors (any float dtype; computed in fp32/fp64 on their device)
and integer labels, and return Python floats in [0, 1] (or, for `ridge_probe`, the predictions).

Both linear probes are rotation-invariant: features are centred by the train mean and divided
by ONE global scale (the train rows' RMS norm), never standardised per feature, and the L2
penalty is on the weight matrix. Rotating the features (e.g. full-rank PCA of the same vectors)
therefore gives the same classifier and the same predictions; per-feature standardisation would
instead blow up near-constant directions and let the penalty fit their noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The L2 grid searched by ridge_probe's cross-validation, relative to the (unit) RMS norm of the
# centred, globally scaled train rows: lambda = RIDGE_GRID[i] * n_train.
RIDGE_GRID = tuple(10.0 ** e for e in (-6, -5, -4, -3, -2.5, -2, -1.5, -1, -0.5, 0))


def _xy(fn: str, x, y, name: str):
    if not torch.is_tensor(x) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"{fn}: {name}_x must be a 2-D float tensor, got {getattr(x, 'shape', type(x).__name__)}")
    y = torch.as_tensor(y, device=x.device)
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.is_floating_point():
        raise ValueError(f"{fn}: {name}_y must be ({x.shape[0]},) integers, got shape {tuple(y.shape)} {y.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: {name}_x is empty")
    if not torch.isfinite(x).all():
        raise ValueError(f"{fn}: {name}_x has NaN or Inf values")
    return x, y.long()


def _centre_scale(xtr: torch.Tensor, xte: torch.Tensor):
    """Centre by the train mean and divide by one global scale (RMS norm of the centred train
    rows): an isotropic map, so any rotation of the input commutes with it."""
    mu = xtr.mean(0)
    xtr = xtr - mu
    scale = xtr.pow(2).sum(1).mean().sqrt().clamp(min=1e-12)
    return xtr / scale, (xte - mu) / scale


def linear_probe_accuracy(train_x, train_y, test_x, test_y, *, weight_decay: float = 1e-3, max_iter: int = 200,
                          tol: float = 1e-6, seed: int = 0) -> float:
    """Multinomial logistic regression (full-batch L-BFGS from zero weights, L2 penalty
    `weight_decay`·‖W‖² on the weights, not the bias) on centred, globally scaled features,
    trained on (train_x, train_y) and scored on (test_x, test_y). L-BFGS stops when the
    gradient's largest entry falls below `tol` or after `max_iter` iterations. The objective is
    strictly convex, so the result does not depend on `seed` (kept for compatibility) and is
    invariant to rotations of the features up to the tolerance."""
    fn = "linear_probe_accuracy"
    xtr, ytr = _xy(fn, train_x, train_y, "train")
    xte, yte = _xy(fn, test_x, test_y, "test")
    if xtr.shape[1] != xte.shape[1]:
        raise ValueError(f"{fn}: train and test widths differ: {xtr.shape[1]} vs {xte.shape[1]}")
    if not weight_decay >= 0:
        raise ValueError(f"{fn}: weight_decay must be >= 0, got {weight_decay}")
    xtr, xte = _centre_scale(xtr.double(), xte.double())
    classes, ytr_i = torch.unique(ytr, return_inverse=True)
    w = torch.zeros(xtr.shape[1], len(classes), dtype=xtr.dtype, device=xtr.device, requires_grad=True)
    bias = torch.zeros(len(classes), dtype=xtr.dtype, device=xtr.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=tol,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + bias, ytr_i) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = classes[(xte @ w + bias).argmax(1)]
    return float((pred == yte).float().mean())


def _fold_ids(y: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """Stratified fold id of each row: within each class, rows are shuffled (seeded) and dealt
    round-robin to the folds."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(len(y), dtype=torch.long)
    offset = 0
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        out[idx] = (torch.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return out


def _ridge_solutions(x: torch.Tensor, t: torch.Tensor, lams):
    """Ridge weights for each lambda from one eigendecomposition of the centred x's Gram
    matrix: W = Q diag(1/(e+λ)) Qᵀ xᵀt."""
    e, q = torch.linalg.eigh(x.T @ x)
    qxt = q.T @ (x.T @ t)
    return [q @ (qxt / (e.clamp(min=0) + lam).unsqueeze(1)) for lam in lams]


def ridge_probe(train_x, train_y, test_x, *, folds: int = 5, grid=RIDGE_GRID, seed: int = 0, l2: float | None = None):
    """Linear probe as a least-squares classifier: ridge regression of one-hot targets on
    centred, globally scaled features (fp64, solved exactly through an eigendecomposition, so there is no
    iteration to converge), prediction = argmax. The L2 penalty is chosen by stratified
    `folds`-fold cross-validation on the train split alone (largest penalty among the best
    mean validation accuracies), unless `l2` fixes it. Returns (test predictions, info) where
    info = {"l2": chosen relative penalty, "cv_accuracy": its mean validation accuracy}.
    Rotation-invariant exactly (up to fp64 rounding)."""
    fn = "ridge_probe"
    xtr, ytr = _xy(fn, train_x, train_y, "train")
    xte = test_x
    if not torch.is_tensor(xte) or xte.dim() != 2 or xte.shape[1] != xtr.shape[1]:
        raise ValueError(f"{fn}: test_x must be 2-D with {xtr.shape[1]} columns, got {getattr(xte, 'shape', None)}")
    xtr, xte = _centre_scale(xtr.double().cpu(), xte.double().cpu())
    ytr = ytr.cpu()
    classes, yi = torch.unique(ytr, return_inverse=True)
    onehot = F.one_hot(yi, len(classes)).double()
    n = xtr.shape[0]
    cv_acc = None
    if l2 is None:
        grid = tuple(grid)
        fid = _fold_ids(yi, folds, seed)
        scores = torch.zeros(len(grid), dtype=torch.float64)
        for f in range(folds):
            va, tr = fid == f, fid != f
            if va.sum() == 0 or tr.sum() == 0:
                continue
            xa, ta = xtr[tr], onehot[tr]
            mx, mt = xa.mean(0), ta.mean(0)
            ws = _ridge_solutions(xa - mx, ta - mt, [g * int(tr.sum()) for g in grid])
            for i, w in enumerate(ws):
                pred = ((xtr[va] - mx) @ w + mt).argmax(1)
                scores[i] += (pred == yi[va]).double().sum()
        scores /= n
        best = scores.max()
        i_best = max(i for i in range(len(grid)) if scores[i] >= best - 1e-12)
        l2, cv_acc = grid[i_best], float(scores[i_best])
    mt = onehot.mean(0)
    (w,) = _ridge_solutions(xtr, onehot - mt, [l2 * n])
    pred = classes[(xte @ w + mt).argmax(1)]
    return pred, {"l2": l2, "cv_accuracy": cv_acc}


def ridge_probe_accuracy(train_x, train_y, test_x, test_y, **kw) -> float:
    """Test accuracy of `ridge_probe` (same arguments)."""
    pred, _ = ridge_probe(train_x, train_y, test_x, **kw)
    _, yte = _xy("ridge_probe_accuracy", test_x, test_y, "test")
    return float((pred == yte.cpu()).double().mean())


def knn_predict(train_x, train_y, test_x, *, k: int = 10, chunk: int = 4096) -> torch.Tensor:
    """Cosine k-nearest-neighbour majority vote (ties -> smallest label) for each test row."""
    fn = "knn_accuracy"
    xtr, ytr = _xy(fn, train_x, train_y, "train")
    if k < 1:
        raise ValueError(f"{fn}: k must be >= 1, got {k}")
    k = min(k, xtr.shape[0])
    classes, ytr_i = torch.unique(ytr, return_inverse=True)
    xtr, xte = F.normalize(xtr.float(), dim=1), F.normalize(test_x.float(), dim=1)
    out = []
    for i in range(0, xte.shape[0], chunk):
        nn_idx = (xte[i : i + chunk] @ xtr.T).topk(k, dim=1).indices
        votes = F.one_hot(ytr_i[nn_idx], len(classes)).sum(1)
        out.append(classes[votes.argmax(1)])
    return torch.cat(out)


def knn_accuracy(train_x, train_y, test_x, test_y, *, k: int = 10, chunk: int = 4096) -> float:
    """Cosine k-nearest-neighbour majority vote (ties -> smallest label), chunked over queries."""
    fn = "knn_accuracy"
    _xy(fn, train_x, train_y, "train")
    xte, yte = _xy(fn, test_x, test_y, "test")
    pred = knn_predict(train_x, train_y, xte, k=k, chunk=chunk)
    return float((pred == yte).double().mean())


TIES = ("pessimistic", "expected", "optimistic")


def retrieval_ranks(queries, keys, *, ties: str = "pessimistic", chunk: int = 4096) -> torch.Tensor:
    """0-based rank of each query's match (key i for query i) among all keys by cosine
    similarity. Keys scoring exactly as high as the match (duplicate captions give identical
    embeddings) are counted against the query with ties="pessimistic" (rank = #keys scoring >=
    the match, minus the match itself), half of them with "expected" (the mean rank under a
    random order of tied keys; fractional), none with "optimistic"."""
    fn = "retrieval_recall"
    if ties not in TIES:
        raise ValueError(f"{fn}: ties must be one of {', '.join(TIES)}, got {ties!r}")
    if not (torch.is_tensor(queries) and torch.is_tensor(keys)) or queries.dim() != 2 or queries.shape != keys.shape:
        raise ValueError(f"{fn}: queries and keys must be row-aligned 2-D tensors of one shape")
    q, kx = F.normalize(queries.float(), dim=1), F.normalize(keys.float(), dim=1)
    n = q.shape[0]
    ranks = torch.empty(n, dtype=torch.float64, device=q.device)
    for i in range(0, n, chunk):
        sim = q[i : i + chunk] @ kx.T
        pos = sim.gather(1, torch.arange(i, min(i + chunk, n), device=q.device).unsqueeze(1))
        greater = (sim > pos).sum(1)
        tied = (sim == pos).sum(1) - 1  # other keys with exactly the match's score
        extra = {"pessimistic": tied, "expected": tied / 2, "optimistic": 0 * tied}[ties]
        ranks[i : i + chunk] = (greater + extra).double()
    return ranks


def retrieval_recall(queries, keys, ks=(1, 5, 10), *, ties: str = "pessimistic", chunk: int = 4096) -> dict:
    """Recall@k of row-aligned pairs: query i's match is key i (cosine similarity).
    Returns {k: fraction of queries whose match ranks in the top k}. Ties with the match are
    counted against the query by default (see `retrieval_ranks`); with ties="expected" a
    query whose match shares its score with t other keys at `greater` better ones counts
    as the probability that a random order of the tied keys puts it within the top k."""
    if ties == "expected":
        lo = retrieval_ranks(queries, keys, ties="optimistic", chunk=chunk)
        hi = retrieval_ranks(queries, keys, ties="pessimistic", chunk=chunk)
        t = hi - lo + 1  # tied group size including the match; its position is uniform in [lo, hi]
        return {int(k): float(((k - lo).clamp(min=0, max=None).minimum(t) / t).mean()) for k in ks}
    ranks = retrieval_ranks(queries, keys, ties=ties, chunk=chunk)
    return {int(k): float((ranks < k).double().mean()) for k in ks}


def ridge_loo_accuracy(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, yte: torch.Tensor) -> tuple:
    """Linear probe as a least-squares classifier (ridge regression of one-hot targets on
    centred, globally scaled features, fp64; prediction = argmax), its L2 penalty chosen by
    exact leave-one-out cross-validation on the train rows. Returns (test accuracy, chosen
    relative L2). One eigendecomposition of the train Gram matrix serves every penalty of the
    grid and every left-out row (the LOO prediction of row i is t_i - (t_i - f_i) / (1 - h_ii)),
    where k-fold CV needs one per fold: the eval of 20 000 rows x 1536 dims costs seconds."""
    xtr, xte = _centre_scale(xtr.double(), xte.double())
    classes, yi = torch.unique(ytr, return_inverse=True)
    t = torch.nn.functional.one_hot(yi, len(classes)).double()
    tm = t.mean(0)
    tc = t - tm
    n = xtr.shape[0]
    e, q = torch.linalg.eigh(xtr.T @ xtr)
    e = e.clamp(min=0)
    z = xtr @ q
    zt = z.T @ tc
    if n * xtr.shape[1] > 2_000_000:
        # large problems: the per-penalty products (n x D x classes each) in fp32; the Gram
        # matrix and its eigendecomposition stay fp64. Only the argmax of the fits is used.
        z, zt, tc32 = z.float(), zt.float(), tc.float()
    else:
        tc32 = tc
    z2 = z * z
    best_acc, best_l2 = -1.0, RIDGE_GRID[0]
    for g in RIDGE_GRID:
        inv = (1.0 / (e + g * n)).to(z.dtype)
        fit = z @ (inv.unsqueeze(1) * zt)
        h = (z2 @ inv + 1.0 / n).clamp(max=1 - 1e-6)  # leverage, the intercept (centring) included
        loo = tc32 - (tc32 - fit) / (1 - h).unsqueeze(1)
        acc = float(((loo + tm.to(loo.dtype)).argmax(1) == yi).double().mean())
        if acc >= best_acc - 1e-12:  # ties: the larger penalty
            best_acc, best_l2 = acc, g
    w = q @ ((1.0 / (e + best_l2 * n)).unsqueeze(1) * (q.T @ (xtr.T @ tc)))
    pred = classes[(xte @ w + tm).argmax(1)]
    return float((pred == yte).double().mean()), best_l2
