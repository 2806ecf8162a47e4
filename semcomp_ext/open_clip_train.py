"""``python -m semcomp_ext.open_clip_train [open_clip_train arguments]``: open_clip's own
training script (``open_clip_train.main``) with the fused :class:`semcomp_ext.ClipLoss` as its
CLIP loss (see :mod:`semcomp_ext.integrations.open_clip`). Every argument is open_clip's; the
run is the same as ``python -m open_clip_train.main ...`` except for the loss implementation.

semcomp_ext's small model configs (``semcomp-tiny``: 28 x 28 images, 2-layer towers) are
registered too, so ``--model semcomp-tiny --dataset-type synthetic`` runs on a CPU in seconds.
Distributed runs work as with open_clip: ``torchrun --nproc_per_node 4 -m semcomp_ext.open_clip_train ...``.

One argument is added: ``--grad-cache-micro-batch B`` takes each step with gradient caching
(both towers encoded in micro-batches of at most B rows; the loss and its gradient on the whole
``--batch-size``): the batch no longer has to fit the encoders' activations, only one
micro-batch's do (see docs/large_batch.md). Not with ``--accum-freq`` > 1.
"""

from __future__ import annotations

import os
import sys

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "train", "model_configs")
"""semcomp_ext's open_clip model configs (``open_clip.add_model_config(CONFIG_DIR)`` registers them)."""


_FLAG = "--grad-cache-micro-batch"
_HELP = (f"  {_FLAG} B   (semcomp_ext) take each step with gradient caching: encode in micro-batches\n"
         "                              of at most B rows; the loss stays on the whole batch")


def _split_grad_cache(argv: list[str]) -> tuple[list[str], int | None]:
    """argv without --grad-cache-micro-batch B / --grad-cache-micro-batch=B, and B (or None).
    Raises ValueError with the usage message for a missing or bad B."""
    rest, value = [], None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == _FLAG or arg.startswith(_FLAG + "="):
            if "=" in arg:
                raw = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                raw = argv[i + 1]
                i += 1
            else:
                raise ValueError(f"{_FLAG} needs a value (rows per micro-batch, an int >= 1)")
            try:
                value = int(raw)
            except ValueError:
                value = None
            if value is None or value < 1:
                raise ValueError(f"{_FLAG} must be an int >= 1, got {raw!r}")
        else:
            rest.append(arg)
        i += 1
    return rest, value


def _accum_freq(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--accum-freq="):
            return arg.split("=", 1)[1]
        if arg == "--accum-freq" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def main(argv: list[str] | None = None) -> int:
    """Run ``open_clip_train.main.main(argv)`` with the fused loss (and, with
    ``--grad-cache-micro-batch B``, gradient-cached steps); returns an exit status (2: a usage
    error of the added flag)."""
    from .integrations import open_clip as integration

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv, micro_batch = _split_grad_cache(argv)
    except ValueError as exc:
        print(f"semcomp_ext.open_clip_train: error: {exc}", file=sys.stderr)
        return 2
    accum = _accum_freq(argv)
    if micro_batch is not None and accum not in (None, "1"):
        print(f"semcomp_ext.open_clip_train: error: {_FLAG} cannot be combined with --accum-freq {accum}",
              file=sys.stderr)
        return 2
    if {"-h", "--help"} & set(argv):
        print(f"semcomp_ext.open_clip_train: open_clip_train's arguments, and:\n{_HELP}\n", file=sys.stderr)
    with integration.patch(grad_cache_micro_batch=micro_batch):
        import open_clip

        try:
            from open_clip_train.main import main as train_main
        except ImportError as exc:
            print(
                "semcomp_ext.open_clip_train: open_clip's training package is missing a dependency "
                f"({exc}); install it with: pip install 'open-clip-torch[training]'",
                file=sys.stderr,
            )
            return 1
        if os.path.isdir(CONFIG_DIR):
            open_clip.add_model_config(CONFIG_DIR)
        if os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(argv):
            print("semcomp_ext.open_clip_train: the CLIP objective uses semcomp_ext.ClipLoss (fused)"
                  + (f"; gradient caching in micro-batches of {micro_batch}" if micro_batch else ""), file=sys.stderr)
        status = train_main(argv)
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
