"""The 13 linear-probe data sets of CLIP's Tab. 10 / Unicom's Tab. 1, read from their original layouts.

Each set lives in `<eval.data_root>/<name>` (names and the files expected inside are in SETS).
torchvision's classes read them with download off; where torchvision's own folder already carries
the set's name (dtd, stanford_cars, eurosat) it is given `eval.data_root`, so no folder is nested
twice. Birdsnap has its own reader; Caltech101 is read as a folder of class folders, so that
BACKGROUND_Google stays a class as in CLIP's 102 (torchvision's reader drops it). Splits follow CLIP's Tab. 9:
the official val split where there is one (flowers102, dtd partition 1, fgvc_aircraft), otherwise
val is None and the probe holds out part of train. ImageNet's val serves as test.

torchvision checks the md5 of CIFAR's and Flowers' files against the download archive; those checks
are switched off here: `check()` reports missing files by name up front, and it spares re-hashing.
`check_images(probe_set, data_root)` names missing images without decoding any: those the split
files name, and for the sets read from class folders (Caltech101, EuroSAT, ImageNet), those the
release holds, so that no set is silently scored on fewer images.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import datasets as tvd

from evaluation import files
from unicom_ds import safe_pickle


class Split(torch.utils.data.Dataset):
    """Items `indices` of a torchvision-style data set: the transformed images, with their labels and
    file names known without decoding anything (the feature cache fingerprints `paths`)."""

    def __init__(self, base: Any, indices: Sequence[int], labels: Sequence[int]):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)[self.indices]
        names = _item_names(base)
        self.paths = [names[i] for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.base[int(self.indices[i])][0]


def _item_names(ds: Any) -> list[str]:
    """One name per item of a torchvision data set: its image file, or file#row for CIFAR's arrays."""
    if isinstance(ds, tvd.CIFAR10):
        files = [f for f, _ in (ds.train_list if ds.train else ds.test_list)]
        return [f"{Path(ds.root) / ds.base_folder / '+'.join(files)}#{i}" for i in range(len(ds))]
    if isinstance(ds, tvd.StanfordCars):
        return [p for p, _ in ds._samples]
    if isinstance(ds, tvd.ImageFolder):  # Caltech101, EuroSAT, ImageNet
        return [p for p, _ in ds.samples]
    if isinstance(ds, tvd.OxfordIIITPet):
        return [str(p) for p in ds._images]
    # Flowers102, Food101, SUN397, DTD, FGVCAircraft, Birdsnap
    return [str(p) for p in (ds.files if isinstance(ds, Birdsnap) else ds._image_files)]


@dataclass
class ProbeSet:
    name: str
    train: Split
    val: Split | None
    test: Split
    metric: str          # "top1" or "mean_per_class", as CLIP reports the set (its Tab. 9)
    num_classes: int     # distinct labels over all splits


class RGB:
    """Convert to RGB before the model's transform: Caltech101 and others hold grayscale images."""

    def __init__(self, transform: Callable | None):
        self.transform = transform

    def __call__(self, image: Image.Image):
        image = image.convert("RGB")
        return self.transform(image) if self.transform is not None else image


def _whole(ds, labels) -> Split:
    return Split(ds, np.arange(len(labels)), labels)


def _seeded_split(labels: np.ndarray, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Consecutive parts of one seeded permutation, sized by `fractions` of all items."""
    order = np.random.default_rng(seed).permutation(len(labels))
    bounds = np.cumsum([0] + [int(round(f * len(labels))) for f in fractions])
    return [np.sort(order[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _per_class_split(labels: np.ndarray, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_train` seeded images of each class for train, the rest for test (CLIP's Caltech101 split)."""
    rng = np.random.default_rng(seed)
    train = [rng.permutation(np.flatnonzero(labels == c))[:n_train] for c in np.unique(labels)]
    train_idx = np.sort(np.concatenate(train))
    return train_idx, np.setdiff1d(np.arange(len(labels)), train_idx)


class _SafeCifar:
    """torchvision's CIFAR readers, with their batches and meta file read by unicom_ds.safe_pickle: torchvision's
    own plain pickle.load would run whatever a planted data_batch_N names."""

    def __init__(self, root, train: bool = True, transform=None):
        tvd.VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        if not self._check_integrity():
            raise RuntimeError(f"{os.path.join(self.root, self.base_folder)}: files missing")
        folder = os.path.join(self.root, self.base_folder)
        entries = [safe_pickle.load(os.path.join(folder, name), encoding="latin1")
                   for name, _ in (self.train_list if train else self.test_list)]
        self.data = np.vstack([e["data"] for e in entries]).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [t for e in entries for t in (e["labels"] if "labels" in e else e["fine_labels"])]
        self.classes = safe_pickle.load(os.path.join(folder, self.meta["filename"]), encoding="latin1")[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _CIFAR10(_SafeCifar, tvd.CIFAR10):
    train_list = [[f, None] for f, _ in tvd.CIFAR10.train_list]
    test_list = [[f, None] for f, _ in tvd.CIFAR10.test_list]
    meta = {**tvd.CIFAR10.meta, "md5": None}


class _CIFAR100(_SafeCifar, tvd.CIFAR100):
    train_list = [[f, None] for f, _ in tvd.CIFAR100.train_list]
    test_list = [[f, None] for f, _ in tvd.CIFAR100.test_list]
    meta = {**tvd.CIFAR100.meta, "md5": None}


class _Flowers102(tvd.Flowers102):
    _file_dict = {k: (f, None) for k, (f, _) in tvd.Flowers102._file_dict.items()}


def _cifar(cls):
    def build(root: Path, tf, seed: int):
        train, test = cls(root, train=True, transform=tf), cls(root, train=False, transform=tf)
        return _whole(train, train.targets), None, _whole(test, test.targets)
    return build


def _caltech101(root: Path, tf, seed: int):
    # CLIP's 102 classes: the 101 object categories and BACKGROUND_Google, which torchvision's
    # Caltech101 drops; ImageFolder keeps every class folder (and reads only image files).
    ds = tvd.ImageFolder(str(root / "101_ObjectCategories"), transform=tf)
    labels = np.asarray(ds.targets)
    train_idx, test_idx = _per_class_split(labels, 30, seed)
    return Split(ds, train_idx, labels), None, Split(ds, test_idx, labels)


def _official_splits(cls, splits: tuple[str, ...], labels_of: Callable, **kw):
    """A torchvision class's own split files: `splits` is (train, val, test) or (train, test)."""
    def build(root: Path, tf, seed: int):
        parts = [cls(root, split=s, transform=tf, **kw) for s in splits]
        out = [_whole(p, labels) for p, labels in zip(parts, labels_of(parts))]
        return tuple(out) if len(out) == 3 else (out[0], None, out[1])
    return build


def _attr(name: str) -> Callable:
    return lambda parts: [getattr(p, name) for p in parts]


def _by_class_name(parts) -> list[list[int]]:
    """DTD and Food101 number the classes within each split file: renumber by name over all splits,
    so a class missing from one split cannot shift the labels of another."""
    index = {c: i for i, c in enumerate(sorted({c for p in parts for c in p.classes}))}
    return [[index[p.classes[label]] for label in p._labels] for p in parts]


def _sun397(root: Path, tf, seed: int):
    ds = tvd.SUN397(root, transform=tf)
    # Partition 1 of the official lists (Partitions.zip), 50 train / 50 test per class as in CLIP.
    where = {"/" + p.relative_to(ds._data_dir).as_posix(): i for i, p in enumerate(ds._image_files)}
    parts = []
    for name in ("Training_01.txt", "Testing_01.txt"):
        lines = [line.strip() for line in open(root / "Partitions" / name) if line.strip()]
        missing = [line for line in lines if line not in where]
        if missing:
            raise FileNotFoundError(f"{root / 'Partitions' / name} lists {missing[0]}, which is not under "
                                    f"{ds._data_dir} ({len(missing)} missing)")
        parts.append([where[line] for line in lines])
    return Split(ds, parts[0], ds._labels), None, Split(ds, parts[1], ds._labels)


def _eurosat(root: Path, tf, seed: int):
    ds = tvd.EuroSAT(root, transform=tf)
    # CLIP's Tab. 9: 10,000 train / 5,000 test images drawn from the 27,000 (same fractions here).
    train_idx, test_idx = _seeded_split(np.asarray(ds.targets), (10 / 27, 5 / 27), seed)
    return Split(ds, train_idx, ds.targets), None, Split(ds, test_idx, ds.targets)


def _imagenet(root: Path, tf, seed: int):
    train, val = tvd.ImageNet(root, split="train", transform=tf), tvd.ImageNet(root, split="val", transform=tf)
    return _whole(train, train.targets), None, _whole(val, val.targets)


class Birdsnap(torch.utils.data.Dataset):
    """Birdsnap v1.1: species.txt, images.txt, test_images.txt and the images that
    get_birdsnap.py fetched into download/images/. Images that could not be fetched are skipped
    and counted in `missing` (CLIP's Tab. 9 counts only the downloadable ones)."""

    def __init__(self, root: Path, transform: Callable | None = None):
        self.root, self.transform = Path(root), transform
        species = _read_tsv(self.root / "species.txt")
        self.classes = [row["common"] for row in species]
        index = {int(row["id"]): i for i, row in enumerate(species)}
        test_paths = {line.strip() for line in list(open(self.root / "test_images.txt"))[1:] if line.strip()}
        self.files, self.targets, self.is_test, self.missing = [], [], [], 0
        for row in _read_tsv(self.root / "images.txt"):
            path = self.root / "download" / "images" / row["path"]
            if not path.is_file():
                self.missing += 1
                continue
            self.files.append(path)
            self.targets.append(index[int(row["species_id"])])
            self.is_test.append(row["path"] in test_paths)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = Image.open(self.files[i])
        return (self.transform(image) if self.transform else image), self.targets[i]


def _read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        rows = [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]
    for key in ("id", "common") if path.name == "species.txt" else ("path", "species_id"):
        if key not in header:
            raise ValueError(f"{path}: no '{key}' column in the header {header}")
    return rows


def _birdsnap(root: Path, tf, seed: int):
    ds = Birdsnap(root, transform=tf)
    is_test = np.asarray(ds.is_test, dtype=bool)
    train, test = np.flatnonzero(~is_test), np.flatnonzero(is_test)
    return Split(ds, train, ds.targets), None, Split(ds, test, ds.targets)


# Images per class of the EuroSAT RGB release (27,000), whose files are CLASS/CLASS_1.jpg ... CLASS_N.jpg.
EUROSAT_RELEASE = {"AnnualCrop": 3000, "Forest": 3000, "HerbaceousVegetation": 3000, "Highway": 2500,
                   "Industrial": 2500, "Pasture": 2000, "PermanentCrop": 2500, "Residential": 3000,
                   "River": 2500, "SeaLake": 3000}
IMAGENET_CLASSES, IMAGENET_TRAIN_IMAGES = 1000, 1_281_167  # ILSVRC2012 train
_NUMBER = re.compile(r"_(\d+)\.jpg$")


def _numbered_gaps(ds: tvd.ImageFolder, root: Path, file_name: Callable[[str, int], str],
                   release: dict[str, int], skip: tuple[str, ...] = ()) -> list[str]:
    """Images missing from class folders whose files are numbered 1..N (`file_name(class, i)`): N is
    the release's count of the class where `release` has it, else the highest number present. Once
    any release class is present, all of them are expected."""
    names: dict[str, set[str]] = {c: set() for c in ds.classes}
    if names.keys() & release.keys():
        names.update({c: set() for c in release.keys() - names.keys()})
    for path, label in ds.samples:
        names[ds.classes[label]].add(os.path.basename(path))
    gone = []
    for c in sorted(names.keys() - set(skip)):
        n = release.get(c, max((int(m.group(1)) for f in names[c] if (m := _NUMBER.search(f))), default=0))
        gone += [str(root / c / file_name(c, i)) for i in range(1, n + 1) if file_name(c, i) not in names[c]]
    return gone


def _eurosat_gaps(ps: ProbeSet, root: Path) -> tuple[list[str], str]:
    gone = _numbered_gaps(ps.train.base, root / "2750", lambda c, i: f"{c}_{i}.jpg", EUROSAT_RELEASE)
    return gone, (f"each class folder of {root / '2750'} numbers its files CLASS_1.jpg to CLASS_N.jpg; "
                  f"the EuroSAT RGB release holds {sum(EUROSAT_RELEASE.values()):,}")


def _caltech101_gaps(ps: ProbeSet, root: Path) -> tuple[list[str], str]:
    # torchvision's own reader relies on the 1..N numbering of the object classes; it never reads
    # BACKGROUND_Google, whose numbering is therefore left unchecked.
    gone = _numbered_gaps(ps.train.base, root / "101_ObjectCategories", lambda c, i: f"image_{i:04d}.jpg", {},
                          skip=("BACKGROUND_Google",))
    return gone, f"each object class of {root / '101_ObjectCategories'} numbers its files image_0001.jpg to N"


def _imagenet_gaps(ps: ProbeSet, root: Path) -> tuple[list[str], str]:
    wnid_to_classes, val_wnids = tvd.imagenet.load_meta_file(str(root))
    val = {(Path(p).parent.name, Path(p).name) for p, _ in ps.test.base.samples}
    names = [(w, f"ILSVRC2012_val_{i:08d}.JPEG") for i, w in enumerate(val_wnids, 1)]
    gone = [str(root / "val" / w / f) for w, f in names if (w, f) not in val]
    if len(wnid_to_classes) == IMAGENET_CLASSES and len(ps.train) < IMAGENET_TRAIN_IMAGES:
        gone.append(f"{IMAGENET_TRAIN_IMAGES - len(ps.train):,} of the {IMAGENET_TRAIN_IMAGES:,} ILSVRC2012 "
                    f"train images (no list names them; {len(ps.train):,} are under {root / 'train'})")
    return gone, f"{root / 'meta.bin'} lists {len(val_wnids):,} val images, val/WNID/ILSVRC2012_val_N.JPEG"


@dataclass(frozen=True)
class Spec:
    build: Callable          # (torchvision root, transform, seed) -> (train, val or None, test)
    metric: str
    files: tuple[str, ...]   # what check() requires, relative to <data_root>/<name>
    source: str              # where the set is documented / obtained
    nested: bool = False     # torchvision appends the set's own name: give it <data_root>
    listed: bool = True      # the split files name image files (False: arrays, or class folders)
    # Class-folder sets: (ProbeSet, <data_root>/<name>) -> (missing images, the rule that finds them).
    gaps: Callable[[ProbeSet, Path], tuple[list[str], str]] | None = None


SETS: dict[str, Spec] = {
    "cifar10": Spec(_cifar(_CIFAR10), "top1",
                    tuple(f"cifar-10-batches-py/{f}" for f in
                          [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]),
                    "https://www.cs.toronto.edu/~kriz/cifar.html (python version)", listed=False),
    "cifar100": Spec(_cifar(_CIFAR100), "top1",
                     ("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"),
                     "https://www.cs.toronto.edu/~kriz/cifar.html (python version)", listed=False),
    "caltech101": Spec(_caltech101, "mean_per_class", ("101_ObjectCategories/BACKGROUND_Google",),
                       "https://data.caltech.edu/records/mzrjq-6wc02 (101_ObjectCategories.tar.gz)",
                       listed=False, gaps=_caltech101_gaps),
    "stanford_cars": Spec(_official_splits(tvd.StanfordCars, ("train", "test"),
                                           lambda parts: [[t for _, t in p._samples] for p in parts]), "top1",
                          ("devkit/cars_meta.mat", "devkit/cars_train_annos.mat",
                           "cars_test_annos_withlabels.mat", "cars_train", "cars_test"),
                          "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (torchvision StanfordCars)",
                          nested=True),
    "flowers102": Spec(_official_splits(_Flowers102, ("train", "val", "test"), _attr("_labels")), "mean_per_class",
                       ("flowers-102/jpg", "flowers-102/imagelabels.mat", "flowers-102/setid.mat"),
                       "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"),
    "food101": Spec(_official_splits(tvd.Food101, ("train", "test"), _by_class_name), "top1",
                    ("food-101/images", "food-101/meta/train.json", "food-101/meta/test.json"),
                    "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/"),
    "birdsnap": Spec(_birdsnap, "top1", ("species.txt", "images.txt", "test_images.txt", "download/images"),
                     "https://thomasberg.org/datasets/birdsnap/1.1/birdsnap.tgz + get_birdsnap.py"),
    "sun397": Spec(_sun397, "top1", ("SUN397/ClassName.txt", "Partitions/Training_01.txt",
                                     "Partitions/Testing_01.txt"),
                   "https://vision.princeton.edu/projects/2010/SUN/ (SUN397.tar.gz, Partitions.zip)"),
    "dtd": Spec(_official_splits(tvd.DTD, ("train", "val", "test"), _by_class_name, partition=1), "top1",
                ("dtd/images", "dtd/labels/train1.txt", "dtd/labels/val1.txt", "dtd/labels/test1.txt"),
                "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz)", nested=True),
    "fgvc_aircraft": Spec(_official_splits(tvd.FGVCAircraft, ("train", "val", "test"), _attr("_labels"),
                                          annotation_level="variant"),
                          "mean_per_class",
                          ("fgvc-aircraft-2013b/data/images", "fgvc-aircraft-2013b/data/variants.txt",
                           *(f"fgvc-aircraft-2013b/data/images_variant_{s}.txt" for s in ("train", "val", "test"))),
                          "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/"),
    "pets": Spec(_official_splits(tvd.OxfordIIITPet, ("trainval", "test"), _attr("_labels")), "mean_per_class",
                 ("oxford-iiit-pet/images", "oxford-iiit-pet/annotations/trainval.txt",
                  "oxford-iiit-pet/annotations/test.txt"),
                 "https://www.robots.ox.ac.uk/~vgg/data/pets/"),
    "eurosat": Spec(_eurosat, "top1", ("2750",), "https://github.com/phelber/eurosat (EuroSAT RGB)", nested=True,
                    listed=False, gaps=_eurosat_gaps),
    "imagenet": Spec(_imagenet, "top1", ("meta.bin", "train", "val"),
                     "https://image-net.org/challenges/LSVRC/2012/ (prepared by torchvision.datasets.ImageNet)",
                     listed=False, gaps=_imagenet_gaps),
}


def folder(name: str, data_root: str | os.PathLike) -> Path:
    return Path(data_root) / name


def check(name: str, data_root: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming the first expected path of set `name` that is missing."""
    if name not in SETS:
        raise KeyError(f"unknown linear-probe set {name!r}; known: {', '.join(SETS)}")
    root = folder(name, data_root)
    for rel in SETS[name].files:
        if not (root / rel).exists():
            raise FileNotFoundError(f"linear-probe set '{name}': expected {root / rel} "
                                    f"(original layout of {SETS[name].source})")


def load(name: str, data_root: str | os.PathLike, transform: Callable | None = None, seed: int = 0) -> ProbeSet:
    """The train / val (or None) / test splits of probe set `name`; images pass through `transform`."""
    check(name, data_root)
    spec = SETS[name]
    tv_root = Path(data_root) if spec.nested else folder(name, data_root)
    train, val, test = spec.build(tv_root, RGB(transform), seed)
    labels = np.concatenate([s.labels for s in (train, val, test) if s is not None])
    return ProbeSet(name, train, val, test, spec.metric, len(np.unique(labels)))


def check_images(ps: ProbeSet, data_root: str | os.PathLike) -> None:
    """Raise FileNotFoundError naming the set and its missing images (found by listing folders,
    nothing decoded): those its split files name, or for class-folder sets those its release holds."""
    spec, root = SETS[ps.name], folder(ps.name, data_root)
    if spec.listed:
        paths = [p for split in (ps.train, ps.val, ps.test) if split is not None for p in split.paths]
        gone = files.missing(paths)
        rule = f"named in the split files under {root}"
    elif spec.gaps is not None:
        gone, rule = spec.gaps(ps, root)
    else:
        return
    if gone:
        raise FileNotFoundError(f"eval set '{ps.name}': {len(gone)} image(s) missing ({rule}): {files.first_few(gone)}")
