"""Peak memory per rank of the distributed contrastive loss: semcomp gather vs ring vs
open_clip's ClipLoss, forward + backward, on CPU with gloo (real spawned processes).

Each implementation runs in fresh processes; a rank's figure is the growth of its peak RSS
(resource.getrusage ru_maxrss) from just after its inputs exist to the end of forward+backward,
i.e. the memory the loss itself needed. Also records wall time of the step on rank 0 and the
loss values (they must agree). Output: benchmarks/results/distributed_cpu.json.

    python -m benchmarks.bench_distributed [--global-batch 16384] [--world-size 4] [--dim 512]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from benchmarks.common import cpu_peak_extra_bytes, environment, median_time, write_result
from semcomp_ext.distributed.launch import launch

# Every block >= 64 KiB is mapped and unmapped on free, so resident memory follows live
# allocations (set before the rank processes start; they inherit it).
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "0")

IMPLS = ("semcomp_gather", "semcomp_ring", "open_clip")


def _worker(rank, world, impl, n, d, local_loss, gather_with_grad, seed):
    import torch.nn.functional as F

    import semcomp_ext as sc
    from semcomp_ext._compat import import_open_clip

    oc = import_open_clip()
    g = torch.Generator().manual_seed(seed + rank)
    img = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    txt = F.normalize(torch.randn(n, d, generator=g), dim=1).requires_grad_()
    scale = torch.tensor(1 / 0.07, requires_grad=True)
    kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
    if impl == "open_clip":
        loss_fn = oc.loss.ClipLoss(**kw)
    else:
        loss_fn = sc.ClipLoss(**kw, impl=impl.split("_")[1])
    def step():
        for t in (img, txt, scale):
            t.grad = None
        out = loss_fn(img, txt, scale)
        out.backward()
        torch.distributed.barrier()
        return out

    step()  # warm-up: thread pools, communication buffers, lazy imports are not the loss's memory
    torch.distributed.barrier()
    box = {}
    peak = cpu_peak_extra_bytes(lambda: box.update(median_time(lambda: box.setdefault("loss", step()), repeats=1, warmup=0)))
    seconds = box["median_s"]
    return {"peak_rss_delta_mib": peak / 2**20, "seconds": seconds,
            "loss": float(box["loss"].detach()), "grad_norm": float(img.grad.norm())}



def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--global-batch", type=int, default=16384)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--local-loss", type=int, default=1)
    ap.add_argument("--gather-with-grad", type=int, default=1)
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distributed_cpu.json"))
    args = ap.parse_args(argv)
    w, n = args.world_size, args.global_batch // args.world_size
    runs = {}
    for impl in args.impls.split(","):
        per_rank = launch(_worker, w, (impl, n, args.dim, bool(args.local_loss), bool(args.gather_with_grad), 0),
                          timeout=900, pg_timeout=600)
        runs[impl] = {
            "peak_rss_delta_mib_per_rank": [round(r["peak_rss_delta_mib"], 1) for r in per_rank],
            "max_peak_rss_delta_mib": round(max(r["peak_rss_delta_mib"] for r in per_rank), 1),
            "seconds_rank0": round(per_rank[0]["seconds"], 2),
            "loss_per_rank": [r["loss"] for r in per_rank],
            "grad_norm_rank0": per_rank[0]["grad_norm"],
        }
        print(impl, json.dumps(runs[impl]), flush=True)
    result = {
        "benchmark": "distributed ClipLoss forward+backward, peak RSS growth per rank",
        "global_batch": args.global_batch, "world_size": w, "local_batch": n, "dim": args.dim, "dtype": "float32",
        "local_loss": bool(args.local_loss), "gather_with_grad": bool(args.gather_with_grad),
        "backend": "gloo", "threads_per_rank": 1,
        "env": environment(),
        "note": "second forward+backward after a warm-up; peak resident memory above the resident memory before it (VmHWM reset), "
                f"gradients of the local features included; input features (2 x n x D fp32 = {2 * n * args.dim * 4 / 2**20:.0f} MiB per rank) exist before",
        "results": runs,
    }
    print("wrote", write_result(args.out, result))


if __name__ == "__main__":
    main()
