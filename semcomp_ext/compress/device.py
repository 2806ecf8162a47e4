"""`semcomp compress --device cuda`: the per-block centroid + RFS of the pipeline on a GPU.

Each shard task streams its blocks through a small software pipeline (BlockPipeline):

    step t:  read block t, copy it into ring slot t % R of pinned host buffers, upload it
             (copy stream, non-blocking)                                      -> event up[t]
             compute block t-1 on the compute stream (waits up[t-1]), download its results
             into pinned buffers (second copy stream)                         -> event done[t-1]
             retire block t-1-lag: wait done[t-1-lag], hand it to the consumer

so the host reads block t while the GPU uploads, computes and downloads the blocks before it.
At most lag + 2 blocks are in flight per task (R = lag + 2 host slots; the device tensors of a
block are released when it is retired), which bounds pinned and device memory per worker.
With device="cpu" the same code runs with plain host buffers and no streams (what the CPU
tests exercise); the plain CPU path of `semcomp compress` does not go through this file.

Byte identity with the CPU path (what each device step may and may not do):
- without input normalisation, pairs mode runs the CPU path's own op, semcomp::pair_mean: its
  CUDA kernel makes the same fp32 additions in modality order and the same division by M as
  the CPU kernel (bit-identical on the CUDA emulator), with the finite flags from the same read.
- with it, the column gather (select_features), the fp16/bf16 -> fp32 casts, the additions in
  modality order and the division by M are correctly rounded elementwise operations: the same
  bits on any device. The division is by a device tensor, never by a Python number: CUDA turns
  a division by a host scalar into a multiplication by its reciprocal, which differs for M = 3.
- reductions whose order is an implementation detail are not done on the device: the L2 norms
  of --normalize input/both (full-D rows) are computed on the host with the CPU path's own
  expression and uploaded; --normalize output/both normalises the downloaded centroids on the
  host (pairs mode; concepts mode normalises in the reduce task, on the host, as before).
- concepts mode: the CPU segment kernel sums each concept's rows sequentially in row order
  (modality 0's occurrences, then modality 1's, ...). The CUDA segment kernel splits a group
  over row lanes and combines the partial sums, a different order. So the device does not call
  it: each block's rows are permuted (on the device, one gather) so that position j of every
  concept is contiguous, and the sums are accumulated with one elementwise add per position:
  the CPU's order, hence its bits. Cost: one small kernel per row of the longest concept run in
  a block (M x its occurrences), cheap for many small concepts, slow for a few huge ones.
- non-finite rows: the device flags rows with a NaN/Inf; a flagged block is re-checked on the
  host by the CPU path's own check, so --skip-invalid masks and errors are the CPU path's.
"""

from __future__ import annotations

import re
from collections import deque

import numpy as np

from .options import OptionError

DEFAULT_LAG = 1
_SPEC = re.compile(r"cpu|cuda(:\d+)?")


def resolve_device(spec, engine: str = "local"):
    """The torch.device of a `device` option value; OptionError (a ValueError naming the field
    and value) when it is malformed, when CUDA or semcomp's CUDA kernels are missing, or with the
    ray engine."""
    import torch

    if not isinstance(spec, str) or not _SPEC.fullmatch(spec):
        raise OptionError("device", f"must be cpu, cuda or cuda:N, got {spec!r}")
    dev = torch.device(spec)
    if dev.type == "cpu":
        return dev
    if engine == "ray":
        raise OptionError("device", f"{spec} runs with engine 'local' only (Ray tasks are scheduled on CPUs): "
                          "use engine 'local', or device 'cpu' with Ray")
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no GPU is visible"
        raise OptionError("device", f"{spec}: CUDA is not available ({why}; torch {torch.__version__})")
    from .._ops import has_kernel

    if not (has_kernel("gather_columns", "cuda") and has_kernel("pair_mean", "cuda")):
        raise OptionError("device", f"{spec}: semcomp_ext was built without its CUDA kernels "
                         "(rebuild with SEMCOMP_CUDA=ON)")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if index >= count:
        raise OptionError("device", f"{spec}: no such GPU ({count} visible)")
    return torch.device("cuda", index)


class _Job:
    __slots__ = ("meta", "host", "dev", "up", "outs", "fetched", "done")

    def __init__(self, meta, host):
        self.meta, self.host = meta, host
        self.dev = self.up = self.outs = self.fetched = self.done = None


class BlockPipeline:
    """Blocks of host tensors -> upload -> compute -> download on `device`, in order, with
    `lag` computed blocks held back so copies and compute of neighbouring blocks overlap.

    run(source, compute): source yields (meta, [host tensors]) (the tensors may be reused by
    the source after the next request: they are copied into the ring at once); compute(meta,
    [device tensors]) returns a dict of device tensors (other values pass through). Yields
    (meta, [staged host tensors], {name: host tensor}); the staged host tensors stay valid
    until the next request. Block k is yielded once block k+1 is computed and block k+2
    uploaded (lag 1). stats: blocks, max_in_flight (uploaded, not yet yielded), slots."""

    def __init__(self, device, lag: int = DEFAULT_LAG):
        import torch

        if lag < 0:
            raise ValueError(f"BlockPipeline: lag must be >= 0, got {lag}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.lag = lag
        self.ring = [None] * (lag + 2)       # per slot: list of host buffers (pinned on CUDA)
        self.ring_events = [None] * (lag + 2)  # per slot: upload event of its last block
        self.stats = {"blocks": 0, "max_in_flight": 0, "slots": len(self.ring), "allocations": 0}
        if self.cuda:
            self.h2d = torch.cuda.Stream(self.device)
            self.comp = torch.cuda.Stream(self.device)
            self.d2h = torch.cuda.Stream(self.device)

    # -- stages --------------------------------------------------------------------------------

    def _stage(self, k: int, arrays) -> list:
        """Copy block k's host tensors into ring slot k % R; returns views of exactly their size."""
        import torch

        s = k % len(self.ring)
        if self.ring_events[s] is not None:
            self.ring_events[s].synchronize()  # the slot's previous upload has finished reading it
        bufs = self.ring[s] or []
        views = []
        for i, a in enumerate(arrays):
            b = bufs[i] if i < len(bufs) else None
            if b is None or b.dtype != a.dtype or b.shape[1:] != a.shape[1:] or b.shape[0] < a.shape[0]:
                b = torch.empty(a.shape, dtype=a.dtype, pin_memory=self.cuda)
                self.stats["allocations"] += 1
                bufs = bufs[:i] + [b] + bufs[i + 1:]
            v = b[: a.shape[0]]
            v.copy_(a)
            views.append(v)
        self.ring[s] = bufs
        return views

    def _upload(self, k: int, meta, arrays) -> _Job:

        job = self._send(_Job(meta, self._stage(k, arrays)))
        if self.cuda:
            self.ring_events[k % len(self.ring)] = job.up
        return job

    def _send(self, job: _Job) -> _Job:
        """Issue the non-blocking upload of job.host on the copy stream (CUDA)."""
        import torch

        if self.cuda:
            with torch.cuda.stream(self.h2d):
                job.dev = [h.to(self.device, non_blocking=True) for h in job.host]
                job.up = torch.cuda.Event()
                job.up.record(self.h2d)
        else:
            job.dev = job.host
        return job

    def _compute(self, job: _Job, compute) -> None:
        import torch

        if not self.cuda:
            job.fetched = compute(job.meta, job.dev)
            return
        self.comp.wait_event(job.up)
        with torch.cuda.stream(self.comp):
            job.outs = compute(job.meta, job.dev)
            ready = torch.cuda.Event()
            ready.record(self.comp)
        self.d2h.wait_event(ready)
        with torch.cuda.stream(self.d2h):
            job.fetched = {}
            for name, t in job.outs.items():
                if torch.is_tensor(t) and t.device.type == "cuda":
                    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    h.copy_(t, non_blocking=True)
                    t = h
                job.fetched[name] = t
            job.done = torch.cuda.Event()
            job.done.record(self.d2h)

    def _retire(self, job: _Job):
        if self.cuda:
            job.done.synchronize()
            job.dev = job.outs = None  # device memory back to the caching allocator
        return job.meta, job.host, job.fetched

    def run_now(self, meta, arrays, compute) -> dict:
        """One block through upload, compute and download, synchronously (a re-run of a block
        while others are in flight: staged in buffers of its own, never in the ring)."""
        import torch

        job = self._send(_Job(meta, [torch.empty(a.shape, dtype=a.dtype, pin_memory=self.cuda).copy_(a)
                                     for a in arrays]))
        self._compute(job, compute)
        return self._retire(job)[2]

    def run(self, source, compute):
        staged, running, k = None, deque(), 0
        try:
            for meta, arrays in source:
                job = self._upload(k, meta, arrays)
                k += 1
                if staged is not None:
                    self._compute(staged, compute)
                    running.append(staged)
                staged = job
                self.stats["blocks"] = k
                self.stats["max_in_flight"] = max(self.stats["max_in_flight"], len(running) + 1)
                while len(running) > self.lag:
                    yield self._retire(running.popleft())
            if staged is not None:
                self._compute(staged, compute)
                running.append(staged)
                staged = None
            while running:
                yield self._retire(running.popleft())
        finally:
            # closed early or failed: let the queued copies finish before their buffers go away
            if self.cuda:
                for j in list(running) + ([staged] if staged is not None else []):
                    ev = j.done or j.up
                    if ev is not None:
                        ev.synchronize()
            close = getattr(source, "close", None)
            if close is not None:
                close()


def _pipeline(plan, device, lag):
    import torch

    dev = torch.device(device if device is not None else plan.device or "cpu")
    return BlockPipeline(dev, lag)


class _Consts:
    """Per-pipeline device constants, made on the compute stream at first use."""

    def __init__(self, device, index, m: int):
        self.device, self.index_host, self.m = device, index, m
        self.index = self.div = None

    def get(self):
        import torch

        if self.div is None:
            self.index = self.index_host.to(self.device)
            self.div = torch.tensor(float(self.m), dtype=torch.float32, device=self.device)
        return self.index, self.div


def _finite_rows(zs):
    import torch

    fin = None
    for z in zs:
        f = torch.isfinite(z).all(1)
        fin = f if fin is None else fin & f
    return fin


# ---- pairs mode ---------------------------------------------------------------------------


def pair_blocks(plan, shards, device=None, lag: int = DEFAULT_LAG):
    """The blocks of pipeline.pair_blocks — (first row, finite-row mask or None, centroid +
    RFS block, float32 on the host) — computed on `device` (default: plan.device)."""
    import torch
    import torch.nn.functional as F

    from .. import select_features
    from .._ops import ops
    from .blocks import as_tensor, check_finite, finite_rows  # finite_rows: the CPU path's check of the flags
    from .readers import iter_chunks

    p = plan.params
    m_count = len(shards)
    keep_all = len(plan.index) == plan.dim
    norm_in = p["normalize"] in ("input", "both")
    norm_out = p["normalize"] in ("output", "both")
    paths = [s.path for s in shards]
    pipe = _pipeline(plan, device, lag)
    consts = _Consts(pipe.device, torch.tensor(plan.index, dtype=torch.int64), m_count)

    def source():
        readers = [iter_chunks(s, p["batch_size"]) for s in shards]
        start = 0
        try:
            for chunk in zip(*readers):
                zs = [as_tensor(c, plan.in_dtype) for c in chunk]
                # the full-D row norms: a reduction, so on the host with the CPU path's expression
                norms = [torch.linalg.vector_norm(z.float(), dim=1, keepdim=True).clamp_min(1e-12)
                         for z in zs] if norm_in else []
                yield {"start": start}, zs + norms
                start += zs[0].shape[0]
        finally:
            for r in readers:
                r.close()

    def compute(meta, dev):
        index, div = consts.get()
        zs, norms = dev[:m_count], dev[m_count:]
        if not norm_in:
            # the CPU path's own op (CUDA kernel: the same additions in the same order, then the
            # division by M; the finite flags in the same read of each row)
            out, finite = ops.pair_mean(zs, None if keep_all else index)
            return {"out": out, "finite": finite}
        out = None
        for m, z in enumerate(zs):
            g = z if keep_all else select_features(z, index)
            g = g.float() / norms[m]  # a new tensor: the staged input is never written
            out = g if out is None else out.add_(g)
        return {"out": out.div_(div), "finite": _finite_rows(zs)}

    with _closing(pipe.run(source(), compute)) as blocks:
        for meta, host, got in blocks:
            mask = None
            if not bool(got["finite"].all()):  # rare: the CPU path's check gives the mask or the error
                if p["normalize"] == "none":  # the CPU path checks its fused pair_mean op's flags
                    mask = finite_rows(got["finite"], host[:m_count], paths, meta["start"], p["skip_invalid"])
                else:
                    mask = check_finite(host[:m_count], paths, meta["start"], p["skip_invalid"])
            out = got["out"]
            if norm_out:
                out = F.normalize(out, dim=1)
            yield meta["start"], mask, out


# ---- concepts mode ------------------------------------------------------------------------


def _concept_layout(ids, m_count: int) -> dict:
    """Host-side plan of one block's segment sums in the CPU kernel's order. Rows of the
    (M*n, K) stack (modality-major, as the CPU path's torch.cat) are grouped by concept in
    row order (a stable sort); groups are ranked by size, largest first, so the groups that
    have a j-th row are a prefix of the ranking; `rows` lists the stack's rows position by
    position (all first rows, then all second rows, ...), `prefix[j]` groups long; `rank[g]`
    is group g's place in the ranking (sums in ranking order -> id order)."""
    import torch

    uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
    g_count = int(uniq.numel())
    inv_rep = inv.numpy().astype(np.int64)
    inv_rep = np.tile(inv_rep, m_count)
    counts = np.bincount(inv_rep, minlength=g_count).astype(np.int64)
    order = np.argsort(inv_rep, kind="stable")          # group-major, row order within a group
    goff = np.zeros(g_count + 1, np.int64)
    np.cumsum(counts, out=goff[1:])
    rank_order = np.argsort(-counts, kind="stable")      # groups by size, largest first
    rank = np.empty(g_count, np.int64)
    rank[rank_order] = np.arange(g_count)
    sizes = counts[rank_order]
    longest = int(sizes[0])
    prefix = np.searchsorted(-sizes, -np.arange(longest), side="left")  # groups with > j rows
    pos = np.zeros(longest + 1, np.int64)
    np.cumsum(prefix, out=pos[1:])
    grp = inv_rep[order]
    j = np.arange(inv_rep.size, dtype=np.int64) - goff[grp]
    rows = np.empty(inv_rep.size, np.int64)
    rows[pos[j] + rank[grp]] = order
    sizes_f = sizes.astype(np.float32)
    return {"uniq": uniq, "counts": torch.from_numpy(counts), "prefix": prefix.tolist(), "pos": pos.tolist(),
            "arrays": [torch.from_numpy(rows), torch.from_numpy(rank),
                       torch.from_numpy(np.float32(1) / sizes_f), torch.from_numpy(sizes_f)]}


def concept_partials(plan, shards, cshard, device=None, lag: int = DEFAULT_LAG):
    """(unique ids, per-id sums, counts) per block — the lists concept_map_task builds with the
    CPU segment kernel — and the number of invalid rows, computed on `device`."""
    import torch

    from .. import select_features
    from .blocks import as_tensor, check_finite, encode_ids
    from .readers import iter_chunks

    p = plan.params
    m_count = len(shards)
    features = len(plan.index) != plan.dim
    norm_in = p["normalize"] in ("input", "both")
    keep = len(plan.index)
    paths = [s.path for s in shards]
    pipe = _pipeline(plan, device, lag)
    consts = _Consts(pipe.device, torch.tensor(plan.index, dtype=torch.int64), m_count)

    def prepare(ids, zs):
        lay = _concept_layout(ids, m_count)
        extra = []
        if norm_in:  # F.normalize's denominator over the CPU path's stack, on the host
            x = torch.cat([z.float() for z in zs]) if m_count > 1 else zs[0].float()
            extra = [x.norm(2, 1, keepdim=True).clamp_min(1e-12)]
        arrays = list(zs) + extra + lay.pop("arrays")
        return lay, arrays

    def source():
        b = p["batch_size"]
        readers = [iter_chunks(cshard, b)] + [iter_chunks(s, b) for s in shards]
        start = 0
        try:
            for chunk in zip(*readers):
                ids = torch.from_numpy(encode_ids(chunk[0]))  # a copy: chunk[0] is a reused buffer
                zs = [as_tensor(c, plan.in_dtype) for c in chunk[1:]]
                lay, arrays = prepare(ids, zs)
                lay.update(start=start, ids=ids)
                yield lay, arrays
                start += ids.shape[0]
        finally:
            for r in readers:
                r.close()

    def compute(lay, dev):
        index, _ = consts.get()
        zs = dev[:m_count]
        denom = dev[m_count] if norm_in else None
        rows, rank, inv, sizes = dev[m_count + int(norm_in):]
        parts = []
        for z in zs:
            g = select_features(z, index) if features else z
            parts.append(g.float())
        x = torch.cat(parts) if m_count > 1 else parts[0]
        if norm_in:
            x = x / denom
        xs = x.index_select(0, rows)
        acc = torch.zeros(len(lay["uniq"]), keep, dtype=torch.float32, device=x.device)
        for j, nj in enumerate(lay["prefix"]):  # one add per position: each group's sum in row order
            acc[:nj].add_(xs[lay["pos"][j]: lay["pos"][j] + nj])
        sums = (acc * inv.unsqueeze(1)) * sizes.unsqueeze(1)  # the kernel's mean, then * count
        return {"sums": sums.index_select(0, rank), "finite": _finite_rows(zs)}  # back to id order

    u_all, s_all, c_all, invalid = [], [], [], 0
    with _closing(pipe.run(source(), compute)) as blocks:
        for lay, host, got in blocks:
            if not bool(got["finite"].all()):  # rare: the CPU path's check, then the block again
                zs = host[:m_count]
                mask = check_finite(zs, paths, lay["start"], p["skip_invalid"])
                if mask is not None:
                    invalid += int((~mask).sum())
                    ids = lay["ids"][mask]
                    if ids.numel() == 0:
                        continue
                    lay, arrays = prepare(ids, [z[mask] for z in zs])
                    got = pipe.run_now(lay, arrays, compute)
            u_all.append(lay["uniq"]), s_all.append(got["sums"]), c_all.append(lay["counts"])
    return u_all, s_all, c_all, invalid


class _closing:
    """contextlib.closing for generators, without importing contextlib at module import."""

    def __init__(self, gen):
        self.gen = gen

    def __enter__(self):
        return self.gen

    def __exit__(self, *exc):
        self.gen.close()
        return False
