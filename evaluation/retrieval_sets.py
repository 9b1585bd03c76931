"""Readers for the retrieval benchmarks, each from its original on-disk layout and standard split.

`read(name, root)` -> `RetrievalSet`; `root` is the data set's own folder as extracted from its
archives (each reader's docstring lists the files it reads). Names: cub, cars, sop,
inshop, inat, vehicleid, gldv2. A set holds every test image once (`paths`, `labels`) and one or
more named `splits`, each a query/gallery protocol over those rows:

- single set (CUB, Cars196, SOP, iNat, and each VehicleID test list "800", "1600", "2400" as Patel
  et al. 2022): `gallery is None`, every image queries all the others of its split, itself left out;
- query/gallery (In-Shop);
- GLDv2 "public" and "private": test queries against the index, with `relevant` giving each
  query's correct index rows (from retrieval_solution_v2.1.csv); scored by mAP@100.
- SCQ's protocol (Wu et al. 2022): CIFAR-10 (`cifar10_scq`: 1,000 queries, 100 per class, against the
  other 59,000 images, mAP@1000, as the paper states it) and, as its code cazhang/sscq splits and scores them, FLICKR25K (2,000
  random queries, seeded as its scripts, against the rest) and NUS-WIDE (test.txt's 2,100 queries
  against database.txt), multi-label (`labels` [n, tags] 0/1: relevant = any shared tag), mAP@5000
  (`map_k`), codes trained on the database (`train`, the authors' num_train 'ALL').

Features are extracted once per set (for `paths`, in order) and every split is scored from them
(`evaluation.metrics.evaluate`). A missing list file raises FileNotFoundError naming the expected
path and where the data set is documented; `check_images(set)` names the listed images that are missing.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from evaluation import files


@dataclass
class Split:
    query: np.ndarray                     # int64 rows of RetrievalSet.paths used as queries
    gallery: np.ndarray | None = None     # rows searched; None: queries search each other, self excluded
    relevant: list[np.ndarray] | None = None  # GLDv2: per query, the rows of paths that are correct


@dataclass
class RetrievalSet:
    name: str
    paths: list[str]                      # image files; features are extracted in this order
    labels: np.ndarray                    # int64 class per image (-1 where the set has none: GLDv2); bool [n, tags] multi-label
    ks: tuple[int, ...]                   # the customary Recall@K
    splits: dict[str, Split] = field(default_factory=dict)  # "" when a set has a single protocol
    lists: tuple[str, ...] = ()           # the files that name the images (for messages)
    map_k: int | None = None              # SCQ's protocol: the K of its mAP@K (quantize scores it)
    train: np.ndarray | None = None       # SCQ's protocol: rows its codes are trained on (the database)

    def __len__(self) -> int:
        return len(self.paths)


# Where each set is documented; quoted in the error for a missing file.
SOURCES = {
    "cub": "https://www.vision.caltech.edu/datasets/cub_200_2011/ (CUB_200_2011.tgz)",
    "cars": "Stanford Cars 196, original release: car_ims.tgz + cars_annos.mat "
            "(https://ai.stanford.edu/~jkrause/cars/car_dataset.html)",
    "sop": "https://cvgl.stanford.edu/projects/lifted_struct/ (Stanford_Online_Products.zip)",
    "inshop": "https://mmlab.ie.cuhk.edu.hk/projects/DeepFashion/InShopRetrieval.html",
    "inat": "iNaturalist 2018 images (https://github.com/visipedia/inat_comp/tree/master/2018) with the "
            "retrieval lists of Brown et al. 2020 (https://github.com/Andrew-Brown1/Smooth_AP)",
    "vehicleid": "https://www.pkuml.org/resources/pku-vehicleid.html (VehicleID_V1.0)",
    "gldv2": "https://github.com/cvdfoundation/google-landmark (index/, test/, index.csv, "
             "retrieval_solution_v2.1.csv)",
    "flickr25k": "MIRFLICKR-25000 (https://press.liacs.nl/mirflickr/, images im1.jpg ... im25000.jpg) as the deep "
                 "hashing code SCQ's loader follows lays it out: images/, img.txt, targets.txt (24 tags), "
                 "cazhang/sscq dataset/flickr25k.py",
    "cifar10_scq": "CIFAR-10, python version (https://www.cs.toronto.edu/~kriz/cifar.html, cifar-10-python.tar.gz: "
                   "cifar-10-batches-py/data_batch_1..5, test_batch)",
    "nuswide": "NUS-WIDE (https://lms.comp.nus.edu.sg/wp-content/uploads/2019/research/nuswide/NUS-WIDE.html), "
               "21 most frequent concepts, as SCQ's loader reads it: database.txt, test.txt, train.txt "
               "('path t1 ... t21'), cazhang/sscq dataset/nuswide.py",
}
# SCQ's protocol: queries per set, the split seed of its scripts (run_flickr25k.sh --random_seed=2022), mAP@K.
FLICKR25K_QUERIES, SCQ_SPLIT_SEED, SCQ_MULTILABEL_K = 2000, 2022, 5000
CIFAR10_QUERIES_PER_CLASS, CIFAR10_K = 100, 1000
VEHICLEID_SIZES = (800, 1600, 2400)
GLDV2_USAGES = ("Public", "Private")


def _need(root: Path, rel: str, name: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise FileNotFoundError(f"{name}: expected {path}; see {SOURCES[name]}")
    return path


def _table(root: Path, rel: str, name: str, columns: int, skip: int = 0) -> list[list[str]]:
    """Whitespace-separated rows of a list file, `skip` header lines dropped, each row checked."""
    path = _need(root, rel, name)
    rows = []
    for number, line in enumerate(path.read_text().splitlines()[skip:], skip + 1):
        if line.strip():
            row = line.split()
            if len(row) < columns:
                raise ValueError(f"{name}: {path} line {number}: expected {columns} columns, got {line!r}")
            rows.append(row)
    return rows


def _rows(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def read_cub(root: Path) -> RetrievalSet:
    """CUB_200_2011/: images.txt ("id relpath"), image_class_labels.txt ("id class"), images/...;
    classes 101-200 are the test set."""
    names = {r[0]: r[1] for r in _table(root, "images.txt", "cub", 2)}
    labels = {r[0]: int(r[1]) for r in _table(root, "image_class_labels.txt", "cub", 2)}
    if set(names) != set(labels):
        raise ValueError(f"cub: {root / 'images.txt'} and {root / 'image_class_labels.txt'} list different image ids")
    ids = [i for i in names if labels[i] > 100]
    return RetrievalSet("cub", [str(root / "images" / names[i]) for i in ids],
                        np.array([labels[i] for i in ids], dtype=np.int64), (1, 2, 4, 8),
                        {"": Split(_rows(len(ids)))}, (str(root / "images.txt"),))


def read_cars(root: Path) -> RetrievalSet:
    """Cars196 (original release): cars_annos.mat (annotations: relative_im_path, class 1-196),
    car_ims/...; classes 99-196 are the test set."""
    from scipy.io import loadmat
    annos = loadmat(_need(root, "cars_annos.mat", "cars"), squeeze_me=True)["annotations"]
    annos = np.atleast_1d(annos)
    keep = [(str(a["relative_im_path"]), int(a["class"])) for a in annos if int(a["class"]) > 98]
    return RetrievalSet("cars", [str(root / p) for p, _ in keep],
                        np.array([c for _, c in keep], dtype=np.int64), (1, 2, 4, 8),
                        {"": Split(_rows(len(keep)))}, (str(root / "cars_annos.mat"),))


def read_sop(root: Path) -> RetrievalSet:
    """Stanford_Online_Products/: Ebay_test.txt ("image_id class_id super_class_id path", header line)."""
    rows = _table(root, "Ebay_test.txt", "sop", 4, skip=1)
    return RetrievalSet("sop", [str(root / r[3]) for r in rows],
                        np.array([int(r[1]) for r in rows], dtype=np.int64), (1, 10, 100, 1000),
                        {"": Split(_rows(len(rows)))}, (str(root / "Ebay_test.txt"),))


def read_inshop(root: Path) -> RetrievalSet:
    """In-Shop Clothes Retrieval: Eval/list_eval_partition.txt (count line, header line, then
    "image_name item_id evaluation_status"), images under Img/; query vs gallery by status."""
    rows = [r for r in _table(root, "Eval/list_eval_partition.txt", "inshop", 3, skip=2)
            if r[2] in ("query", "gallery")]
    status = np.array([r[2] for r in rows])
    items = {item: i for i, item in enumerate(sorted({r[1] for r in rows}))}
    return RetrievalSet("inshop", [str(root / "Img" / r[0]) for r in rows],
                        np.array([items[r[1]] for r in rows], dtype=np.int64), (1, 10, 20, 30, 40, 50),
                        {"": Split(np.flatnonzero(status == "query"), np.flatnonzero(status == "gallery"))},
                        (str(root / "Eval/list_eval_partition.txt"),))


def read_inat(root: Path) -> RetrievalSet:
    """iNaturalist 2018 with Brown et al.'s retrieval split: Inat_dataset_splits/Inaturalist_test_set1.txt
    lists image paths relative to root (train_val2018/SUPERCATEGORY/CLASS_ID/FILE.jpg); the class
    is the CLASS_ID folder."""
    listed = "Inat_dataset_splits/Inaturalist_test_set1.txt"
    paths = [r[0] for r in _table(root, listed, "inat", 1)]
    return RetrievalSet("inat", [str(root / p) for p in paths],
                        np.array([int(Path(p).parent.name) for p in paths], dtype=np.int64), (1, 4, 16, 32),
                        {"": Split(_rows(len(paths)))}, (str(root / listed),))


def read_vehicleid(root: Path) -> RetrievalSet:
    """VehicleID_V1.0/: train_test_split/test_list_{800,1600,2400}.txt ("image_name vehicle_id"),
    image/IMAGE_NAME.jpg. As Patel et al. 2022 ("Recall@k Surrogate Loss with Large Batches and
    Similarity Mixup"): per list, every image queries all the other images of that list (the query
    left out of its own gallery). Images in several lists are read once."""
    lists = {size: _table(root, f"train_test_split/test_list_{size}.txt", "vehicleid", 2)
             for size in VEHICLEID_SIZES}
    index: dict[str, int] = {}
    labels: list[int] = []
    for pairs in lists.values():
        for image, vehicle, *_ in pairs:
            if image not in index:
                index[image] = len(index)
                labels.append(int(vehicle))
    splits = {str(size): Split(np.array(list(dict.fromkeys(index[row[0]] for row in pairs)), dtype=np.int64))
              for size, pairs in lists.items()}
    return RetrievalSet("vehicleid", [str(root / "image" / f"{name}.jpg") for name in index],
                        np.array(labels, dtype=np.int64), (1, 5), splits,
                        tuple(str(root / f"train_test_split/test_list_{size}.txt") for size in lists))


def _gld_image(root: Path, folder: str, image_id: str) -> str:
    return str(root / folder / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")


def read_gldv2(root: Path) -> RetrievalSet:
    """GLDv2 retrieval: index.csv (column id), retrieval_solution_v2.1.csv (id, images, Usage), images
    index/a/b/c/abc....jpg and test/a/b/c/abc....jpg. Test images whose Usage is Public or Private
    are the queries of the "public" / "private" splits (Ignored ones are dropped)."""
    with open(_need(root, "index.csv", "gldv2"), newline="") as f:
        index_ids = [row["id"] for row in csv.DictReader(f)]
    with open(_need(root, "retrieval_solution_v2.1.csv", "gldv2"), newline="") as f:
        solution = [row for row in csv.DictReader(f) if row["Usage"] in GLDV2_USAGES]
    row_of = {image_id: i for i, image_id in enumerate(index_ids)}
    paths = [_gld_image(root, "index", i) for i in index_ids] + [_gld_image(root, "test", r["id"]) for r in solution]
    splits = {}
    for usage in GLDV2_USAGES:
        mine = [(len(index_ids) + j, r) for j, r in enumerate(solution) if r["Usage"] == usage]
        try:
            relevant = [np.array([row_of[i] for i in r["images"].split()], dtype=np.int64) for _, r in mine]
        except KeyError as e:
            raise ValueError(f"gldv2: {root / 'retrieval_solution_v2.1.csv'} names index image {e} "
                             f"that is not in {root / 'index.csv'}") from None
        splits[usage.lower()] = Split(np.array([q for q, _ in mine], dtype=np.int64),
                                      _rows(len(index_ids)), relevant)
    return RetrievalSet("gldv2", paths, np.full(len(paths), -1, dtype=np.int64), (), splits,
                        (str(root / "index.csv"), str(root / "retrieval_solution_v2.1.csv")))


def _tags(rows: list[list[str]], path: Path, name: str) -> np.ndarray:
    """0/1 tag columns of list rows -> bool [n, tags]; every row the same width."""
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise ValueError(f"{name}: {path} rows have {sorted(widths)} tag columns; expected one width")
    try:
        tags = np.array(rows, dtype=np.int64)
    except ValueError:
        raise ValueError(f"{name}: {path} holds a tag that is not 0 or 1") from None
    if not np.isin(tags, (0, 1)).all():
        raise ValueError(f"{name}: {path} holds a tag that is not 0 or 1")
    return tags.astype(bool)


def read_flickr25k(root: Path) -> RetrievalSet:
    """MIRFLICKR-25K as SCQ's loader reads it: img.txt (an image file name per line, under images/) and
    targets.txt (a row of 0/1 tags per image, same order). SCQ's split: numpy's legacy permutation seeded
    2022, its first 2,000 rows the queries, the rest the database (also the training set)."""
    names = [r[0] for r in _table(root, "img.txt", "flickr25k", 1)]
    tags_path = _need(root, "targets.txt", "flickr25k")
    tags = _tags(_table(root, "targets.txt", "flickr25k", 1), tags_path, "flickr25k")
    if len(tags) != len(names):
        raise ValueError(f"flickr25k: {root / 'img.txt'} names {len(names)} images, {tags_path} tags {len(tags)}")
    if len(names) <= FLICKR25K_QUERIES:
        raise ValueError(f"flickr25k: {root / 'img.txt'} names {len(names)} images; SCQ's protocol takes "
                         f"{FLICKR25K_QUERIES} queries and the rest as the database")
    order = np.random.RandomState(SCQ_SPLIT_SEED).permutation(len(names))  # as np.random.seed + permutation
    query, database = np.sort(order[:FLICKR25K_QUERIES]), np.sort(order[FLICKR25K_QUERIES:])
    return RetrievalSet("flickr25k", [str(root / "images" / n) for n in names], tags, (1,),
                        {"": Split(query, database)}, (str(root / "img.txt"), str(tags_path)),
                        SCQ_MULTILABEL_K, database)


def read_cifar10_scq(root: Path) -> RetrievalSet:
    """CIFAR-10's python release (cifar-10-batches-py/data_batch_1..5 and test_batch, pickled arrays; images are
    named FILE#ROW) as one pool of 60,000 images, split as SCQ's paper states its CIFAR-10 protocol: 1,000
    queries (100 per class, drawn with numpy's legacy generator seeded 2022, its scripts' seed), the other
    59,000 the database and the training set, mAP@1000."""
    paths, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = _need(root, f"cifar-10-batches-py/{name}", "cifar10_scq")
        batch_labels = files.read_cifar_batch(str(path))[1]
        paths += [f"{path}#{row}" for row in range(len(batch_labels))]
        labels += batch_labels
    labels = np.array(labels, dtype=np.int64)
    rng = np.random.RandomState(SCQ_SPLIT_SEED)
    query = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        if len(rows) <= CIFAR10_QUERIES_PER_CLASS:
            raise ValueError(f"cifar10_scq: class {c} has {len(rows)} images in {root / 'cifar-10-batches-py'}; "
                             f"SCQ's protocol takes {CIFAR10_QUERIES_PER_CLASS} queries of each class")
        query.append(rng.choice(rows, CIFAR10_QUERIES_PER_CLASS, replace=False))
    query = np.sort(np.concatenate(query))
    database = np.setdiff1d(_rows(len(labels)), query)
    return RetrievalSet("cifar10_scq", paths, labels, (1,), {"": Split(query, database)},
                        (str(root / "cifar-10-batches-py"),), CIFAR10_K, database)


def read_nuswide(root: Path) -> RetrievalSet:
    """NUS-WIDE (21 concepts) as SCQ's loader reads it: test.txt (the 2,100 queries) and database.txt (the
    database, also the training set), each line an image path under the set's folder and its 0/1 tags."""
    test, database = (_table(root, f, "nuswide", 2) for f in ("test.txt", "database.txt"))
    rows = test + database
    tags = _tags([r[1:] for r in rows], root / "database.txt", "nuswide")
    n_test = len(test)
    return RetrievalSet("nuswide", [str(root / r[0]) for r in rows], tags, (1,),
                        {"": Split(_rows(n_test), np.arange(n_test, len(rows), dtype=np.int64))},
                        (str(root / "test.txt"), str(root / "database.txt")), SCQ_MULTILABEL_K,
                        np.arange(n_test, len(rows), dtype=np.int64))


READERS = {"cub": read_cub, "cars": read_cars, "sop": read_sop, "inshop": read_inshop,
           "inat": read_inat, "vehicleid": read_vehicleid, "gldv2": read_gldv2,
           "cifar10_scq": read_cifar10_scq, "flickr25k": read_flickr25k, "nuswide": read_nuswide}


def read(name: str, root) -> RetrievalSet:
    """The test set of retrieval benchmark `name` (one of READERS) read from folder `root`."""
    if name not in READERS:
        raise ValueError(f"unknown retrieval set '{name}'; known: {', '.join(READERS)}")
    return READERS[name](Path(root))


@dataclass
class TrainSplit:
    """The training images of a set that has a train split (supervised fine-tuning), classes disjoint
    from the test set's as in the metric-learning protocol."""
    name: str
    paths: list[str]
    labels: np.ndarray                    # int64, the set's own class ids
    lists: tuple[str, ...] = ()


def _train_cub(root: Path) -> TrainSplit:
    """CUB: classes 1-100 of images.txt / image_class_labels.txt."""
    names = {r[0]: r[1] for r in _table(root, "images.txt", "cub", 2)}
    labels = {r[0]: int(r[1]) for r in _table(root, "image_class_labels.txt", "cub", 2)}
    ids = [i for i in names if i in labels and labels[i] <= 100]
    return TrainSplit("cub", [str(root / "images" / names[i]) for i in ids],
                      np.array([labels[i] for i in ids], dtype=np.int64), (str(root / "images.txt"),))


def _train_cars(root: Path) -> TrainSplit:
    """Cars196: classes 1-98 of cars_annos.mat."""
    from scipy.io import loadmat
    annos = np.atleast_1d(loadmat(_need(root, "cars_annos.mat", "cars"), squeeze_me=True)["annotations"])
    keep = [(str(a["relative_im_path"]), int(a["class"])) for a in annos if int(a["class"]) <= 98]
    return TrainSplit("cars", [str(root / p) for p, _ in keep], np.array([c for _, c in keep], dtype=np.int64),
                      (str(root / "cars_annos.mat"),))


def _train_sop(root: Path) -> TrainSplit:
    """SOP: Ebay_train.txt (the 11,318 training classes)."""
    rows = _table(root, "Ebay_train.txt", "sop", 4, skip=1)
    return TrainSplit("sop", [str(root / r[3]) for r in rows], np.array([int(r[1]) for r in rows], dtype=np.int64),
                      (str(root / "Ebay_train.txt"),))


def _train_inshop(root: Path) -> TrainSplit:
    """In-Shop: the rows of Eval/list_eval_partition.txt whose status is train (3,997 items)."""
    rows = [r for r in _table(root, "Eval/list_eval_partition.txt", "inshop", 3, skip=2) if r[2] == "train"]
    items = {item: i for i, item in enumerate(sorted({r[1] for r in rows}))}
    return TrainSplit("inshop", [str(root / "Img" / r[0]) for r in rows],
                      np.array([items[r[1]] for r in rows], dtype=np.int64),
                      (str(root / "Eval/list_eval_partition.txt"),))


def _train_inat(root: Path) -> TrainSplit:
    """iNaturalist 2018, Brown et al.'s Inat_dataset_splits/Inaturalist_train_set1.txt (5,690 classes)."""
    listed = "Inat_dataset_splits/Inaturalist_train_set1.txt"
    paths = [r[0] for r in _table(root, listed, "inat", 1)]
    return TrainSplit("inat", [str(root / p) for p in paths],
                      np.array([int(Path(p).parent.name) for p in paths], dtype=np.int64), (str(root / listed),))


# The sets with a train split: the five the Unicom paper fine-tunes on (Tab. 4).
TRAIN_READERS = {"cub": _train_cub, "cars": _train_cars, "sop": _train_sop, "inshop": _train_inshop,
                 "inat": _train_inat}


def read_train(name: str, root) -> TrainSplit:
    """The train split of retrieval set `name` (one of TRAIN_READERS) read from folder `root`."""
    if name not in TRAIN_READERS:
        raise ValueError(f"retrieval set '{name}' has no train split; fine-tuning knows {', '.join(TRAIN_READERS)}")
    split = TRAIN_READERS[name](Path(root))
    classes = len(np.unique(split.labels))
    if classes < 2:  # a margin softmax over one class (or none) has nothing to learn
        raise ValueError(f"retrieval set '{name}': the train split in {' and '.join(split.lists)} has "
                         f"{len(split.paths)} images of {classes} classes; fine-tuning needs at least 2")
    return split


def check_images(ds: RetrievalSet | TrainSplit) -> None:
    """Raise FileNotFoundError naming the set, its list files and the images they name that are
    missing (found by listing folders; nothing is decoded)."""
    gone = files.missing(ds.paths)
    if gone:
        raise FileNotFoundError(f"eval set '{ds.name}': {len(gone)} of the {len(ds.paths)} images named in "
                                f"{' and '.join(ds.lists)} are missing: {files.first_few(gone)}")
