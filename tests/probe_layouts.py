"""Writers of tiny linear-probe data sets in each set's original on-disk layout, filled with
scikit-learn's bundled digits (real handwritten images), for the probe-set and eval-job tests.

Each writer takes (data_root, images uint8 [n, 32, 32, 3], labels [n]) and returns, per split
it fixes itself, the row numbers of the images it put there ({"train": rows, "val": rows or None,
"test": rows}); sets whose split the reader draws (caltech101, eurosat) return {"all": rows}.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch
from scipy.io import savemat
from evaluation.demo_sets import class_names, digit_images, save_image, write_eurosat  # noqa: F401 (re-exported)


def _split3(n: int) -> dict[str, np.ndarray]:
    rows = np.arange(n)
    return {"train": rows[rows % 3 == 0], "val": rows[rows % 3 == 1], "test": rows[rows % 3 == 2]}


def _split2(n: int) -> dict[str, np.ndarray]:
    rows = np.arange(n)
    return {"train": rows[rows % 2 == 0], "val": None, "test": rows[rows % 2 == 1]}


def write_cifar10(data_root, x, y, folder="cifar10/cifar-10-batches-py", files=None, key="labels",
                  meta=("batches.meta", "label_names")):
    base = Path(data_root) / folder
    base.mkdir(parents=True, exist_ok=True)
    split = _split2(len(x))
    flat = x.transpose(0, 3, 1, 2).reshape(len(x), -1)  # CIFAR rows: 1024 R, 1024 G, 1024 B
    train_files = files or [f"data_batch_{i}" for i in range(1, 6)]
    parts = np.array_split(split["train"], len(train_files))
    for name, rows in list(zip(train_files, parts)) + [("test_batch" if files is None else "test", split["test"])]:
        with open(base / name, "wb") as f:
            pickle.dump({"data": flat[rows], key: y[rows].tolist()}, f)
    with open(base / meta[0], "wb") as f:
        pickle.dump({meta[1]: class_names(y)}, f)
    return split


def write_cifar100(data_root, x, y):
    return write_cifar10(data_root, x, y, folder="cifar100/cifar-100-python", files=["train"],
                         key="fine_labels", meta=("meta", "fine_label_names"))


def write_caltech101(data_root, x, y):
    """101_ObjectCategories/<class>/image_000K.jpg; the last class is written as BACKGROUND_Google, a
    class in CLIP's protocol (torchvision's Caltech101 drops it)."""
    base = Path(data_root) / "caltech101" / "101_ObjectCategories"
    for c, name in enumerate(class_names(y)[:-1] + ["BACKGROUND_Google"]):
        for k, row in enumerate(np.flatnonzero(y == c), 1):
            save_image(base / name / f"image_{k:04d}.jpg", x[row])
    return {"all": np.arange(len(x))}


def write_stanford_cars(data_root, x, y):
    base = Path(data_root) / "stanford_cars"
    split = _split2(len(x))
    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array(class_names(y), dtype=object)})
    for part, folder, mat in (("train", "cars_train", base / "devkit" / "cars_train_annos.mat"),
                              ("test", "cars_test", base / "cars_test_annos_withlabels.mat")):
        annos = np.zeros(len(split[part]), dtype=[("fname", object), ("class", object)])
        for i, row in enumerate(split[part]):
            annos[i] = (f"{row:05d}.jpg", np.uint8(y[row] + 1))
            save_image(base / folder / f"{row:05d}.jpg", x[row])
        savemat(mat, {"annotations": annos})
    return split


def write_flowers102(data_root, x, y):
    base = Path(data_root) / "flowers102" / "flowers-102"
    split = _split3(len(x))
    for row in range(len(x)):
        save_image(base / "jpg" / f"image_{row + 1:05d}.jpg", x[row])
    savemat(base / "imagelabels.mat", {"labels": (y + 1).astype(np.uint8)[None]})
    savemat(base / "setid.mat", {k: (split[s] + 1)[None] for k, s in
                                 (("trnid", "train"), ("valid", "val"), ("tstid", "test"))})
    return split


def write_food101(data_root, x, y):
    base = Path(data_root) / "food101" / "food-101"
    split = _split2(len(x))
    names = class_names(y)
    for part in ("train", "test"):
        meta: dict[str, list[str]] = {}
        for row in split[part]:
            meta.setdefault(names[y[row]], []).append(f"{names[y[row]]}/{row}")
            save_image(base / "images" / names[y[row]] / f"{row}.jpg", x[row])
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{part}.json").write_text(json.dumps(meta))
    return split


def write_birdsnap(data_root, x, y):
    base = Path(data_root) / "birdsnap"
    split = _split2(len(x))
    names = class_names(y)
    base.mkdir(parents=True)
    (base / "species.txt").write_text("id\tcommon\tscientific\tdir\n" + "".join(
        f"{c + 1}\t{n}\tDigitus {n}\t{n}\n" for c, n in enumerate(names)))
    rows = ["url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2"]
    for row in range(len(x)):
        rows.append(f"http://example.invalid/{row}.jpg\t0\t{names[y[row]]}/{row}.jpg\t{y[row] + 1}\t0\t0\t31\t31")
        save_image(base / "download" / "images" / names[y[row]] / f"{row}.jpg", x[row])
    # Listed but never downloaded (dead Flickr link): the reader skips and counts it.
    rows.append(f"http://example.invalid/gone.jpg\t0\t{names[0]}/gone.jpg\t1\t0\t0\t31\t31")
    (base / "images.txt").write_text("\n".join(rows) + "\n")
    (base / "test_images.txt").write_text("path\n" + "".join(
        f"{names[y[row]]}/{row}.jpg\n" for row in split["test"]) + f"{names[0]}/gone.jpg\n")
    return split


def write_sun397(data_root, x, y):
    base = Path(data_root) / "sun397"
    split = _split2(len(x))
    names = [f"{n[0]}/{n}" for n in class_names(y)]  # SUN397 keeps /d/digit0/ (first letter, name)
    (base / "SUN397").mkdir(parents=True)
    (base / "SUN397" / "ClassName.txt").write_text("".join(f"/{n}\n" for n in names))
    (base / "Partitions").mkdir()
    for part, file in (("train", "Training_01.txt"), ("test", "Testing_01.txt")):
        lines = [f"/{names[y[row]]}/sun_{row:06d}.jpg" for row in split[part]]
        (base / "Partitions" / file).write_text("\n".join(lines) + "\n")
    for row in range(len(x)):
        save_image(base / "SUN397" / names[y[row]] / f"sun_{row:06d}.jpg", x[row])
    return split


def write_dtd(data_root, x, y):
    base = Path(data_root) / "dtd" / "dtd"
    split = _split3(len(x))
    names = class_names(y)
    (base / "labels").mkdir(parents=True)
    for part in ("train", "val", "test"):
        lines = [f"{names[y[row]]}/{names[y[row]]}_{row:04d}.jpg" for row in split[part]]
        (base / "labels" / f"{part}1.txt").write_text("\n".join(lines) + "\n")
        (base / "labels" / f"{part}2.txt").write_text("")  # other partitions exist but are not read
    for row in range(len(x)):
        save_image(base / "images" / names[y[row]] / f"{names[y[row]]}_{row:04d}.jpg", x[row])
    return split


def write_fgvc_aircraft(data_root, x, y):
    base = Path(data_root) / "fgvc_aircraft" / "fgvc-aircraft-2013b" / "data"
    split = _split3(len(x))
    names = [f"7{c}7-{c}00" for c in range(int(y.max()) + 1)]  # variant names hold spaces/dashes
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("".join(f"{n}\n" for n in names))
    for part in ("train", "val", "test"):
        (base / f"images_variant_{part}.txt").write_text("".join(
            f"{1000000 + row} {names[y[row]]}\n" for row in split[part]))
    for row in range(len(x)):
        save_image(base / "images" / f"{1000000 + row}.jpg", x[row])
    return split


def write_pets(data_root, x, y):
    base = Path(data_root) / "pets" / "oxford-iiit-pet"
    split = _split2(len(x))
    names = [f"breed_{c}" if c % 2 else f"Breed_{c}" for c in range(int(y.max()) + 1)]  # cats upper case
    (base / "annotations").mkdir(parents=True)
    for part, file in (("train", "trainval.txt"), ("test", "test.txt")):
        (base / "annotations" / file).write_text("".join(
            f"{names[y[row]]}_{row} {y[row] + 1} {1 + (y[row] % 2)} 1\n" for row in split[part]))
    for row in range(len(x)):
        save_image(base / "images" / f"{names[y[row]]}_{row}.jpg", x[row])
    return split


def write_imagenet(data_root, x, y):
    base = Path(data_root) / "imagenet"
    split = _split2(len(x))
    wnids = [f"n{c:08d}" for c in range(int(y.max()) + 1)]
    base.mkdir(parents=True)
    torch.save(({w: (f"digit {c}", f"numeral {c}") for c, w in enumerate(wnids)},
                [wnids[y[row]] for row in split["test"]]), base / "meta.bin")
    for row in split["train"]:
        save_image(base / "train" / wnids[y[row]] / f"{wnids[y[row]]}_{row}.JPEG", x[row])
    for i, row in enumerate(split["test"], 1):  # val image i belongs to meta.bin's i-th val wnid
        save_image(base / "val" / wnids[y[row]] / f"ILSVRC2012_val_{i:08d}.JPEG", x[row])
    return split


WRITERS = {
    "cifar10": write_cifar10, "cifar100": write_cifar100, "caltech101": write_caltech101,
    "stanford_cars": write_stanford_cars, "flowers102": write_flowers102, "food101": write_food101,
    "birdsnap": write_birdsnap, "sun397": write_sun397, "dtd": write_dtd,
    "fgvc_aircraft": write_fgvc_aircraft, "pets": write_pets, "eurosat": write_eurosat,
    "imagenet": write_imagenet,
}
