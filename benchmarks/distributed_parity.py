"""Equality table of the distributed ClipLoss: max abs difference of loss, feature gradients and
logit-scale gradient, per (local_loss, gather_with_grad), world size and dtype, over all ranks:
semcomp gather / ring vs open_clip's ClipLoss in the same processes, vs a single-process
reference on the global batch, and ring vs gather. Writes benchmarks/results/distributed_parity.json.

    python -m benchmarks.distributed_parity [--local-batch 4] [--dim 8]
"""

from __future__ import annotations

import argparse
import os

from benchmarks.common import environment, write_result
from semcomp_ext.distributed.launch import launch
from semcomp_ext.distributed.verify import clip_parity_worker


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local-batch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "distributed_parity.json"))
    args = ap.parse_args(argv)
    table = {}
    for world in (2, 4):
        for dtype in ("float64", "float32"):
            per_rank = launch(clip_parity_worker, world, (args.local_batch, args.dim, dtype), timeout=300)
            merged = {}
            for res in per_rank:  # max over ranks
                for combo, comps in res.items():
                    for comp, diffs in comps.items():
                        slot = merged.setdefault(combo, {}).setdefault(comp, {})
                        for k, v in diffs.items():
                            slot[k] = max(slot.get(k, 0.0), v)
            table[f"W={world},{dtype}"] = merged
            print(world, dtype, flush=True)
    out = {"local_batch": args.local_batch, "dim": args.dim, "env": environment(),
           "upstream_gradient": "1 + rank/2 (differs per rank)", "max_abs_diff_over_ranks": table}
    print("wrote", write_result(args.out, out))


if __name__ == "__main__":
    main()
