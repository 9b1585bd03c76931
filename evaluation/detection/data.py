"""COCO 2017 in its original layout, read with pycocotools, and ViTDet's large-scale jitter.

    DATA_ROOT/train2017/*.jpg   DATA_ROOT/val2017/*.jpg
    DATA_ROOT/annotations/instances_train2017.json   DATA_ROOT/annotations/instances_val2017.json

COCO's category ids (1..90 with gaps) map to contiguous labels 1..K (0 is torchvision's background)
in the order of the annotation file's `categories`. Training (as torchvision's reference scripts)
drops crowd regions and boxes under one pixel, and leaves out images with no instance left; the
validation split keeps every image, since COCOeval scores them all. A box reaching outside its image is
clipped to it, and dropped when nothing of it is left (both splits, so COCOeval scores the same boxes);
`CocoSplit.box_faults` counts both, for the log and metrics.json.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from evaluation import files

SPLITS = ("train2017", "val2017")


def annotation_file(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}.json"


def check_files(root: str | os.PathLike, key: str = "detect.data_root") -> list[str]:
    """Raise FileNotFoundError naming the expected path of the first missing folder or annotation file,
    or the image files an annotation file names that are missing (their count and the first few), before
    anything is submitted: the loader would meet them hours in. Returns the paths checked."""
    checked = []
    for split in SPLITS:
        for path in (Path(root) / split, annotation_file(root, split)):
            if not path.exists():
                raise FileNotFoundError(f"{key}={root}: expected {path} (COCO 2017's original layout: "
                                        f"train2017/, val2017/, annotations/instances_{{train,val}}2017.json)")
            checked.append(str(path))
    for split in SPLITS:
        path = annotation_file(root, split)
        names, annotations = read_instances(path)
        images = [str(Path(root) / split / name) for name in names]
        gone = files.missing(images)
        if gone:
            raise FileNotFoundError(f"{key}={root}: {len(gone)} of the {len(images)} images named in "
                                    f"{path} are missing: {files.first_few(gone)}")
        if not annotations:  # training would draw from an empty set; COCOeval would score nothing
            raise ValueError(f"{key}={root}: {path} has no annotation ({len(images)} images, an empty "
                             "'annotations' list): nothing to train on or score")
    return checked


def read_instances(path: Path) -> tuple[list[str], list]:
    """The `file_name` of every entry of a COCO annotation file's `images`, and its `annotations`."""
    try:
        with open(path) as f:
            data = json.load(f)
        return [str(image["file_name"]) for image in data["images"]], list(data.get("annotations") or [])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None


def clip_boxes(coco) -> dict[str, int]:
    """Clip every annotation's bbox to its image in place, drop those with nothing inside; the counts."""
    kept, faults = [], {"clipped": 0, "dropped": 0}
    for a in coco.dataset.get("annotations", []):
        info = coco.imgs.get(a["image_id"])
        x, y, w, h = (float(v) for v in a["bbox"])
        if info is not None:
            W, H = float(info["width"]), float(info["height"])
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
            if x1 <= x0 or y1 <= y0:
                faults["dropped"] += 1
                continue
            if (x0, y0, x1, y1) != (x, y, x + w, y + h):
                faults["clipped"] += 1
                a["bbox"] = [x0, y0, x1 - x0, y1 - y0]
        kept.append(a)
    if faults["dropped"] or faults["clipped"]:
        coco.dataset["annotations"] = kept
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    return faults


def read_coco(root: str | os.PathLike, split: str):
    """pycocotools' COCO index of one split (its chatter on stdout silenced)."""
    from pycocotools.coco import COCO
    path = annotation_file(root, split)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a COCO instances file ({e})") from None


@dataclass
class Instances:
    """One image's training targets in pixels: boxes [N, 4] xyxy float32, labels [N] int64 (1..K),
    masks [N, H, W] uint8."""
    boxes: np.ndarray
    labels: np.ndarray
    masks: np.ndarray

    def as_target(self) -> dict[str, torch.Tensor]:
        return {"boxes": torch.from_numpy(self.boxes).float(), "labels": torch.from_numpy(self.labels).long(),
                "masks": torch.from_numpy(self.masks)}


class CocoSplit:
    """Images and instances of one split; `label_of[category id]` and `category_of[label]` map the ids."""

    def __init__(self, root: str | os.PathLike, split: str, train: bool):
        self.root, self.split = Path(root), split
        self.coco = read_coco(root, split)
        self.box_faults = clip_boxes(self.coco)
        cats = sorted(self.coco.getCatIds()) if not self.coco.dataset.get("categories") else \
            [c["id"] for c in self.coco.dataset["categories"]]
        self.category_of = {i + 1: c for i, c in enumerate(cats)}
        self.label_of = {c: i for i, c in self.category_of.items()}
        ids = sorted(self.coco.getImgIds())
        self.image_ids = [i for i in ids if self._annotations(i)] if train else ids

    @property
    def num_classes(self) -> int:
        """Categories plus the background."""
        return len(self.category_of) + 1

    def __len__(self) -> int:
        return len(self.image_ids)

    def _annotations(self, image_id: int) -> list[dict]:
        anns = self.coco.loadAnns(self.coco.getAnnIds(imgIds=image_id, iscrowd=False))
        return [a for a in anns if a["bbox"][2] > 1 and a["bbox"][3] > 1 and a["category_id"] in self.label_of
                and a.get("segmentation")]

    def path(self, image_id: int) -> Path:
        return self.root / self.split / self.coco.imgs[image_id]["file_name"]

    def image(self, image_id: int) -> Image.Image:
        path = self.path(image_id)
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise OSError(f"{path}: cannot read image ({e})") from None

    def instances(self, image_id: int) -> Instances:
        anns = self._annotations(image_id)
        info = self.coco.imgs[image_id]
        h, w = int(info["height"]), int(info["width"])
        if not anns:
            return Instances(np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros((0, h, w), np.uint8))
        boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)], np.float32)
        labels = np.array([self.label_of[a["category_id"]] for a in anns], np.int64)
        masks = np.stack([self.coco.annToMask(a) for a in anns]).astype(np.uint8)
        return Instances(boxes, labels, masks)


def large_scale_jitter(image: Image.Image, inst: Instances, size: int, scale_range: tuple[float, float],
                       rng: np.random.Generator, flip: bool = True,
                       fill: tuple[int, int, int] = (0, 0, 0)) -> tuple[Image.Image, Instances]:
    """ViTDet's LSJ: resize so that the longer side is `size` times a uniform random scale in
    `scale_range`, take a random `size` x `size` crop (or pad to it, with `fill`), flip horizontally
    with probability 1/2. Boxes are recomputed from what is left of the masks (ViTDet's
    `recompute_boxes`); instances with nothing left inside the crop are dropped."""
    w, h = image.size
    scale = size * rng.uniform(*scale_range) / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    x0 = int(rng.integers(0, nw - size + 1)) if nw > size else 0
    y0 = int(rng.integers(0, nh - size + 1)) if nh > size else 0
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(image.crop((x0, y0, x0 + min(size, nw), y0 + min(size, nh))), (0, 0))
    masks = np.zeros((len(inst.labels), size, size), np.uint8)
    for i, m in enumerate(inst.masks):
        resized = np.asarray(Image.fromarray(m * 255).resize((nw, nh), Image.NEAREST)) > 127
        crop = resized[y0:y0 + size, x0:x0 + size]
        masks[i, : crop.shape[0], : crop.shape[1]] = crop
    if flip and rng.random() < 0.5:
        canvas = canvas.transpose(Image.FLIP_LEFT_RIGHT)
        masks = masks[:, :, ::-1].copy()
    keep = masks.reshape(len(masks), -1).any(1)
    return canvas, Instances(mask_boxes(masks[keep]), inst.labels[keep], masks[keep])


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """[N, H, W] non-empty masks -> [N, 4] xyxy boxes enclosing their pixels."""
    boxes = np.zeros((len(masks), 4), np.float32)
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m.any(1))[0], np.nonzero(m.any(0))[0]
        boxes[i] = xs[0], ys[0], xs[-1] + 1, ys[-1] + 1
    return boxes


class TrainItems(torch.utils.data.Dataset):
    """Item k of the training stream: sample k of the epoch permutations (seeded by `seed`), with its
    own jitter drawn from (seed, k). A resumed run at step s reads items s * batch onward: the very
    images and augmentations an uninterrupted run would have seen."""

    def __init__(self, split: CocoSplit, size: int, scale_range, seed: int, mean: tuple[float, float, float]):
        self.split, self.size, self.scale_range, self.seed = split, size, tuple(scale_range), seed
        self.fill = tuple(int(round(255 * m)) for m in mean)  # pads normalise to 0, as ViTDet pads after normalising

    def __len__(self) -> int:  # the stream is unbounded; the sampler says which items
        return 2 ** 62

    def __getitem__(self, k: int):
        image_id = self.split.image_ids[stream_index(k, len(self.split), self.seed)]
        rng = np.random.default_rng([self.seed, k])
        image, inst = large_scale_jitter(self.split.image(image_id), self.split.instances(image_id), self.size,
                                         self.scale_range, rng, fill=self.fill)
        return to_tensor(image), inst.as_target()


def stream_index(k: int, n: int, seed: int) -> int:
    """Position in the split of stream item k: epoch k // n walks a permutation of its own."""
    epoch, i = divmod(k, n)
    return int(np.random.default_rng([seed, epoch, 7]).permutation(n)[i])


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.uint8).copy()).permute(2, 0, 1).float().div_(255)


def collate(batch):
    return tuple(zip(*batch))
