"""Equality table of the distributed ClipLoss: max abs difference of loss, feature gradients and
logit-scale gradient, per (local_loss, gather_with_grad), world size and dtype, over all ranks:
semcomp gather / ring vs open_clip's ClipLoss in the same processes, vs a single-process
reference on the global batch, and ring vs gather. Writes benchmarks/results/distributed_parity.json.

    python benchmarks/distributed_parity.py [--local-batch 4] [--dim 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from semcomp_ext.distributed.launch import launch  # noqa: E402
from semcomp_ext.distributed.verify import clip_parity_worker  # noqa: E402


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
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"local_batch": args.local_batch, "dim": args.dim, "torch": torch.__version__, "git_commit": commit,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "upstream_gradient": "1 + rank/2 (differs per rank)", "max_abs_diff_over_ranks": table}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
