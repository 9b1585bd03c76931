"""Which of many image files are missing, without opening any of them.

Each folder is listed once (`os.scandir`) instead of one stat per file, a few folders at a time,
so checking a million images on a network file system before submission costs seconds, not hours.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

LISTERS = 16  # folders listed at once: listing is bound by file-system latency, not CPU
SHOWN = 5     # missing files named in a message


def missing(paths: Iterable[str]) -> list[str]:
    """The paths that are not files, in the order given."""
    paths = list(paths)
    by_folder: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
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
    return [p for p in paths if os.path.split(p) in gone]


def first_few(paths: list[str]) -> str:
    """`a, b, c, ... (N more)`: the first SHOWN paths of a list for an error message."""
    more = f", ... ({len(paths) - SHOWN} more)" if len(paths) > SHOWN else ""
    return ", ".join(paths[:SHOWN]) + more
