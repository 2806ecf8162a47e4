"""Embeddings of a trained run, written in the layout `semcomp compress` and `semcomp eval` read:
OUT/embeddings/SPLIT/img_emb.npy and text_emb.npy (float32, L2-normalised, row i = pair i of
the split) and labels.npy where the dataset has class labels."""

from __future__ import annotations

import os

import numpy as np
import torch

from .data import PairDataset, load_pairs
from .loop import CHECKPOINT, TrainConfig, build_model, load_checkpoint
from .models import embed, image_size

__all__ = ["SPLITS", "export_dir", "export_embeddings"]

SPLITS = ("train", "test")


def export_dir(out_dir: str, split: str) -> str:
    return os.path.join(out_dir, "embeddings", split)


def _trained_model(cfg: TrainConfig, train_data):
    """The model of cfg.out_dir's checkpoint, rebuilt on the CPU (for runs trained in other
    processes, whose model this process never held)."""
    model, preprocess, tokenizer = build_model(cfg, train_data, check_widths=False)
    model.load_state_dict(load_checkpoint(os.path.join(cfg.out_dir, CHECKPOINT))["model"])
    return model, preprocess, tokenizer


def export_embeddings(cfg: TrainConfig, split: str, summary: dict | None = None) -> dict:
    """Embed every pair of `split` ("train" or "test") and write the files (atomically).
    `summary` is `train(cfg)`'s result when this process trained the model; without it the
    model is loaded from the run's checkpoint. Returns {folder, rows, dim, files}."""
    from ..compress.atomic import atomic_file

    if split not in SPLITS:
        raise ValueError(f"--export-embeddings must be one of {', '.join(SPLITS)}, got {split!r}")
    train_data, test_data = load_pairs(cfg.dataset, cfg.data_root, cfg.limit)
    if summary is not None and summary.get("model") is not None:
        model, preprocess, tokenizer = summary["model"], summary["preprocess"], summary["tokenizer"]
    else:
        model, preprocess, tokenizer = _trained_model(cfg, train_data)
    data = train_data if split == "train" else test_data
    model = model.to("cpu")
    with torch.random.fork_rng():  # embedding is deterministic; keep the caller's RNG untouched
        img, txt = embed(model, PairDataset(data, tokenizer, preprocess, image_size(model)))
    arrays = {"img_emb.npy": img.numpy().astype(np.float32), "text_emb.npy": txt.numpy().astype(np.float32)}
    if data.has_labels:
        arrays["labels.npy"] = data.labels.numpy().astype(np.int64)
    folder = export_dir(cfg.out_dir, split)
    os.makedirs(folder, exist_ok=True)
    for name, arr in arrays.items():
        with atomic_file(os.path.join(folder, name)) as f:
            np.save(f, arr, allow_pickle=False)
    return {"folder": folder, "split": split, "rows": int(img.shape[0]), "dim": int(img.shape[1]),
            "files": sorted(arrays)}
