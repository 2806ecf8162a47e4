"""``python -m semcomp_ext.open_clip_train [open_clip_train arguments]``: open_clip's own
training script (``open_clip_train.main``) with the fused :class:`semcomp_ext.ClipLoss` as its
CLIP loss (see :mod:`semcomp_ext.integrations.open_clip`). Every argument is open_clip's; the
run is the same as ``python -m open_clip_train.main ...`` except for the loss implementation.

semcomp_ext's small model configs (``semcomp-tiny``: 28 x 28 images, 2-layer towers) are
registered too, so ``--model semcomp-tiny --dataset-type synthetic`` runs on a CPU in seconds.
Distributed runs work as with open_clip: ``torchrun --nproc_per_node 4 -m semcomp_ext.open_clip_train ...``.
"""

from __future__ import annotations

import os
import sys

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "train", "model_configs")


def main(argv: list[str] | None = None) -> int:
    """Run ``open_clip_train.main.main(argv)`` with the fused loss; returns an exit status."""
    from .integrations import open_clip as integration

    argv = sys.argv[1:] if argv is None else list(argv)
    with integration.patch():
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
        if os.path.isdir(_CONFIG_DIR):
            open_clip.add_model_config(_CONFIG_DIR)
        if os.environ.get("RANK", "0") == "0" and not {"-h", "--help"} & set(argv):
            print("semcomp_ext.open_clip_train: the CLIP objective uses semcomp_ext.ClipLoss (fused)", file=sys.stderr)
        status = train_main(argv)
    return 0 if status in (None, 0) else 1


if __name__ == "__main__":
    sys.exit(main())
