"""Shard lists: webdataset brace patterns, file stems, existence checks."""
from __future__ import annotations

from pathlib import Path

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


def existing(pattern: str) -> list[str]:
    """The shards of `pattern`; raises FileNotFoundError naming the first missing one."""
    paths = expand(pattern)
    if not paths:
        raise FileNotFoundError(f"data.shards={pattern!r} matches no file")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FileNotFoundError(f"data.shards: shard {missing[0]} does not exist{more}")
    stems = [stem(p) for p in paths]
    if len(set(stems)) != len(stems):
        raise ValueError("data.shards: two shards share a file stem; the run directory names shards by stem")
    return paths


def chunks(items: list, size: int) -> list[list]:
    size = max(1, int(size))
    return [items[i:i + size] for i in range(0, len(items), size)]
