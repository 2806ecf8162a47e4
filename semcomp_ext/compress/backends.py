"""Block backends: where the per-block maths of a shard task runs. One interface, two
implementations, chosen from the plan (`backend_for`): the CPU (the fused pair_mean op, the
segment-sum kernel) and CUDA (device.py: pinned staging, copies overlapped with compute). Both
yield the same blocks in the same order, so the bytes written do not depend on the backend.

    pair_blocks(plan, shards)        -> iterator of (first row, finite mask or None, (n, K) float32)
    concept_partials(plan, shards, c) -> (ids, sums, counts lists per block, invalid rows)
"""

from __future__ import annotations

import torch

from .._ops import ops
from .blocks import as_tensor, check_finite, encode_ids, finite_rows, pair_block, segment_sums
from .readers import iter_chunks


class CpuBackend:
    name = "cpu"

    def pair_blocks(self, plan, shards):
        p = plan.params
        index = torch.tensor(plan.index, dtype=torch.int64)
        keep_all = len(plan.index) == plan.dim
        paths = [s.path for s in shards]
        start = 0
        readers = [iter_chunks(s, p["batch_size"]) for s in shards]
        fused = p["normalize"] == "none"
        try:
            for chunk in zip(*readers):
                zs = [as_tensor(c, plan.in_dtype) for c in chunk]
                if fused:  # the common case: one pass over each row (mean, RFS gather, finite flags)
                    out, finite = ops.pair_mean(zs, None if keep_all else index)
                    mask = finite_rows(finite, zs, paths, start, p["skip_invalid"])
                else:
                    mask = check_finite(zs, paths, start, p["skip_invalid"])
                    out = pair_block(zs, index, keep_all, p["normalize"])
                del chunk, zs  # drop the input blocks (maps) before the consumer asks for the next
                yield start, mask, out
                start += out.shape[0]
        finally:  # close every reader now (files, read-ahead threads), not when collected
            for r in readers:
                r.close()

    def concept_partials(self, plan, shards, cshard):
        p = plan.params
        paths = [s.path for s in shards]
        index = torch.tensor(plan.index, dtype=torch.int64)
        features = None if len(plan.index) == plan.dim else index
        norm = "input" if p["normalize"] in ("input", "both") else False
        u_all, s_all, c_all = [], [], []
        invalid, start = 0, 0
        b = p["batch_size"]
        for chunk in zip(iter_chunks(cshard, b), *(iter_chunks(s, b) for s in shards)):
            ids = torch.from_numpy(encode_ids(chunk[0]))  # a copy: chunk[0] is a reused buffer
            zs = [as_tensor(c, plan.in_dtype) for c in chunk[1:]]
            mask = check_finite(zs, paths, start, p["skip_invalid"])
            start += ids.shape[0]
            if mask is not None:
                invalid += int((~mask).sum())
                ids, zs = ids[mask], [z[mask] for z in zs]
                if ids.numel() == 0:
                    continue
            # all modalities of the block in one segment reduction: M*n rows, ids repeated
            x = torch.cat([z.float() for z in zs]) if len(zs) > 1 else zs[0].float()
            u, s, c = segment_sums(x, ids.repeat(len(zs)), features, norm)
            u_all.append(u), s_all.append(s), c_all.append(c)
        return u_all, s_all, c_all, invalid


class CudaBackend:
    """--device cuda: the same blocks and partials from device.py's GPU pipeline."""

    name = "cuda"

    def pair_blocks(self, plan, shards):
        from .device import pair_blocks

        yield from pair_blocks(plan, shards)

    def concept_partials(self, plan, shards, cshard):
        from .device import concept_partials

        return concept_partials(plan, shards, cshard)


_CPU, _CUDA = CpuBackend(), CudaBackend()


def backend_for(plan):
    """The backend the plan was built for: the pipelined device backend when it names a device
    (Plan.device), else the CPU backend."""
    return _CUDA if plan.device is not None else _CPU
