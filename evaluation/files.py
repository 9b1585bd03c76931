"""Which of many image files are missing, without opening any of them.

Each folder is listed once (`os.scandir`) instead of one stat per file, a few folders at a time,
so checking a million images on a network file system before submission costs seconds, not hours.
"""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

import numpy as np

from unicom_ds import safe_pickle

LISTERS = 16  # folders listed at once: listing is bound by file-system latency, not CPU
SHOWN = 5     # missing files named in a message


def missing(paths: Iterable[str]) -> list[str]:
    """The paths that are not files, in the order given."""
    paths = list(paths)
    by_folder: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(_file_of(path))
        by_folder.setdefault(folder, set()).add(name)

    def absent(item: tuple[str, set[str]]) -> set[tuple[str, str]]:
        folder, names = item
        try:
            with os.scandir(folder or ".") as entries:
                present = {e.name for e in entries if e.name in names and e.is_file()}
        except (FileNotFoundError, NotADirectoryError):
            present = set()
        return {(folder, name) for name in names - present}

    with ThreadPoolExecutor(LISTERS) as pool:
        gone = set().union(*pool.map(absent, by_folder.items()))
    return [p for p in paths if os.path.split(_file_of(p)) in gone]


# CIFAR-10's release holds its images as arrays in pickled batches: an image is named FILE#ROW.
CIFAR_ROW = re.compile(r"^(.*[/\\]cifar-10-batches-py[/\\](?:data_batch_[1-5]|test_batch))#(\d+)$")


def array_row(path: str) -> tuple[str, int] | None:
    """(batch file, row) of an image named FILE#ROW inside CIFAR-10's python release, else None."""
    m = CIFAR_ROW.match(path)
    return (m.group(1), int(m.group(2))) if m else None


def read_cifar_batch(path: str) -> tuple[np.ndarray, list[int]]:
    """(images uint8 [n, 32, 32, 3], labels) of one pickled CIFAR-10 batch (rows: 1024 R, 1024 G, 1024 B).
    A downloaded file: read as data (safe_pickle), a planted payload is refused, naming the file."""
    entry = safe_pickle.load(path, encoding="latin1")  # the release's Python 2 pickles
    return np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), list(entry["labels"])


def _file_of(path: str) -> str:
    """The file holding an image: itself, or the batch file of a CIFAR-10 array row."""
    row = array_row(path)
    return row[0] if row else path


def first_few(paths: list[str]) -> str:
    """`a, b, c, ... (N more)`: the first SHOWN paths of a list for an error message."""
    more = f", ... ({len(paths) - SHOWN} more)" if len(paths) > SHOWN else ""
    return ", ".join(paths[:SHOWN]) + more
