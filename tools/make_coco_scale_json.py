#!/usr/bin/env python3
"""Write a COCO-size instances json (synthetic) for measuring the data path at COCO scale.

By default 118,287 images and 860,001 polygon instances of 80 categories, as COCO 2017
train; what is drawn, roughly as in COCO:

- image sizes: longer side 640 (97 %) or 300-639; 3 in 4 landscape; short / long side
  3:4 (45 %), 2:3 (25 %), 9:16 (6 %), 1:1 (4 %), else uniform in 0.5-1;
- instances per image: 0 for 0.9 % of the images, else 1 + a negative binomial (mean
  7.27 over all images, long-tailed), at most 93, then adjusted to the exact total;
- categories: Zipf-like (the first, "person"-like, about a quarter of the instances);
- object size: sqrt(area) log-normal (about 4 in 10 small, < 32 px), box aspect log-normal;
- polygons: 1 per instance (1 in 10: 2 parts), vertex count log-normal (median 16, 3-400),
  points on a noisy ellipse in the box, coordinates with 2 decimals.

Images are not stored per entry: every entry of a size names one shared JPEG of that size
(``images/<W>x<H>.jpg``, a few hundred small files), enough for the loader's first batches.

Example::

    python tools/make_coco_scale_json.py --out output/coco_scale            # full size
    python tools/make_coco_scale_json.py --out output/coco5k --images 5000  # instances scale
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

COCO_IMAGES, COCO_INSTANCES = 118_287, 860_001


def _sizes(rng, n):
    longer = np.where(rng.random(n) < 0.97, 640, rng.integers(300, 640, n))
    ratio = rng.choice([0.75, 2 / 3, 0.5625, 1.0, -1.0], n, p=[0.45, 0.25, 0.06, 0.04, 0.20])
    ratio = np.where(ratio < 0, rng.uniform(0.5, 1.0, n), ratio)
    shorter = np.maximum(1, np.round(longer * ratio)).astype(int)
    landscape = rng.random(n) < 0.75
    return np.where(landscape, longer, shorter), np.where(landscape, shorter, longer)


def _counts(rng, n, total):
    # ~0.9 % empty images (COCO: 1,021), the others 1 + a long-tailed negative binomial
    mean, r = total / n / 0.991 - 1, 1.5
    counts = np.where(rng.random(n) < 0.009, 0,
                      np.minimum(1 + rng.negative_binomial(r, r / (r + mean), n), 93))
    while counts.sum() != total:  # exact total: +-1 on random images
        diff = total - counts.sum()
        idx = rng.integers(0, n, abs(diff))
        np.add.at(counts, idx, 1 if diff > 0 else -1)
        counts = np.clip(counts, 0, 93)
    return counts


def _polygon(rng, x0, y0, w, h, vertices):
    t = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    rad = rng.uniform(0.7, 1.0, vertices)
    xs = x0 + w / 2 * (1 + rad * np.cos(t))
    ys = y0 + h / 2 * (1 + rad * np.sin(t))
    return np.round(np.stack([xs, ys], 1).ravel(), 2).tolist()


def make(num_images: int, num_instances: int, seed: int = 0) -> dict:
    """The json as a dict (see the module docstring for what is drawn)."""
    rng = np.random.default_rng(seed)
    widths, heights = _sizes(rng, num_images)
    counts = _counts(rng, num_images, num_instances)
    weights = 1.0 / np.arange(1, 81) ** 1.1
    weights[0] *= 3
    weights /= weights.sum()
    images = [{"id": i + 1, "file_name": f"{w}x{h}.jpg", "width": int(w), "height": int(h)}
              for i, (w, h) in enumerate(zip(widths, heights))]
    annotations = []
    image_of = np.repeat(np.arange(num_images), counts)
    cats = rng.choice(80, num_instances, p=weights) + 1
    side = np.exp(rng.normal(np.log(45), 1.0, num_instances))
    aspect = np.exp(rng.normal(0, 0.5, num_instances))
    vertices = np.clip(np.round(np.exp(rng.normal(np.log(16), 0.6, num_instances))), 3, 400)
    parts = np.where(rng.random(num_instances) < 0.1, 2, 1)
    for k in range(num_instances):
        i = image_of[k]
        W, H = int(widths[i]), int(heights[i])
        w = float(min(W - 1, max(2.0, side[k] * aspect[k])))
        h = float(min(H - 1, max(2.0, side[k] / aspect[k])))
        x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
        segm = [_polygon(rng, x0 + j * w / 2, y0, w / parts[k], h, int(vertices[k]))
                for j in range(parts[k])]
        xs = [v for poly in segm for v in poly[0::2]]
        ys = [v for poly in segm for v in poly[1::2]]
        box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
        annotations.append({"id": k + 1, "image_id": int(i) + 1, "category_id": int(cats[k]),
                            "iscrowd": 0, "area": round(box[2] * box[3] * 0.8, 2),
                            "bbox": [round(v, 2) for v in box], "segmentation": segm})
    categories = [{"id": c, "name": f"class_{c}", "supercategory": "thing"} for c in range(1, 81)]
    return {"info": {"description": "synthetic COCO-size instances (make_coco_scale_json.py)"},
            "images": images, "annotations": annotations, "categories": categories}


def write(out_dir: str, num_images: int = COCO_IMAGES, num_instances: int = COCO_INSTANCES,
          seed: int = 0) -> str:
    """Write ``out_dir/annotations.json`` and ``out_dir/images/<W>x<H>.jpg``; returns the json
    path. Instances default to COCO's per-image rate when only ``num_images`` is smaller."""
    from PIL import Image

    data = make(num_images, num_instances, seed)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in sorted({im["file_name"] for im in data["images"]}):
        path = os.path.join(out_dir, "images", name)
        if not os.path.exists(path):
            w, h = map(int, name[:-4].split("x"))
            pixels = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((w, h)).save(path, quality=60)
    json_path = os.path.join(out_dir, "annotations.json")
    with open(json_path, "w") as f:
        json.dump(data, f, separators=(",", ":"))
    return json_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--images", type=int, default=COCO_IMAGES)
    parser.add_argument("--instances", type=int, default=None,
                        help=f"default: {COCO_INSTANCES} x images / {COCO_IMAGES}")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.images <= 0:
        print("ERROR: --images must be > 0", file=sys.stderr)
        return 2
    instances = args.instances if args.instances is not None else round(
        COCO_INSTANCES * args.images / COCO_IMAGES)
    print(write(args.out, args.images, instances, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
