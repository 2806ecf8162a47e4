"""Workers that check the distributed losses inside real processes (run them with
:func:`semcomp_ext.distributed.launch.launch`). Used by tests/test_distributed*.py and
benchmarks/bench_distributed.py; they return plain Python numbers (max abs differences).

Every rank builds the same global batch from a seed and takes its slice, so a single-process
reference on the global batch can run inside each rank too. Upstream gradients differ per rank
(g_r = 1 + r/2) so that the rules for who receives which gradient are checked, not only the
common case g = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COMBOS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)


def make_data(world, n, d, dtype, seed, m=2):
    g = torch.Generator().manual_seed(seed)
    zs = [F.normalize(torch.randn(world * n, d, generator=g, dtype=torch.float64), dim=1).to(dtype) for _ in range(m)]
    return zs, torch.tensor(1.0 / 0.07, dtype=dtype)


def _upstream(rank):
    return 1.0 + 0.5 * rank


def _maxdiff(x, y):
    return float((x.double() - y.double()).abs().max())


def _run(loss_fn, zs_local, scale, rank):
    """loss, grads of every z and of the scale, for the upstream gradient g_rank."""
    zs = [z.clone().requires_grad_(True) for z in zs_local]
    s = scale.clone().requires_grad_(True)
    loss = loss_fn(zs, s)
    (loss * _upstream(rank)).backward()
    return [loss.detach()] + [z.grad for z in zs] + [s.grad]


def _single_reference(zs_all, scale, pairs, rank, world, n, local, with_grad):
    """What rank `rank` must see, from one process holding the whole batch (design §2.3)."""
    N = world * n
    zs = [z.clone().requires_grad_(True) for z in zs_all]
    s = scale.clone().requires_grad_(True)
    keys = zs if (with_grad or not local) else [z.detach() for z in zs]
    labels = torch.arange(N)
    rows = 0
    for i, j in pairs:
        li = F.cross_entropy(s * zs[i] @ keys[j].T, labels, reduction="none")
        lj = F.cross_entropy(s * zs[j] @ keys[i].T, labels, reduction="none")
        rows = rows + 0.5 * (li + lj) / len(pairs)
    per_rank = rows.view(world, n).mean(1)
    gs = [_upstream(p) for p in range(world)]
    own = per_rank[rank] if local else rows.mean()
    if local and with_grad:
        objective = sum(g * per_rank[p] for p, g in enumerate(gs))
    elif local:
        objective = gs[rank] * per_rank[rank]
    elif with_grad:
        objective = sum(gs) * rows.mean()
    else:
        objective = gs[rank] * rows.mean()
    gz = torch.autograd.grad(objective, zs, retain_graph=True)
    (gscale,) = torch.autograd.grad(gs[rank] * own, s)
    sl = slice(rank * n, (rank + 1) * n)
    return [own.detach()] + [g[sl] for g in gz] + [gscale]


def _diffs(a, b):
    return {"loss": _maxdiff(a[0], b[0]), "grads": max(_maxdiff(x, y) for x, y in zip(a[1:-1], b[1:-1])),
            "logit_scale_grad": _maxdiff(a[-1], b[-1])}


def clip_parity_worker(rank, world, n, d, dtype_name, seed=0):
    """For each (local_loss, gather_with_grad): max abs diffs of semcomp ClipLoss (gather, ring)
    vs open_clip's ClipLoss in the same processes, vs the single-process reference, ring vs
    gather; and open_clip vs the reference (the spec checked against itself)."""
    import semcomp_ext as sc
    from semcomp_ext._compat import import_open_clip

    oc = import_open_clip()
    dtype = getattr(torch, dtype_name)
    zs_all, scale = make_data(world, n, d, dtype, seed)
    local_zs = [z[rank * n:(rank + 1) * n] for z in zs_all]
    out = {}
    for local, wg in COMBOS:
        kw = dict(local_loss=local, gather_with_grad=wg, rank=rank, world_size=world)
        ref_oc = _run(lambda z, s: oc.loss.ClipLoss(**kw)(z[0], z[1], s), local_zs, scale, rank)
        ref_1p = _single_reference(zs_all, scale, [(0, 1)], rank, world, n, local, wg)
        res = {impl: _run(lambda z, s, impl=impl: sc.ClipLoss(**kw, impl=impl)(z[0], z[1], s), local_zs, scale, rank)
               for impl in ("gather", "ring")}
        out[f"local_loss={local},gather_with_grad={wg}"] = {
            "gather_vs_open_clip": _diffs(res["gather"], ref_oc),
            "ring_vs_open_clip": _diffs(res["ring"], ref_oc),
            "gather_vs_single_process": _diffs(res["gather"], ref_1p),
            "ring_vs_gather": _diffs(res["ring"], res["gather"]),
            "open_clip_vs_single_process": _diffs(ref_oc, ref_1p),
        }
    return out


def multimodal_worker(rank, world, n, d, dtype_name, m=3, seed=1):
    """M-modality distributed loss (pairs all / anchor) vs the single-process reference, and the
    non-distributed multimodal_infonce_loss on the global batch vs that reference."""
    import semcomp_ext as sc

    dtype = getattr(torch, dtype_name)
    zs_all, scale = make_data(world, n, d, dtype, seed, m)
    local_zs = [z[rank * n:(rank + 1) * n] for z in zs_all]
    out = {}
    for pairs in ("all", "anchor"):
        idx = [(i, j) for i in range(m) for j in range(i + 1, m)] if pairs == "all" else [(0, j) for j in range(1, m)]
        for local, wg in COMBOS:
            ref = _single_reference(zs_all, scale, idx, rank, world, n, local, wg)
            for impl in ("gather", "ring"):
                res = _run(lambda z, s, impl=impl: sc.multimodal_infonce_loss(
                    z, None, logit_scale=s, pairs=pairs, distributed=True, local_loss=local,
                    gather_with_grad=wg, impl=impl), local_zs, scale, rank)
                out[f"{pairs},local_loss={local},gather_with_grad={wg},{impl}"] = _diffs(res, ref)
    return out


def error_worker(rank, world, impl):
    """Unequal local batches and a rank with a different D: the messages each rank raised."""
    import semcomp_ext as sc

    msgs = {}
    cases = {"uneven_batch": (8 + (rank == world - 1), 16), "different_D": (8, 16 + 16 * (rank == 1))}
    for name, (n, d) in cases.items():
        img, txt = torch.randn(n, d), torch.randn(n, d)
        try:
            sc.ClipLoss(local_loss=True, rank=rank, world_size=world, impl=impl)(img, txt, torch.tensor(10.0))
            msgs[name] = None
        except ValueError as exc:
            msgs[name] = str(exc)
    # the group still works afterwards: every rank raised at the same point
    x = torch.ones(1)
    torch.distributed.all_reduce(x)
    msgs["after"] = float(x)
    return msgs


def temperature_gradcheck_worker(rank, world, n, d, seed=2):
    """A learnable temperature through the distributed multimodal loss: torch.autograd.gradcheck
    (fp64) of this rank's loss as a function of the temperature tensor, for both impls and all
    four (local_loss, gather_with_grad) combinations. Every rank runs the same gradcheck calls,
    so the collectives inside line up. Returns {case: passed}."""
    import semcomp_ext as sc

    zs_all, _ = make_data(world, n, d, torch.float64, seed, m=3)
    local_zs = [z[rank * n:(rank + 1) * n] for z in zs_all]
    out = {}
    for impl in ("gather", "ring"):
        for local, wg in COMBOS:
            def f(t, impl=impl, local=local, wg=wg):
                return sc.multimodal_infonce_loss(local_zs, t, distributed=True, local_loss=local,
                                                  gather_with_grad=wg, impl=impl)

            t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
            ok = torch.autograd.gradcheck(f, (t,), eps=1e-6, atol=1e-7, raise_exception=False,
                                          check_undefined_grad=False)
            out[f"local_loss={local},gather_with_grad={wg},{impl}"] = bool(ok)
    return out


def suite_worker(rank, world, n=4, d=8):
    """Everything the tests check, in one launch (spawning W processes costs seconds). The
    temperature gradcheck runs at W = 2 only: its gradient path does not depend on W."""
    out = {
        "clip_float64": clip_parity_worker(rank, world, n, d, "float64"),
        "clip_float32": clip_parity_worker(rank, world, n, d, "float32"),
        "multimodal_float64": multimodal_worker(rank, world, n, d, "float64"),
        "errors_gather": error_worker(rank, world, "gather"),
        "errors_ring": error_worker(rank, world, "ring"),
    }
    if world == 2:
        out["temperature_gradcheck"] = temperature_gradcheck_worker(rank, world, n, d)
    return out
