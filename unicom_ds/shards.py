"""Shard lists: webdataset brace patterns, file stems, existence checks."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from braceexpand import braceexpand


def expand(pattern: str) -> list[str]:
    """`/data/{00000..00002}.tar` -> three paths; several patterns may be joined with '::'."""
    paths: list[str] = []
    for part in str(pattern).split("::"):
        paths.extend(braceexpand(part))
    return paths


def stem(path: str) -> str:
    """The shard's name in the run directory: `00042` for `.../00042.tar`."""
    name = Path(path).name
    for ext in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


LISTERS = 16  # folders listed at once: listing is bound by file-system latency, not CPU
SHOWN = 5     # missing files named in a message


def missing_files(paths: Iterable[str]) -> list[str]:
    """The paths that are not readable files, in the order given, without a stat per file: each folder is
    listed once (`os.scandir`), a few at a time, so a million files on a network file system cost seconds."""
    paths = list(paths)
    by_folder: dict[str, set[str]] = {}
    for path in paths:
        folder, name = os.path.split(path)
        by_folder.setdefault(folder, set()).add(name)

    def absent(item: tuple[str, set[str]]) -> set[tuple[str, str]]:
        folder, names = item
        try:
            with os.scandir(folder or ".") as entries:
                present = {e.name for e in entries if e.name in names and e.is_file() and os.access(e.path, os.R_OK)}
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            present = set()
        return {(folder, name) for name in names - present}

    with ThreadPoolExecutor(LISTERS) as pool:
        gone = set().union(*pool.map(absent, by_folder.items()))
    return [p for p in paths if os.path.split(p) in gone]


def first_few(paths: list[str]) -> str:
    """`a, b, c, ... (N more)`: the first SHOWN paths of a list for an error message."""
    more = f", ... ({len(paths) - SHOWN} more)" if len(paths) > SHOWN else ""
    return ", ".join(paths[:SHOWN]) + more


def is_local(url: str) -> bool:
    """A shard on a file system (not `pipe:...` or a URL, which only their reader can check)."""
    return not (url.startswith("pipe:") or "://" in url)


def check_present(paths: list[str], key: str = "data.shards") -> None:
    """Raise FileNotFoundError naming the first few local shards that are not readable files (and the working
    directory a relative path is read from)."""
    gone = missing_files([p for p in paths if is_local(p)])
    if gone:
        where = f" (relative paths from {os.getcwd()})" if any(not os.path.isabs(p) for p in gone) else ""
        raise FileNotFoundError(f"{key}: {len(gone)} of {len(paths)} shard(s) missing or unreadable{where}: "
                                f"{first_few(gone)}")


def existing(pattern: str) -> list[str]:
    """The shards of `pattern`; raises FileNotFoundError naming the first missing ones."""
    paths = expand(pattern)
    if not paths:
        raise FileNotFoundError(f"data.shards={pattern!r} matches no file")
    check_present(paths)
    stems = [stem(p) for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("data.shards: two shards share a file stem; the run directory names shards by stem")
    return paths


def chunks(items: list, size: int) -> list[list]:
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]
