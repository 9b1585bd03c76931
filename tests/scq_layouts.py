"""Replicas of the multi-label sets of SCQ's protocol (Wu et al. 2022) in the layouts its loader reads,
tiny images, for the reader and quantize tests. Each writer takes (data_root, tags bool [n, T]) and
returns the folder it wrote.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_flickr25k(data_root, tags: np.ndarray) -> Path:
    """MIRFLICKR-25K as cazhang/sscq's dataset/flickr25k.py reads it.

    Names and formats: `img.txt` (one image file name per line, read with strip()), `targets.txt` (one row of
    space-separated 0/1 integers per image, read with np.loadtxt) and the images under `images/` (the loader
    opens os.path.join(root, 'images', name)) come from sscq's flickr25k.py; the image names im1.jpg,
    im2.jpg, ... from the MIRFLICKR-25000 release (mirflickr25k.zip); 24 tag columns from the 24 concepts
    of the release's annotations (mirflickr25k_annotations_v080), as the hashing literature's targets.txt."""
    root = Path(data_root) / "flickr25k"
    names = [f"im{i + 1}.jpg" for i in range(len(tags))]
    for i, name in enumerate(names):
        _image(root / "images" / name, i)
    (root / "img.txt").write_text("".join(f"{n}\n" for n in names))
    np.savetxt(root / "targets.txt", tags.astype(int), fmt="%d")
    return root


def write_nuswide(data_root, tags: np.ndarray, n_test: int) -> Path:
    """NUS-WIDE (21 concepts) as cazhang/sscq's dataset/nuswide.py reads it.

    Names and formats: `test.txt` (the queries) and `database.txt` (the database, the training set by
    default; `train.txt` is its 10,500-image option), each line "relative/path.jpg t1 ... t21" split on
    whitespace, the path joined to the set's folder, come from sscq's nuswide.py; the 21 tag columns from
    the 21 most frequent concepts of the hashing protocol; image names <index>_<Flickr photo id>.jpg
    from the NUS-WIDE release's image archive (Flickr/<concept>/0001_2124494179.jpg style)."""
    root = Path(data_root) / "nuswide"
    lines = []
    for i, row in enumerate(tags):
        rel = f"images/{i:04d}_{2124494179 + 7 * i}.jpg"
        _image(root / rel, 10_000 + i)
        lines.append(rel + " " + " ".join(str(int(t)) for t in row) + "\n")
    (root / "test.txt").write_text("".join(lines[:n_test]))
    (root / "database.txt").write_text("".join(lines[n_test:]))
    (root / "train.txt").write_text("".join(lines[n_test:][:10_500]))
    return root
