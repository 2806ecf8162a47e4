"""Fabricated MSCOCO / Flickr30k folders in the exact released formats (tiny JPEGs)."""

import json
import os


def _jpeg(path, shade):
    from PIL import Image

    Image.new("RGB", (40, 30), (shade, 255 - shade, (3 * shade) % 256)).save(path)


def make_coco(root, n_train=6, n_val=3, caps=2):
    os.makedirs(os.path.join(root, "annotations"))
    ann_id = 100
    for split, n in (("train2017", n_train), ("val2017", n_val)):
        os.makedirs(os.path.join(root, split))
        images, anns = [], []
        for k in range(n):
            iid = 1000 + 7 * k  # non-contiguous ids, like the real files
            name = f"{iid:012d}.jpg"
            _jpeg(os.path.join(root, split, name), 20 * k)
            images.append({"id": iid, "file_name": name, "height": 30, "width": 40})
            for c in range(caps):
                anns.append({"image_id": iid, "id": ann_id, "caption": f" photo {k} of split {split}, caption {c} "})
                ann_id += 1
        anns.reverse()  # the loader must not rely on file order
        with open(os.path.join(root, "annotations", f"captions_{split}.json"), "w") as f:
            json.dump({"info": {}, "licenses": [], "images": images, "annotations": anns}, f)
    return root


def make_flickr_karpathy(root, n=5, caps=5):
    os.makedirs(os.path.join(root, "flickr30k_images"))
    images = []
    for k in range(n):
        name = f"{10000 + k}.jpg"
        _jpeg(os.path.join(root, "flickr30k_images", name), 30 * k)
        split = "test" if k == n - 1 else ("val" if k == n - 2 else "train")
        images.append({"filename": name, "imgid": k, "split": split,
                       "sentences": [{"raw": f"A dog number {k} runs ({c}).", "tokens": []} for c in range(caps)]})
    with open(os.path.join(root, "dataset_flickr30k.json"), "w") as f:
        json.dump({"images": images, "dataset": "flickr30k"}, f)
    return root


def make_flickr_csv(root, n=10, caps=5):
    os.makedirs(os.path.join(root, "flickr30k_images"))
    with open(os.path.join(root, "results.csv"), "w", newline="") as f:
        f.write("image_name| comment_number| comment\n")
        for k in range(n):
            name = f"{20000 + k}.jpg"
            _jpeg(os.path.join(root, "flickr30k_images", name), 20 * k)
            for c in range(caps):
                f.write(f"{name}| {c}| Two people | one with a hat {k}-{c} .\n")
    return root
