"""Gradient caching benchmark: peak CPU memory against batch size, and step time, for an open_clip
model trained with the fused ClipLoss, full batch vs :func:`semcomp_ext.grad_cache_step`.

Model: open_clip's CLIP built from semcomp_ext's ``semcomp-tiny`` config (ViT 28 x 28 images,
patch 7, 2 layers of width 64; text 24 tokens, 2 layers of width 64; D = 64), fp32, train mode.
Inputs: random images and random token ids (never zeros). One step = encode both towers, the
fused ClipLoss on ``logit_scale.exp()``, backward (no optimizer step: its memory does not depend
on the batch).

Memory: each (method, batch) point runs in a fresh interpreter: model and inputs built, one
warm-up step at a small batch (parameter gradients allocated, then zeroed in place), then the
peak resident memory of one step above the resident memory before it
(:func:`semcomp_ext.bench.timing.cpu_peak_extra_bytes`: VmHWM reset through
/proc/self/clear_refs, glibc set to return freed blocks >= 64 KiB so the resident set follows
live allocations). The claim checked for the cached step::

    peak_cached(N) <= 1.2 x peak_full(micro_batch) + 16 N D bytes

(one micro-batch's full step, plus the image and text embeddings and their gradients in fp32).

Time: full vs cached at one batch, in one process, interleaved rounds (one call of each per
round), medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

__all__ = ["main", "memory_point", "run", "markdown"]

MODEL = "semcomp-tiny"
IMAGE, CONTEXT, VOCAB = 28, 24, 49408


def _model():
    import open_clip

    from ..open_clip_train import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL, output_dict=True)
    model.train()
    return model


def _inputs(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    texts = torch.randint(1, VOCAB - 1, (n, CONTEXT), generator=g)
    return images, texts


def _steps(model, micro_batch: int):
    import semcomp_ext

    clip = semcomp_ext.ClipLoss()

    def encode_image(x):
        return model.encode_image(x, normalize=True)

    def encode_text(t):
        return model.encode_text(t, normalize=True)

    def loss_fn(a, b):
        return clip(a, b, model.logit_scale.exp())

    def full(images, texts):
        loss = loss_fn(encode_image(images), encode_text(texts))
        loss.backward()
        return loss.detach()

    def cached(images, texts):
        return semcomp_ext.grad_cache_step([encode_image, encode_text], [images, texts], loss_fn, micro_batch)

    return {"full": full, "cached": cached}


def memory_point(method: str, batch: int, micro_batch: int) -> dict:
    """In a fresh interpreter: the peak extra resident bytes of one step (see the module doc)."""
    from .timing import cpu_peak_extra_bytes, prepare_cpu_memory_measurement

    ready = prepare_cpu_memory_measurement()
    model = _model()
    step = _steps(model, micro_batch)[method]
    step(*_inputs(min(batch, 16), seed=2))  # warm-up: parameter gradients exist from here on
    model.zero_grad(set_to_none=False)
    images, texts = _inputs(batch)
    peak = cpu_peak_extra_bytes(lambda: step(images, texts)) if ready else None
    return {"method": method, "batch": batch, "micro_batch": micro_batch if method == "cached" else None,
            "peak_extra_bytes": peak}


def _child(method: str, batch: int, micro_batch: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    code = ("import json, sys, torch; torch.set_num_threads(%d); from semcomp_ext.bench.grad_cache import "
            "memory_point; print(json.dumps(memory_point(%r, %d, %d)))" % (threads, method, batch, micro_batch))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"memory point {method} batch {batch} failed:\n{proc.stderr[-2000:]}")
    point = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"bench_grad_cache: {json.dumps(point)}", file=sys.stderr, flush=True)
    return point


def step_time(micro_batch: int, time_batch: int, repeats: int, threads: int) -> dict:
    """Full vs cached step at time_batch rows, interleaved rounds, medians (this process)."""
    from .timing import environment, interleaved_times

    torch.set_num_threads(threads)
    model = _model()
    steps = _steps(model, micro_batch)
    images, texts = _inputs(time_batch)
    timing, errors = interleaved_times({k: (lambda f=f: f(images, texts)) for k, f in steps.items()},
                                       "cpu", repeats=repeats, warmup=1)
    if errors:
        raise RuntimeError(f"timing failed: {errors}")
    return {"batch": time_batch, "micro_batch": micro_batch, "repeats": repeats, "threads": threads, **timing,
            "cached_over_full": timing["cached"]["median_s"] / timing["full"]["median_s"],
            "environment": environment("cpu")}


def run(batches: list[int], micro_batch: int, time_batch: int, repeats: int, threads: int) -> dict:
    from .timing import environment

    points = [_child("full", micro_batch, micro_batch, threads)]
    for n in batches:
        for method in ("full", "cached"):
            points.append(_child(method, n, micro_batch, threads))
    model = _model()
    d = model.text_projection.shape[1]
    one_micro = points[0]["peak_extra_bytes"]
    for p in points:
        p["embedding_bytes"] = 16 * p["batch"] * d
        if p["method"] == "cached" and one_micro is not None and p["peak_extra_bytes"] is not None:
            p["allowance_bytes"] = int(1.2 * one_micro + p["embedding_bytes"])
            p["within_allowance"] = p["peak_extra_bytes"] <= p["allowance_bytes"]
    return {
        "environment": environment("cpu"),
        "model": MODEL, "embed_dim": d, "params": sum(p.numel() for p in model.parameters()),
        "micro_batch": micro_batch, "threads": threads,
        "memory": points,
        "time": step_time(micro_batch, time_batch, repeats, threads),
    }


def markdown(payload: dict) -> str:
    """The two tables of docs/large_batch.md."""
    env, mb = payload["environment"], payload["micro_batch"]
    rows = {}
    for p in payload["memory"]:
        rows.setdefault(p["batch"], {})[p["method"]] = p
    out = [f"open_clip `{payload['model']}` (D = {payload['embed_dim']}), fp32, fused ClipLoss; {env['machine']}; "
           f"torch {env['torch']}; commit {env['git_commit']}; {env['date']}.", "",
           f"| batch | full batch: peak extra | cached (micro-batch {mb}): peak extra | allowance 1.2 × micro-batch step + 16·N·D |",
           "|---:|---:|---:|---:|"]
    for n in sorted(rows):
        full, cached = rows[n].get("full"), rows[n].get("cached")
        mib = lambda p, k="peak_extra_bytes": "—" if p is None or p.get(k) is None else f"{p[k] / 2**20:.1f} MiB"  # noqa: E731
        out.append(f"| {n} | {mib(full)} | {mib(cached)} | {mib(cached, 'allowance_bytes')} |")
    t = payload["time"]
    tenv = t.get("environment", env)
    out += ["", f"Step time at batch {t['batch']}, median of {t['repeats']} interleaved rounds, "
            f"{t.get('threads', payload['threads'])} torch thread(s), {tenv['date']}, load average {tenv.get('load_average')}:", "",
            "| step | seconds |", "|---|---:|",
            f"| full batch | {t['full']['median_s']:.3f} |",
            f"| cached, micro-batch {t.get('micro_batch', mb)} | {t['cached']['median_s']:.3f} |",
            f"| cached / full | {t['cached_over_full']:.2f} |"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_grad_cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--time-batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/grad_cache_cpu.json")
    ap.add_argument("--time-only", action="store_true",
                    help="measure the step time again and replace it in --out (memory points kept)")
    args = ap.parse_args(argv)
    for name in ("micro_batch", "time_batch", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        ap.error(f"--batches must all be >= 1, got {args.batches}")
    out = Path(args.out)
    if args.time_only:
        if not out.is_file():
            ap.error(f"--time-only needs an earlier result in --out, {out} does not exist")
        payload = json.loads(out.read_text())
        payload["time"] = step_time(args.micro_batch, args.time_batch, args.repeats, args.threads)
    else:
        payload = run(args.batches, args.micro_batch, args.time_batch, args.repeats, args.threads)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out)
    print(markdown(payload))
    print(f"\nwrote {out}")
    return 0
