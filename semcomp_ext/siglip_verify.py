"""A worker that checks the distributed :class:`semcomp_ext.SigLipLoss` inside real processes
(run it with :func:`semcomp_ext.distributed.launch.launch`; used by tests/test_siglip.py).

Every rank builds the same global batch from a seed and takes its slice; it runs open_clip's
``SigLipLoss`` and semcomp's on the same slice, for every ``dist_impl`` and both backward modes,
with a per-rank upstream gradient (g_r = 1 + r/2, so that gradients routed back to the wrong
rank would show). Returns plain numbers: max abs differences of the loss and of the gradients
of image features, text features, logit_scale and logit_bias, plus the loss, so that the sum
over ranks can be compared with a single-process reference on the global batch.
"""

from __future__ import annotations

import torch

from .distributed.neighbour import DIST_IMPLS
from .distributed.verify import make_data as make_clip_data

BACKWARDS = ("auto", "recompute")


def make_data(world, n, d, dtype, seed=0):
    """The distributed checks' embeddings (same generator stream), with a scale and a bias."""
    (img, txt), _ = make_clip_data(world, n, d, dtype, seed)
    return img, txt, torch.tensor(3.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)


def _run(loss_mod, img, txt, s, t, upstream):
    xs = [x.clone().requires_grad_(True) for x in (img, txt, s, t)]
    loss = loss_mod(*xs)
    (loss * upstream).backward()
    return [loss.detach()] + [x.grad for x in xs]


def open_clip_siglip_class():
    """open_clip's ``SigLipLoss``, from its loss module alone: ``open_clip/loss.py`` needs only
    torch, and loading it by path skips the package's model and torchvision imports (seconds
    per spawned rank)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss_only", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module.SigLipLoss


def siglip_parity_worker(rank, world, n, d):
    import semcomp_ext

    oc_loss = open_clip_siglip_class()
    out = {}
    for dtype in (torch.float64, torch.float32):
        img, txt, s, t = make_data(world, n, d, dtype)
        mine = slice(rank * n, (rank + 1) * n)
        upstream = 1.0 + 0.5 * rank
        for impl in DIST_IMPLS:
            ref = _run(oc_loss(rank=rank, world_size=world, dist_impl=impl), img[mine], txt[mine], s, t, upstream)
            for bw in BACKWARDS:
                got = _run(semcomp_ext.SigLipLoss(rank=rank, world_size=world, dist_impl=impl, backward=bw),
                           img[mine], txt[mine], s, t, upstream)
                out[f"{str(dtype)[6:]}/{impl}/{bw}"] = {
                    what: float((x.double() - y.double()).abs().max())
                    for what, x, y in zip(("loss", "grad_image", "grad_text", "grad_scale", "grad_bias"), got, ref)
                }
                out[f"{str(dtype)[6:]}/{impl}/{bw}"]["value"] = float(got[0])
    return out
