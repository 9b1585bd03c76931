"""Embedded shards on disk (RUN/embed) and the feature k-means and assign cluster.

Shards are read memory-mapped, one at a time, and released before the next one, so the pages a
reader touches never add up over shards: peak memory follows the rows asked for, not the data size.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from unicom_ds.arrays import normalize
from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, check_same

# The config keys whose change makes embeddings differ; stored in every S.done.json.
EMBED_KEYS = ("clip.model", "clip.pretrained")
MODES = ("joint", "image", "text")


def embed_dir(run_dir: str) -> Path:
    return Path(run_dir) / "embed"


def done_path(run_dir: str, stem: str) -> Path:
    return embed_dir(run_dir) / f"{stem}.done.json"


def joint(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """The joint image-text feature of the paper: normalize((img + txt) / 2)."""
    return normalize((np.asarray(img, np.float32) + np.asarray(txt, np.float32)) / 2)


def feature(img: np.ndarray | None, txt: np.ndarray | None, mode: str) -> np.ndarray:
    """The feature k-means clusters for `kmeans.mode` (image and text are stored normalised)."""
    if mode == "joint":
        return joint(img, txt)
    if mode == "image":
        return normalize(img)
    if mode == "text":
        return normalize(txt)
    raise ConfigError(f"kmeans.mode={mode}: expected one of {', '.join(MODES)}")


def embedded_stems(run_dir: str) -> list[str]:
    """Stems of the shards that count as embedded: those whose S.done.json exists."""
    return sorted(p.name[: -len(".done.json")] for p in embed_dir(run_dir).glob("*.done.json"))


def row_counts(run_dir: str, stems: list[str], embed_cfg: dict | None = None) -> np.ndarray:
    """Rows per embedded shard from its done.json; with `embed_cfg`, refuse shards made by another CLIP."""
    counts = []
    for s in stems:
        done = read_json(done_path(run_dir, s))
        if embed_cfg is not None:
            recorded = {k: done.get("config", {}).get(k) for k in EMBED_KEYS}
            check_same(recorded, embed_cfg, done_path(run_dir, s))
        counts.append(int(done["n"]))
    return np.asarray(counts, dtype=np.int64)


def _open(run_dir: str, stem: str, mode: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    d = embed_dir(run_dir)
    img = np.load(d / f"{stem}.img.npy", mmap_mode="r") if mode in ("joint", "image") else None
    txt = np.load(d / f"{stem}.txt.npy", mmap_mode="r") if mode in ("joint", "text") else None
    return img, txt


def dim(run_dir: str, stem: str) -> int:
    return int(np.load(embed_dir(run_dir) / f"{stem}.img.npy", mmap_mode="r").shape[1])


def read_rows(run_dir: str, stem: str, rows: np.ndarray, mode: str) -> np.ndarray:
    """Features of the given (sorted) rows of one shard; only those rows are read from disk."""
    img, txt = _open(run_dir, stem, mode)
    return feature(None if img is None else img[rows], None if txt is None else txt[rows], mode)


def iter_batches(run_dir: str, stem: str, mode: str, batch_size: int) -> Iterator[np.ndarray]:
    """The features of one shard in consecutive row batches."""
    img, txt = _open(run_dir, stem, mode)
    n = (img if img is not None else txt).shape[0]
    for a in range(0, n, max(1, int(batch_size))):
        sl = slice(a, a + int(batch_size))
        yield feature(None if img is None else img[sl], None if txt is None else txt[sl], mode)


def sample_rows(counts: np.ndarray, n_sample: int, seed: int) -> list[np.ndarray]:
    """A seeded uniform sample without replacement of `n_sample` of all rows, as sorted row ids per shard."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    n_sample = min(int(n_sample), total)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=n_sample, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    cuts = np.searchsorted(picked, starts)
    return [picked[cuts[i]:cuts[i + 1]] - starts[i] for i in range(len(counts))]


def gather(run_dir: str, stems: list[str], rows: list[np.ndarray], mode: str, d: int) -> np.ndarray:
    """The sampled rows of every shard into one float32 array, one shard mapped at a time."""
    out = np.empty((sum(len(r) for r in rows), d), dtype=np.float32)
    at = 0
    for stem, r in zip(stems, rows):
        if len(r):
            out[at:at + len(r)] = read_rows(run_dir, stem, r, mode)
            at += len(r)
    return out
