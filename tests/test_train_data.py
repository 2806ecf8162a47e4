"""Pair loaders: the embedded digits and fabricated COCO / Flickr30k folders."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from train_fixtures import make_coco, make_flickr_csv, make_flickr_karpathy  # noqa: E402

from semcomp_ext.train.data import PairDataset, load_coco, load_digit_pairs, load_flickr30k, load_pairs  # noqa: E402


def _to_tensor(im):
    import numpy as np

    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)


def test_coco_one_caption_per_image(tmp_path):
    tr, te = load_coco(str(make_coco(tmp_path / "coco")))
    assert (len(tr), len(te)) == (6, 3)
    assert tr.concepts.tolist() == list(range(6))
    assert tr.captions[0] == "photo 0 of split train2017, caption 0"  # stripped, first by annotation id
    assert all(os.path.isfile(p) for p in tr.images + te.images)
    assert not tr.has_labels


def test_coco_all_captions_and_dataset(tmp_path):
    tr, te = load_coco(str(make_coco(tmp_path / "coco", caps=3)), captions_per_image=None)
    assert len(tr) == 18 and tr.concepts.tolist() == [k for k in range(6) for _ in range(3)]
    assert tr.images[0] == tr.images[2] != tr.images[3]
    ds = PairDataset(te, lambda caps: torch.tensor([[len(c)] for c in caps]), transform=_to_tensor)
    img, tok = ds[4]
    assert img.shape == (3, 30, 40) and tok.tolist() == [len(te.captions[4])]


def test_coco_missing_annotations(tmp_path):
    with pytest.raises(FileNotFoundError, match="captions_train2017.json"):
        load_coco(str(tmp_path))


def test_flickr_karpathy_split(tmp_path):
    tr, te = load_flickr30k(str(make_flickr_karpathy(tmp_path / "f")), captions_per_image=None)
    assert len(tr) == 4 * 5 and len(te) == 5  # 'val' folds into train
    assert te.captions[0] == "A dog number 4 runs (0)."
    assert set(te.concepts.tolist()) == {0} and tr.concepts.max() == 3


def test_flickr_results_csv(tmp_path):
    tr, te = load_flickr30k(str(make_flickr_csv(tmp_path / "f")), test_fraction=0.2)
    assert (len(tr), len(te)) == (8, 2)  # one caption per image by default
    assert tr.captions[0] == "Two people | one with a hat 0-0 ."  # '|' inside a caption survives
    assert te.images[-1].endswith("20009.jpg")
    tr5, _ = load_flickr30k(str(tmp_path / "f"), captions_per_image=None, test_fraction=0.2)
    assert len(tr5) == 40


def test_pairs_need_root():
    with pytest.raises(ValueError, match="data-root"):
        load_pairs("coco")


def test_digit_pairs_fixed_split_and_captions():
    tr, te = load_digit_pairs("digits")
    tr2, te2 = load_digit_pairs("digits")
    assert len(tr) + len(te) == 1797 and abs(len(te) - 359) <= 1
    assert tr.captions == tr2.captions and torch.equal(te.labels, te2.labels)
    assert tr.images.shape[1:] == (3, 28, 28)
    assert set(tr.labels.tolist()) == set(range(10)) and tr.has_labels
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    named = [any(w in c or str(y) in c for w in (words[y],)) for c, y in zip(tr.captions, tr.labels.tolist())]
    # most captions name the digit; some describe only the instance
    assert 0.6 < sum(named) / len(named) < 0.9
    assert len(set(tr.captions)) > 30
