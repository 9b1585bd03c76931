"""The 13 probe-set readers on tiny fixtures in each set's original layout (digits as images)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from evaluation import probe_sets
from probe_layouts import WRITERS, digit_images

FIXED_SPLITS = [n for n in WRITERS if n not in ("caltech101", "eurosat")]
MEAN_PER_CLASS = {"fgvc_aircraft", "pets", "caltech101", "flowers102"}  # CLIP's Tab. 9


def small_digits(per_class: int, classes: int = 3):
    x, y = digit_images(classes=classes)
    rows = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(classes)])
    rows = rows[np.argsort(rows, kind="stable")]  # classes interleaved, as in the digits file
    return x[rows], y[rows]


def assert_split_matches(split, x, y, rows):
    """The split holds exactly the images written at `rows`, each with its own label."""
    assert sorted(split.labels.tolist()) == sorted(y[rows].tolist())
    assert len(set(split.paths)) == len(split) == len(rows)
    written = x[rows].astype(np.float32)
    for i in range(len(split)):
        image = np.asarray(split[i], dtype=np.float32)
        diff = np.abs(written - image).mean(axis=(1, 2, 3))
        nearest = int(np.argmin(diff))
        assert diff[nearest] < 6.0  # JPEG-compressed copy of that very image
        assert y[rows][nearest] == split.labels[i]


@pytest.mark.parametrize("name", FIXED_SPLITS)
def test_fixed_splits_hold_the_written_images(tmp_path, name):
    x, y = small_digits(6)
    expected = WRITERS[name](tmp_path, x, y)
    ps = probe_sets.load(name, tmp_path)
    assert ps.num_classes == 3
    assert ps.metric == ("mean_per_class" if name in MEAN_PER_CLASS else "top1")
    for part in ("train", "val", "test"):
        split = getattr(ps, part)
        if expected[part] is None:
            assert split is None
        else:
            assert_split_matches(split, x, y, expected[part])


def test_caltech101_keeps_background_google_as_a_class_and_takes_30_per_class_for_train(tmp_path):
    x, y = small_digits(32, classes=4)
    WRITERS["caltech101"](tmp_path, x, y)  # digits 0-2 as objects, digit 3 as BACKGROUND_Google
    ps = probe_sets.load("caltech101", tmp_path, seed=1)
    assert ps.num_classes == 4  # CLIP's Caltech101: 101 objects + background = 102
    assert np.bincount(ps.train.labels).tolist() == [30, 30, 30, 30]
    assert np.bincount(ps.test.labels).tolist() == [2, 2, 2, 2]
    assert sum("/BACKGROUND_Google/" in p for p in ps.train.paths) == 30
    assert not set(ps.train.paths) & set(ps.test.paths)
    for split in (ps.train, ps.test):  # one label per class folder, a different one for each folder
        label_of = {p.split("/")[-2]: label for p, label in zip(split.paths, split.labels)}
        assert [label_of[p.split("/")[-2]] for p in split.paths] == split.labels.tolist()
        assert len(set(label_of.values())) == len(label_of) == 4
    for i, row in enumerate(_rows_of(ps.test.paths, y)):  # each item is the image written there
        assert np.abs(np.asarray(ps.test[i], dtype=np.float32) - x[row]).mean() < 6.0
    assert probe_sets.load("caltech101", tmp_path, seed=2).test.paths != ps.test.paths


def _rows_of(paths, y):
    # Caltech101 names images image_000K.jpg per class: row = K-th image of that class.
    rows = []
    for p in paths:
        folder = p.split("/")[-2]
        cls = int(y.max()) if folder == "BACKGROUND_Google" else int(folder.removeprefix("digit"))
        k = int(p.split("image_")[-1][:4])
        rows.append(np.flatnonzero(y == cls)[k - 1])
    return np.array(rows)


def test_eurosat_draws_clips_10000_5000_of_27000_proportions(tmp_path):
    x, y = small_digits(18)
    WRITERS["eurosat"](tmp_path, x, y)
    ps = probe_sets.load("eurosat", tmp_path, seed=0)
    assert (len(ps.train), len(ps.test)) == (round(54 * 10 / 27), round(54 * 5 / 27))
    assert not set(ps.train.paths) & set(ps.test.paths)
    again = probe_sets.load("eurosat", tmp_path, seed=0)
    assert again.train.paths == ps.train.paths
    for split in (ps.train, ps.test):  # label = the class folder the image was written to
        assert [int(p.split("/")[-2].removeprefix("digit")) for p in split.paths] == split.labels.tolist()


def test_birdsnap_skips_and_counts_images_never_downloaded(tmp_path):
    x, y = small_digits(4)
    WRITERS["birdsnap"](tmp_path, x, y)
    ps = probe_sets.load("birdsnap", tmp_path)
    assert ps.train.base.missing == 1
    assert len(ps.train) + len(ps.test) == len(x)


def test_missing_file_is_named_with_the_expected_path(tmp_path):
    x, y = small_digits(4)
    WRITERS["flowers102"](tmp_path, x, y)
    (tmp_path / "flowers102" / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"flowers102/flowers-102/setid.mat.*robots.ox.ac.uk"):
        probe_sets.check("flowers102", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cifar10/cifar-10-batches-py/data_batch_1"):
        probe_sets.load("cifar10", tmp_path)
    with pytest.raises(KeyError, match="unknown linear-probe set 'mnist'"):
        probe_sets.check("mnist", tmp_path)


def test_sun397_partition_naming_a_missing_image(tmp_path):
    x, y = small_digits(4)
    WRITERS["sun397"](tmp_path, x, y)
    with open(tmp_path / "sun397" / "Partitions" / "Testing_01.txt", "a") as f:
        f.write("/d/digit0/sun_gone.jpg\n")
    with pytest.raises(FileNotFoundError, match=r"Testing_01.txt lists /d/digit0/sun_gone.jpg"):
        probe_sets.load("sun397", tmp_path)


def test_grayscale_images_reach_the_transform_as_rgb(tmp_path):
    x, y = small_digits(32)
    WRITERS["caltech101"](tmp_path, x[..., :1].repeat(3, -1), y)
    img = tmp_path / "caltech101" / "101_ObjectCategories" / "digit0" / "image_0001.jpg"
    from PIL import Image
    Image.open(img).convert("L").save(img)  # Caltech101 holds grayscale JPEGs
    ps = probe_sets.load("caltech101", tmp_path, transform=lambda im: im.mode)
    assert {ps.train[i] for i in range(len(ps.train))} == {"RGB"}


LISTED = ["stanford_cars", "flowers102", "food101", "dtd", "fgvc_aircraft", "pets", "imagenet"]


@pytest.mark.parametrize("name", LISTED)
def test_check_images_names_an_image_the_split_files_name_that_is_missing(tmp_path, name):
    x, y = small_digits(6)
    WRITERS[name](tmp_path, x, y)
    probe_sets.check_images(probe_sets.load(name, tmp_path), tmp_path)
    gone = probe_sets.load(name, tmp_path).test.paths[1]
    Path(gone).unlink()
    with pytest.raises(FileNotFoundError, match=rf"eval set '{name}': 1 image\(s\) missing .*: {re.escape(gone)}$"):
        probe_sets.check_images(probe_sets.load(name, tmp_path), tmp_path)


def test_check_images_counts_a_short_imagenet_train_folder(tmp_path, monkeypatch):
    # The real count (1,281,167 in 1,000 classes) cannot be written here: the same rule on 3 classes.
    x, y = small_digits(6)
    WRITERS["imagenet"](tmp_path, x, y)
    ps = probe_sets.load("imagenet", tmp_path)
    monkeypatch.setattr(probe_sets, "IMAGENET_CLASSES", 3)
    monkeypatch.setattr(probe_sets, "IMAGENET_TRAIN_IMAGES", len(ps.train) + 2)
    with pytest.raises(FileNotFoundError, match=r"'imagenet': 1 image\(s\) missing .*: 2 of the 11 ILSVRC2012 "
                                                r"train images \(no list names them; 9 are under .*imagenet/train\)"):
        probe_sets.check_images(ps, tmp_path)


def test_check_images_holds_a_eurosat_release_to_its_27000_images(tmp_path):
    """The release's class folders are expected in full: a deleted last image, or a whole class,
    is named, though no gap in the numbering shows it (files are empty: nothing is decoded)."""
    base = tmp_path / "eurosat" / "2750"
    for cls, n in probe_sets.EUROSAT_RELEASE.items():
        (base / cls).mkdir(parents=True)
        for i in range(1, n + 1):
            (base / cls / f"{cls}_{i}.jpg").touch()
    ps = probe_sets.load("eurosat", tmp_path)
    assert len(ps.train.base) == 27000
    probe_sets.check_images(ps, tmp_path)
    (base / "River" / "River_2500.jpg").unlink()
    shutil.rmtree(base / "Pasture")
    with pytest.raises(FileNotFoundError) as err:
        probe_sets.check_images(probe_sets.load("eurosat", tmp_path), tmp_path)
    message = str(err.value)
    assert message.startswith("eval set 'eurosat': 2001 image(s) missing (") and "holds 27,000" in message
    assert f": {base / 'Pasture' / 'Pasture_1.jpg'}, {base / 'Pasture' / 'Pasture_2.jpg'}, " in message
    assert message.endswith("... (1996 more)")
    assert "River_2500" not in message  # only the first five are named; the River gap is counted
    (base / "Pasture").mkdir()
    for i in range(1, 2001):
        (base / "Pasture" / f"Pasture_{i}.jpg").touch()
    with pytest.raises(FileNotFoundError, match=rf"1 image\(s\) missing .*: {re.escape(str(base / 'River'))}/River_2500.jpg$"):
        probe_sets.check_images(probe_sets.load("eurosat", tmp_path), tmp_path)


def test_check_images_finds_a_gap_in_caltech101_object_classes(tmp_path):
    x, y = small_digits(32, classes=4)
    WRITERS["caltech101"](tmp_path, x, y)
    base = tmp_path / "caltech101" / "101_ObjectCategories"
    probe_sets.check_images(probe_sets.load("caltech101", tmp_path), tmp_path)
    (base / "BACKGROUND_Google" / "image_0004.jpg").unlink()  # its numbering is not relied on
    probe_sets.check_images(probe_sets.load("caltech101", tmp_path), tmp_path)
    (base / "digit1" / "image_0003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=rf"'caltech101': 1 image\(s\) missing .*: {base}/digit1/image_0003.jpg$"):
        probe_sets.check_images(probe_sets.load("caltech101", tmp_path), tmp_path)
