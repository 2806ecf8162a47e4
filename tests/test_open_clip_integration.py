"""open_clip's training script with the fused ClipLoss (semcomp_ext.integrations.open_clip and
``python -m semcomp_ext.open_clip_train``).

The end-to-end test runs ``open_clip_train.main.main`` twice in one subprocess (its logging setup
and model registry are process-global): once as open_clip ships it, once through
``semcomp_ext.open_clip_train.main`` (the patch applied), on the same seeded image-caption CSV
(random-noise 28 x 28 PNGs, distinct captions: with identical samples, as in open_clip's
``--dataset-type synthetic``, every loss is exactly log N whatever the implementation, so that
data could not tell the two losses apart). The per-step losses are read from a forward hook on
the loss object at full precision, not from the rounded log lines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import open_clip  # noqa: E402  (a DEPS package)

import semcomp_ext  # noqa: E402
from semcomp_ext.integrations import open_clip as integration  # noqa: E402

STEPS = 4
BATCH = 16

_RUNNER = textwrap.dedent(
    """
    import json, sys
    import open_clip
    import open_clip_train.main as oc_main
    import semcomp_ext
    import semcomp_ext.open_clip_train as entry
    from semcomp_ext.integrations import open_clip as integration

    common, out_path = json.loads(sys.argv[1]), sys.argv[2]
    original_create_loss = oc_main.create_loss
    record = {}

    def run(label, fn, argv):
        losses, types = [], []

        def create_loss(args):  # wraps the create_loss open_clip_train.main calls
            loss = original_create_loss(args)
            types.append(type(loss).__module__ + "." + type(loss).__qualname__)
            loss.register_forward_hook(lambda m, i, out: losses.append(float(out["contrastive_loss"])))
            return loss

        oc_main.create_loss = create_loss
        try:
            status = fn(argv + ["--name", label])
        finally:
            oc_main.create_loss = original_create_loss
        record[label] = {"status": status, "losses": losses, "types": types,
                         "patched_after": integration.is_patched()}

    open_clip.add_model_config(entry.CONFIG_DIR)
    run("plain", oc_main.main, common)
    run("fused", entry.main, common)
    with open(out_path, "w") as f:
        json.dump(record, f)
    """
)


def _write_csv(tmp_path, n):
    from PIL import Image

    rng = np.random.default_rng(0)
    words = ["red", "green", "blue", "small", "large", "round", "square", "striped"]
    lines = ["filepath\ttitle"]
    for i in range(n):
        path = tmp_path / f"img{i:03d}.png"
        Image.fromarray((rng.random((28, 28, 3)) * 255).astype(np.uint8)).save(path)
        caption = f"a {words[i % 8]} {words[(i // 8) % 8]} picture number {i}"
        lines.append(f"{path}\t{caption}")
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join(lines) + "\n")
    return csv


@pytest.mark.slow
def test_open_clip_train_main_fused_loss_matches_open_clip(tmp_path):
    csv = _write_csv(tmp_path, STEPS * BATCH)
    common = [
        "--dataset-type", "csv", "--train-data", str(csv), "--csv-separator", "\t",
        "--model", "semcomp-tiny", "--precision", "fp32", "--device", "cpu",
        "--batch-size", str(BATCH), "--epochs", "1", "--workers", "0",
        "--lr", "1e-3", "--warmup", "1", "--seed", "0",
        "--logs", str(tmp_path / "logs"), "--save-frequency", "0", "--log-every-n-steps", "1",
    ]
    out = tmp_path / "record.json"
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(common), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.read_text())
    plain, fused = record["plain"], record["fused"]

    assert plain["status"] in (None, 0) and fused["status"] == 0
    # Which loss each run built: open_clip's in the plain run, the fused one through the entry.
    assert plain["types"] == ["open_clip.loss.ClipLoss"]
    assert fused["types"] == ["semcomp_ext.losses.ClipLoss"]
    assert not fused["patched_after"]  # the entry undoes its patch

    assert len(plain["losses"]) == len(fused["losses"]) == STEPS
    # The run trains (losses move), so equal losses after step 1 mean equal gradients.
    assert max(plain["losses"]) - min(plain["losses"]) > 1e-3
    np.testing.assert_allclose(fused["losses"], plain["losses"], rtol=0, atol=1e-5)


_GC_RUNNER = textwrap.dedent(
    """
    import json, sys
    import torch
    import open_clip
    import open_clip_train.main as oc_main
    import semcomp_ext.open_clip_train as entry
    from semcomp_ext.integrations import open_clip as integration

    common, out_path, precisions = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    original_create_loss, original_step = oc_main.create_loss, torch.optim.AdamW.step
    record, grads_of = {}, {}

    def run(label, argv):
        losses, grads = [], []

        def create_loss(args):
            loss = original_create_loss(args)
            loss.register_forward_hook(lambda m, i, out: losses.append(float(out["contrastive_loss"])))
            return loss

        def step(self, *a, **k):  # the gradients the optimizer steps with (unscaled under amp)
            grads.append(torch.cat([p.grad.reshape(-1) for g in self.param_groups for p in g["params"]
                                    if p.grad is not None]).clone())
            return original_step(self, *a, **k)

        oc_main.create_loss, torch.optim.AdamW.step = create_loss, step
        try:
            status = entry.main(argv + ["--name", label])
        finally:
            oc_main.create_loss, torch.optim.AdamW.step = original_create_loss, original_step
        grads_of[label] = grads
        record[label] = {"status": status, "losses": losses, "grad_max": [g.abs().max().item() for g in grads],
                         "patched_after": integration.is_patched()}

    def diff(a, b):
        return [(x - y).abs().max().item() for x, y in zip(grads_of[a], grads_of[b])]

    open_clip.add_model_config(entry.CONFIG_DIR)
    for prec in precisions:
        run(f"fused_{prec}", common + ["--precision", prec])
        run(f"cached_{prec}", common + ["--precision", prec, "--grad-cache-micro-batch", "5"])
        record[f"cached_{prec}"]["grad_diff"] = diff(f"cached_{prec}", f"fused_{prec}")
    with open(out_path, "w") as f:
        json.dump(record, f)
    """
)


@pytest.mark.slow
def test_open_clip_train_main_grad_cache_matches_uncached_fused_run(tmp_path):
    """``--grad-cache-micro-batch 5`` at batch 16 (micro-batches 5, 5, 5, 1) against the same
    run without it, both with the fused loss: fp32 step losses and the gradients the optimizer
    steps with equal to 1e-5 (relative to the largest gradient). --precision amp (fp16
    autocast and GradScaler, on the CPU): the scaler skips the same steps (it overflows at its
    initial scale on some batches) and the losses and gradients agree to fp16 rounding."""
    steps = 3
    csv = _write_csv(tmp_path, steps * BATCH)
    common = [
        "--dataset-type", "csv", "--train-data", str(csv), "--csv-separator", "\t",
        "--model", "semcomp-tiny", "--device", "cpu",
        "--batch-size", str(BATCH), "--epochs", "1", "--workers", "0",
        "--lr", "1e-3", "--warmup", "1", "--seed", "0",
        "--logs", str(tmp_path / "logs"), "--save-frequency", "0", "--log-every-n-steps", "1",
    ]
    out = tmp_path / "record.json"
    proc = subprocess.run(
        [sys.executable, "-c", _GC_RUNNER, json.dumps(common), str(out), json.dumps(["fp32", "amp"])],
        capture_output=True, text=True, timeout=500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gradient caching in micro-batches of 5" in proc.stderr
    rec = json.loads(out.read_text())
    for label, r in rec.items():
        assert r["status"] == 0 and not r["patched_after"], label
        assert len(r["losses"]) == steps, label
    assert len(rec["fused_fp32"]["grad_max"]) == len(rec["cached_fp32"]["grad_max"]) == steps
    fused, cached = rec["fused_fp32"], rec["cached_fp32"]
    assert max(fused["losses"]) - min(fused["losses"]) > 1e-2  # it trains
    np.testing.assert_allclose(cached["losses"], fused["losses"], rtol=0, atol=1e-5)
    for k, (d, scale) in enumerate(zip(cached["grad_diff"], fused["grad_max"])):
        assert d <= 1e-5 * max(1.0, scale), f"fp32 step {k}: gradient difference {d:.3g} (largest {scale:.3g})"
    fused_amp, cached_amp = rec["fused_amp"], rec["cached_amp"]
    assert len(cached_amp["grad_max"]) == len(fused_amp["grad_max"]) >= 1  # the same steps skipped
    np.testing.assert_allclose(cached_amp["losses"], fused_amp["losses"], rtol=0, atol=2e-3)
    for k, (d, scale) in enumerate(zip(cached_amp["grad_diff"], fused_amp["grad_max"])):
        assert d <= 5e-3 * max(1.0, scale), f"amp step {k}: gradient difference {d:.3g} (largest {scale:.3g})"


def _ddp_worker(rank, world, micro_batch):
    """2 gloo ranks: an open_clip model in DDP, GradCachedModel with the fused
    ClipLoss(local_loss=True, gather_with_grad=True); the averaged gradients against open_clip's
    own ClipLoss on the global batch in one process (fp32)."""
    import copy

    import open_clip
    import torch
    from open_clip import loss as oc_loss
    from torch.nn.parallel import DistributedDataParallel as DDP

    from semcomp_ext.integrations.open_clip import GradCachedModel
    from semcomp_ext.open_clip_train import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    model = open_clip.create_model("semcomp-tiny", output_dict=True)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2 * 6, 3, 28, 28, generator=g)
    texts = torch.randint(1, 2000, (2 * 6, 24), generator=g)

    out = ref(images, texts)
    want_loss = oc_loss.ClipLoss()(**out)
    want_loss.backward()

    cached = GradCachedModel(DDP(model), micro_batch)
    rows = slice(rank * 6, (rank + 1) * 6)
    model_out = cached(images[rows], texts[rows])
    loss = semcomp_ext.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(**model_out)
    cached.backward(loss)
    diffs = [(p.grad - q.grad).abs().max().item() for p, q in zip(model.parameters(), ref.parameters())
             if q.grad is not None]
    missing = sum(p.grad is None for p, q in zip(model.parameters(), ref.parameters()) if q.grad is not None)
    torch.distributed.all_reduce(loss.detach())
    return {"loss": loss.item() / world, "want_loss": want_loss.item(), "max_diff": max(diffs),
            "grad_max": max(q.grad.abs().max().item() for q in ref.parameters() if q.grad is not None),
            "missing": missing, "n": len(diffs)}


def test_grad_cached_model_on_two_gloo_ranks_matches_single_process():
    from semcomp_ext.distributed.launch import launch

    for res in launch(_ddp_worker, 2, (4,), timeout=150, pg_timeout=60):
        assert res["missing"] == 0 and res["n"] > 10
        assert abs(res["loss"] - res["want_loss"]) <= 1e-5
        assert res["max_diff"] <= 1e-5 * max(1.0, res["grad_max"]), res


def test_grad_cached_model_siglip_logit_bias_matches_plain_step():
    """A SigLIP-style open_clip model (learnable logit bias; fp64): GradCachedModel's output
    carries logit_scale and logit_bias with autograd, and the step's gradients (towers, scale,
    bias) equal the plain model(images, texts) step with the same SigLipLoss."""
    import torch

    from semcomp_ext.integrations.open_clip import GradCachedModel
    from semcomp_ext.open_clip_train import CONFIG_DIR

    open_clip.add_model_config(CONFIG_DIR)
    torch.manual_seed(0)
    model = open_clip.create_model("semcomp-tiny", output_dict=True, init_logit_bias=-10.0).double()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(7, 3, 28, 28, generator=g, dtype=torch.float64)
    texts = torch.randint(1, 2000, (7, 24), generator=g)
    loss_fn = semcomp_ext.SigLipLoss()

    want_loss = loss_fn(**model(images, texts))
    want_loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    cached = GradCachedModel(model, 3)
    out = cached(images, texts)
    assert set(out) == {"image_features", "text_features", "logit_scale", "logit_bias"}
    loss = loss_fn(**out)
    cached.backward(loss)
    assert abs(loss.item() - want_loss.item()) <= 1e-10
    for p, w in zip(model.parameters(), want):
        assert (p.grad - w).abs().max().item() <= 1e-10
    assert model.logit_bias.grad is not None and model.logit_bias.grad.abs().item() > 0
    with pytest.raises(RuntimeError, match="no cached forward"):
        cached.backward(loss)


def test_entry_rejects_bad_grad_cache_flag(capsys):
    import semcomp_ext.open_clip_train as entry

    assert entry.main(["--grad-cache-micro-batch", "0"]) == 2
    assert "--grad-cache-micro-batch must be an int >= 1, got '0'" in capsys.readouterr().err
    assert entry.main(["--grad-cache-micro-batch"]) == 2
    assert "needs a value" in capsys.readouterr().err
    assert entry.main(["--grad-cache-micro-batch=8", "--accum-freq", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot be combined with --accum-freq 2" in err and len(err.strip().splitlines()) == 1
    assert not integration.is_patched()


def test_patch_with_grad_cache_swaps_train_one_epoch_and_restores_it():
    import open_clip_train.main as oc_main

    original = oc_main.train_one_epoch
    with pytest.raises(ValueError, match="grad_cache_micro_batch must be an int >= 1"):
        integration.patch(grad_cache_micro_batch=0)
    assert not integration.is_patched()
    with integration.patch(grad_cache_micro_batch=64):
        assert oc_main.train_one_epoch is not original
        assert integration.grad_cache_micro_batch() == 64
        with integration.patch():
            assert integration.grad_cache_micro_batch() == 64  # the innermost value given
        with integration.patch(grad_cache_micro_batch=8):
            assert integration.grad_cache_micro_batch() == 8
        assert integration.grad_cache_micro_batch() == 64
    assert oc_main.train_one_epoch is original
    assert integration.grad_cache_micro_batch() is None


def _args(**kw):
    base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False, gather_with_grad=False,
                rank=0, world_size=1, horovod=False, coca_caption_loss_weight=2.0,
                coca_contrastive_loss_weight=1.0, loss_dist_impl=None)
    base.update(kw)
    return argparse.Namespace(**base)


def test_patch_builds_fused_loss_for_clip_only():
    from open_clip import loss as oc_loss

    assert type(open_clip.create_loss(_args())) is oc_loss.ClipLoss
    with integration.patch():
        assert integration.is_patched()
        clip = open_clip.create_loss(_args(local_loss=True, gather_with_grad=True, rank=1, world_size=2))
        assert type(clip) is semcomp_ext.ClipLoss
        assert (clip.local_loss, clip.gather_with_grad, clip.rank, clip.world_size) == (True, True, 1, 2)
        # Other objectives keep open_clip's classes.
        assert type(open_clip.create_loss(_args(siglip=True))) is oc_loss.SigLipLoss
        assert type(open_clip.create_loss(_args(model="coca_ViT-B-32"))) is oc_loss.CoCaLoss
        assert type(open_clip.create_loss(_args(distill=True))) is oc_loss.DistillClipLoss
        assert open_clip.ClipLoss is oc_loss.ClipLoss  # the public class is untouched
        with pytest.raises(ValueError, match="use_horovod"):
            open_clip.create_loss(_args(horovod=True))
    assert not integration.is_patched()
    assert type(open_clip.create_loss(_args())) is oc_loss.ClipLoss


def test_patch_nests_and_unpatch_checks():
    from open_clip import loss as oc_loss

    integration.patch()
    try:
        with integration.patch():
            pass
        assert type(open_clip.create_loss(_args())) is semcomp_ext.ClipLoss  # outer patch still on
    finally:
        integration.unpatch()
    assert type(open_clip.create_loss(_args())) is oc_loss.ClipLoss
    with pytest.raises(RuntimeError, match="not patched"):
        integration.unpatch()


def test_patched_loss_equals_open_clip_loss():
    import torch
    from open_clip import loss as oc_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(24, 32, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(24, 32, generator=g, dtype=torch.float64), dim=-1)
    scale = torch.tensor(14.3, dtype=torch.float64)
    with integration.patch():
        fused = open_clip.create_loss(_args())
    ref = oc_loss.ClipLoss()(img, txt, scale, output_dict=True)["contrastive_loss"]
    got = fused(img, txt, scale, output_dict=True)["contrastive_loss"]
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
