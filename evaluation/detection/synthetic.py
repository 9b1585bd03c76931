"""A small COCO-format detection set for tests and the demo: discs, squares and triangles of random
colours and sizes on textured backgrounds, with polygon masks, in COCO 2017's layout
(train2017/, val2017/, annotations/instances_{train,val}2017.json).

    python -m evaluation.detection.synthetic --out data/demo_coco [--train 96 --val 24 --size 160]

Shapes never overlap, so each polygon is exactly its instance's visible mask. Category ids are
1, 3 and 7 (COCO's ids have gaps too). A DEMO_SET.txt marker says what the set really is.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unicom_ds.atomic import atomic_path, write_json_atomic, write_text_atomic

CATEGORIES = ({"id": 1, "name": "disc", "supercategory": "shape"},
              {"id": 3, "name": "square", "supercategory": "shape"},
              {"id": 7, "name": "triangle", "supercategory": "shape"})
MARKER = "DEMO_SET.txt"


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Smooth colour gradient plus stripes and noise: texture the detector must learn to ignore."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 215, 3)
    tilt = rng.uniform(-60, 60, (2, 3))
    angle, freq = rng.uniform(0, math.pi), rng.uniform(8, 30)
    stripes = 18 * np.sin(freq * (np.cos(angle) * xx + np.sin(angle) * yy) * 2 * math.pi)
    img = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1] + stripes[..., None] \
        + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    n = {"disc": 32, "square": 4, "triangle": 3}[kind]
    return [(cx + r * math.cos(rot + 2 * math.pi * i / n), cy + r * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def render(rng: np.random.Generator, size: int, max_shapes: int = 3) -> tuple[Image.Image, list[dict]]:
    """One image and its instances [{category_id, polygon}], shapes placed without overlap."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    shapes = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(20):
            r = rng.uniform(0.1, 0.22) * size
            cx, cy = rng.uniform(r, size - r, 2)
            if all(math.hypot(cx - x, cy - y) > r + pr + 2 for x, y, pr in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        cat = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        poly = _polygon(cat["name"], cx, cy, r, rng.uniform(0, 2 * math.pi))
        draw.polygon(poly, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        shapes.append({"category_id": cat["id"], "polygon": poly})
    return image, shapes


def _annotation(ann_id: int, image_id: int, shape: dict, size: int) -> dict:
    from pycocotools import mask as mask_utils
    flat = [round(v, 2) for xy in shape["polygon"] for v in xy]
    xs, ys = flat[0::2], flat[1::2]
    x, y = min(xs), min(ys)
    return {"id": ann_id, "image_id": image_id, "category_id": shape["category_id"], "segmentation": [flat],
            "bbox": [x, y, max(xs) - x, max(ys) - y], "iscrowd": 0,
            "area": float(mask_utils.area(mask_utils.frPyObjects([flat], size, size))[0])}


def write_split(out: Path, split: str, n: int, size: int, seed: int) -> Path:
    """Write n images and their instances_<split>.json; returns the annotation file."""
    rng = np.random.default_rng(seed)
    folder = out / split
    folder.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(n):
        image, shapes = render(rng, size)
        name = f"{i:012d}.jpg"
        with atomic_path(folder / name) as tmp:
            image.save(tmp, format="JPEG", quality=92)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        anns += [_annotation(len(anns) + j + 1, i + 1, s, size) for j, s in enumerate(shapes)]
    path = out / "annotations" / f"instances_{split}.json"
    write_json_atomic(path, {"images": images, "annotations": anns, "categories": list(CATEGORIES),
                             "info": {"description": "unicom-ds synthetic shapes"}, "licenses": []})
    return path


def write(out: str | Path, train: int = 96, val: int = 24, size: int = 160, seed: int = 0) -> Path:
    out = Path(out)
    write_split(out, "train2017", train, size, seed)
    write_split(out, "val2017", val, size, seed + 1)
    write_text_atomic(out / MARKER, "rendered discs, squares and triangles on textured backgrounds "
                                    f"({train} train / {val} val images of {size} px), not COCO\n")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=96)
    ap.add_argument("--val", type=int, default=24)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    print(f"wrote {write(a.out, a.train, a.val, a.size, a.seed)}")


if __name__ == "__main__":
    main()
