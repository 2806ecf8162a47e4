"""Ring form of the distributed contrastive loss: key blocks travel around the ring.

Rank r holds its local features z_m (n × D) for each modality m. At step t = 0..W-1 it holds
the blocks of rank src = r − t, computes for every direction (query modality qm, key modality
km) the row log-sum-exps of its local queries against that key block with the fused
rectangular kernel (``infonce_rect_fwd``'s lse output), merges them with logaddexp, and sends
the block on to r + 1 (P2P, overlapped with the compute). No rank ever holds more than two key
blocks, so memory is O(n·D) however large W is, and no n × N logits exist.

Backward (same ring again): for each block, ``infonce_rect_bwd`` with the *global* lse, a row
coefficient w and a diagonal coefficient w on the own block only (0 elsewhere) gives exactly
this block's share of dL/dq, dL/dk and dL/ds:
    G_ij = w·exp(S_ij − lse_i) − w·[src == r][j == i].
Key gradients accumulate into a buffer that travels with the block and arrives back at its
owner after W hops.

Gradient semantics equal the gather form (open_clip) in all four (local_loss,
gather_with_grad) cases. With L_p the local loss of rank p, L = mean_p L_p the global loss and
g_p the upstream gradient on rank p, rank r must receive:
    local,  with grad:   Σ_p g_p ∂L_p/∂x_r          (keys travel, coefficient g_p)
    local,  no grad:     g_r ∂L_r/∂x_r, queries only (keys detached: nothing travels back)
    global, with grad:   (Σ_p g_p) ∂L/∂x_r          (keys travel, coefficient Σg / W)
    global, no grad:     g_r ∂L/∂x_r                (keys travel, unit coefficient, × g_r / W)
and ∂/∂s of its own loss: g_r ∂L_r/∂s (local) or g_r ∂L/∂s (global, one all-reduce).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .._ops import ops

__all__ = ["ring_infonce"]


class _Ring:
    """Neighbour P2P exchange on a process group: send to rank+1, receive from rank−1."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.nxt = to_global((self.rank + 1) % self.world)
        self.prv = to_global((self.rank - 1) % self.world)

    def start(self, buf: torch.Tensor, tag: int = 0):
        """Post send(buf → next) and recv(← prev); returns (recv buffer, requests). Key blocks
        and gradient buffers use different tags so they can be in flight together."""
        recv = torch.empty_like(buf)
        p2p = [
            dist.P2POp(dist.isend, buf, self.nxt, self.group, tag),
            dist.P2POp(dist.irecv, recv, self.prv, self.group, tag),
        ]
        return recv, dist.batch_isend_irecv(p2p)

    @staticmethod
    def finish(pending):
        recv, reqs = pending
        for req in reqs:
            req.wait()
        return recv

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().clone()
        dist.all_reduce(x, group=self.group)
        return x


class _RingInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale, spec, *zs):
        ring = _Ring(spec["group"])
        n = zs[0].shape[0]
        acc = torch.float64 if zs[0].dtype == torch.float64 else torch.float32
        dirs, chunk = spec["dirs"], spec["chunk_size"]
        keys = sorted({km for _, km in dirs})
        slot = {m: k for k, m in enumerate(keys)}
        block = torch.stack([zs[m].detach() for m in keys]).contiguous()  # (K, n, D): one message
        lse = [None] * len(dirs)
        cur = block
        for t in range(ring.world):
            pending = ring.start(cur) if t < ring.world - 1 else None
            for d, (qm, km) in enumerate(dirs):
                part = ops.infonce_rect_fwd(zs[qm], cur[slot[km]], scale, 0, chunk)[1]
                lse[d] = part if t == 0 else torch.logaddexp(lse[d], part)
            if pending is not None:
                cur = ring.finish(pending)
        del cur, block
        # positives S_ii are local: s·<z_qm[i], z_km[i]>; weight w per row and direction
        w = spec["weight"]
        total = torch.zeros((), dtype=acc, device=zs[0].device)
        s = scale.detach().reshape(()).to(acc)
        for d, (qm, km) in enumerate(dirs):
            pos = s * (zs[qm].detach().to(acc) * zs[km].detach().to(acc)).sum(1)
            total = total + w * (lse[d] - pos).sum()
        if not spec["local_loss"]:
            total = ring.all_reduce(total) / ring.world
        ctx.spec, ctx.n = spec, n
        ctx.save_for_backward(scale, *zs, *lse)
        return total

    @staticmethod
    def backward(ctx, g):
        spec, n = ctx.spec, ctx.n
        saved = ctx.saved_tensors
        m_count = len(saved) - 1 - len(spec["dirs"])
        scale, zs, lse = saved[0], saved[1 : 1 + m_count], saved[1 + m_count :]
        need_s, need_z = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        ring = _Ring(spec["group"])
        local, with_grad = spec["local_loss"], spec["gather_with_grad"]
        dirs, chunk, w = spec["dirs"], spec["chunk_size"], spec["weight"]
        acc = torch.float64 if zs[0].dtype == torch.float64 else torch.float32
        g = g.detach().to(acc)
        # coefficient c used for this rank's rows, owner-side factor o (see module docstring)
        keys_travel = with_grad or not local
        if local:
            c, o = g, None
        elif with_grad:
            c, o = ring.all_reduce(g) / ring.world, None
        else:
            c, o = torch.ones((), dtype=acc, device=g.device), g / ring.world
        keys = sorted({km for _, km in dirs})
        slot = {m: k for k, m in enumerate(keys)}
        wvec = torch.full((n,), w, dtype=acc, device=zs[0].device)
        zero = torch.zeros_like(wvec)
        qgrad = {qm: torch.zeros(zs[qm].shape, dtype=acc, device=zs[qm].device) for qm, _ in dirs}
        ds = torch.zeros((), dtype=acc, device=zs[0].device)
        cur = torch.stack([zs[m].detach() for m in keys]).contiguous()
        kgrad = torch.zeros(cur.shape, dtype=acc, device=cur.device) if keys_travel else None
        for t in range(ring.world):
            pending = ring.start(cur) if t < ring.world - 1 else None
            diag = wvec if t == 0 else zero  # positives live in the own block only
            for d, (qm, km) in enumerate(dirs):
                gq, gk, gs = ops.infonce_rect_bwd(zs[qm], cur[slot[km]], scale, lse[d], wvec, diag, 0, chunk)
                qgrad[qm] += gq
                ds += gs.reshape(()).to(acc)
                if keys_travel:
                    kgrad[slot[km]] += c * gk
            if keys_travel:  # the key-gradient buffer follows its block; after W hops it is home
                kgrad = ring.finish(ring.start(kgrad, tag=1))
            if pending is not None:
                cur = ring.finish(pending)
        del cur
        grads = []
        for m, z in enumerate(zs):
            if not need_z[m]:
                grads.append(None)
                continue
            gm = qgrad[m] * c if m in qgrad else torch.zeros(z.shape, dtype=acc, device=z.device)
            if keys_travel and m in slot:
                gm = gm + kgrad[slot[m]]
            if o is not None:
                gm = gm * o
            grads.append(gm.to(z.dtype))
        gscale = None
        if need_s:
            if not local:
                ds = ring.all_reduce(ds) / ring.world
            gscale = (g * ds).to(scale.dtype).reshape(scale.shape)
        return (gscale, None, *grads)


def ring_infonce(zs, scale, pairs, *, local_loss, gather_with_grad, n, group=None, chunk_size=0):
    """Mean over modality pairs of the distributed symmetric InfoNCE, computed on the ring.
    Value and gradients equal :func:`gather_infonce` with the same flags (see module docstring)."""
    dirs = [d for i, j in pairs for d in ((i, j), (j, i))]
    spec = {
        "group": group,
        "dirs": dirs,
        "chunk_size": chunk_size,
        "weight": 1.0 / (2 * len(pairs) * n),
        "local_loss": bool(local_loss),
        "gather_with_grad": bool(gather_with_grad),
    }
    return _RingInfoNCE.apply(scale, spec, *[z.contiguous() for z in zs])
