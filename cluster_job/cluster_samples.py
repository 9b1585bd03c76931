"""Samples of pseudo classes for people to look at: thumbnails and captions pulled from the input shards.

A seeded choice of non-empty classes, up to `per_class` members each, found through RUN/labels/S.npy and
RUN/embed/S.keys.txt and read back from the ORIGINAL shards (`data.shards`), one pass per shard that
touches only the tar headers and the wanted members. The report and TensorBoard show them.
"""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps
from webdataset.tariterators import base_plus_ext

from unicom_ds import continuation, shards, tblog
from unicom_ds.progress import progress

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    cls: int
    stem: str
    key: str
    caption: str | None = None
    thumb: Image.Image | None = None


@dataclass
class ClusterSamples:
    classes: dict[int, list[Sample]]          # class id -> its shown samples (images found)
    sizes: dict[int, int]                     # class id -> number of rows in the class
    num_nonempty: int                         # non-empty classes in the whole run
    skipped: Counter = field(default_factory=Counter)
    all_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # rows of every class id


# ---- pure parts -------------------------------------------------------------------------------

def class_sizes(labels: Iterable[np.ndarray]) -> np.ndarray:
    """Rows per class over several label arrays (int64 class ids >= 0)."""
    sizes = np.zeros(0, dtype=np.int64)
    for lab in labels:
        counts = np.bincount(np.asarray(lab), minlength=len(sizes))
        counts[: len(sizes)] += sizes
        sizes = counts
    return sizes


def choose_classes(sizes: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` distinct non-empty classes (all of them when fewer), seeded, in increasing id order."""
    nonempty = np.flatnonzero(sizes)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(nonempty, size=min(n, len(nonempty)), replace=False))


def choose_members(classes: np.ndarray, labels: list[np.ndarray], per_class: int,
                   seed: int) -> dict[int, list[tuple[int, int]]]:
    """For each class, up to `per_class` (shard index, row) pairs drawn without replacement, seeded."""
    found: dict[int, list[np.ndarray]] = {int(c): [] for c in classes}
    for i, lab in enumerate(labels):
        lab = np.asarray(lab)
        rows = np.flatnonzero(np.isin(lab, classes))
        for c in np.unique(lab[rows]):
            r = rows[lab[rows] == c]
            found[int(c)].append(np.stack([np.full(len(r), i), r], axis=1))
    rng = np.random.default_rng(seed)
    out = {}
    for c, parts in found.items():
        pairs = np.concatenate(parts) if parts else np.zeros((0, 2), dtype=np.int64)
        pick = np.sort(rng.choice(len(pairs), size=min(per_class, len(pairs)), replace=False))
        out[c] = [(int(s), int(r)) for s, r in pairs[pick]]
    return out


def thumbnail(image: Image.Image, size: int) -> Image.Image:
    """A `size` x `size` RGB centre crop (the grids need equal tiles)."""
    image.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster for big photos
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)


def grid(tiles: list[np.ndarray], ncol: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Equal-sized HWC uint8 tiles laid out row by row, `pad` pixels of `fill` around each."""
    h, w, ch = tiles[0].shape
    nrow = -(-len(tiles) // ncol)
    out = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, ch), fill, dtype=np.uint8)
    for i, tile in enumerate(tiles):
        y, x = pad + (i // ncol) * (h + pad), pad + (i % ncol) * (w + pad)
        out[y:y + h, x:x + w] = tile
    return out


# ---- reading the run directory and the shards -----------------------------------------------

def labelled_stems(run_dir: str | Path, keys_dir: str | Path | None = None) -> list[str]:
    """Shards with both RUN/labels/S.npy and S.keys.txt in `keys_dir` (default RUN/embed), sorted."""
    run_dir = Path(run_dir)
    keys_dir = Path(keys_dir or run_dir / "embed")
    return sorted(p.stem for p in (run_dir / "labels").glob("*.npy") if (keys_dir / f"{p.stem}.keys.txt").is_file())


def _read_keys(run_dir: Path, keys_dir: Path, stem: str, n: int) -> list[str]:
    path = keys_dir / f"{stem}.keys.txt"
    keys = path.read_text().splitlines()
    if len(keys) != n:
        raise ValueError(f"{path} has {len(keys)} keys but {run_dir / 'labels' / (stem + '.npy')} "
                         f"has {n} labels; they must be aligned row for row")
    return keys


def read_members(path: str | Path, keys: set[str], skipped: Counter) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} for the image and caption members of `keys` in one tar; one pass.

    A seekable tar lets tarfile jump over members it does not extract, so only the wanted ones are read.
    A truncated or unreadable tar keeps what was read before the fault and counts it.
    """
    out: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                ext = (ext or "").lower()
                if key in keys and (ext in IMAGE_EXTS or ext == "txt"):
                    out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError):
        skipped["unreadable or truncated shard"] += 1
    return out


def _decode(sample: Sample, members: dict[str, bytes], size: int, skipped: Counter) -> bool:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        skipped["image missing"] += 1
        return False
    try:
        sample.thumb = thumbnail(Image.open(io.BytesIO(image)), size)
    except (OSError, ValueError, Image.DecompressionBombError):
        skipped["corrupt image"] += 1
        return False
    if "txt" in members:
        sample.caption = members["txt"].decode("utf-8", errors="replace").strip()
    else:
        skipped["caption missing"] += 1
    return True


def collect(run_dir: str | Path, shard_pattern: str, classes: int, per_class: int, seed: int,
            size: int, mode: str = "auto", keys_dir: str | Path | None = None) -> ClusterSamples | None:
    """Thumbnails and captions for a seeded sample of pseudo classes; None when nothing is labelled yet.

    `keys_dir` holds the S.keys.txt the labels are aligned with: RUN/embed, or `embed.from`'s embed/."""
    run_dir = Path(run_dir)
    keys_dir = Path(keys_dir or run_dir / "embed")
    stems = labelled_stems(run_dir, keys_dir)
    if not stems:
        return None
    # Memory-mapped: two passes over the labels cost no more RAM than one shard's worth of rows.
    labels = [np.load(run_dir / "labels" / f"{s}.npy", mmap_mode="r") for s in stems]
    sizes = class_sizes(progress(labels, total=len(labels), desc="class sizes", mode=mode))
    chosen = choose_classes(sizes, classes, seed)
    members = choose_members(chosen, labels, per_class, seed)

    samples: dict[int, list[Sample]] = {c: [] for c in members}
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for c, pairs in members.items():
        for shard, row in pairs:
            by_shard.setdefault(shard, []).append((c, row))
    inputs = {shards.stem(p): p for p in shards.expand(shard_pattern)}
    skipped: Counter = Counter()
    todo = sorted(by_shard.items())
    for shard, wanted in progress(todo, total=len(todo), desc="class samples", mode=mode):
        stem = stems[shard]
        keys = _read_keys(run_dir, keys_dir, stem, len(labels[shard]))
        picked = [Sample(c, stem, keys[row]) for c, row in wanted]
        path = inputs.get(stem)
        if path is None or not Path(path).is_file():
            skipped["input shard not found"] += len(picked)
            continue
        found = read_members(path, {s.key for s in picked}, skipped)
        for s in picked:
            if _decode(s, found.get(s.key, {}), size, skipped):
                samples[s.cls].append(s)
    for c in samples:
        samples[c].sort(key=lambda s: (s.stem, s.key))
    return ClusterSamples(classes=samples, sizes={c: int(sizes[c]) for c in samples},
                          num_nonempty=int(np.count_nonzero(sizes)), skipped=skipped, all_sizes=sizes)


def class_size_figure(sizes: np.ndarray, k: int | None = None):
    """Histogram of the non-empty classes' sizes (the paper's Fig. 4) with honest axes: every tick label a
    plain number of images or classes (never 10^0, 2x10^0), a log count axis only when bars span > 2 decades."""
    import matplotlib
    matplotlib.use("Agg")  # no display on clusters and in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    used = np.asarray(sizes)[np.asarray(sizes) > 0]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if len(used):
        lo, hi = int(used.min()), int(used.max())
        # One bar per size while sizes are few, else 50 bins; edges between integers.
        edges = np.arange(lo, hi + 2) - 0.5 if hi - lo < 50 else np.linspace(lo - 0.5, hi + 0.5, 51)
        counts, _, _ = ax.hist(used, bins=edges, color="#3b6ea8")
        if counts.max() > 100 * max(1, counts[counts > 0].min()):
            ax.set_yscale("log")
            ax.set_ylim(bottom=0.7)  # a bar of one class stays visible
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0,)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("number of classes (log scale)")
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("number of classes")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))  # no 1e6 offset
        ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("images per pseudo class")
    of = f" of k = {k:,}" if k else ""
    ax.set_title(f"{len(used):,} non-empty classes{of}, {int(np.sum(used)):,} images", fontsize=10)
    fig.tight_layout()
    return fig


def plot_class_sizes(sizes: np.ndarray, path: str | Path, k: int | None = None) -> Path:
    """`class_size_figure` as a PNG file."""
    import matplotlib.pyplot as plt

    from unicom_ds.atomic import atomic_path

    fig = class_size_figure(sizes, k)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def log_grids(run_dir: str | Path, samples: ClusterSamples, max_grids: int, step: int = 0) -> list[str]:
    """Write up to `max_grids` class grids as images to RUN/tensorboard/cluster; returns the tags."""
    tags = []
    with tblog.writer(str(run_dir), "cluster") as tb:
        for c, shown in samples.classes.items():
            if len(tags) == max_grids:
                break
            if not shown:
                continue
            tiles = [np.asarray(s.thumb) for s in shown]
            tag = f"cluster_samples/class_{c}"
            tb.add_image(tag, grid(tiles, ncol=min(4, len(tiles))), step, dataformats="HWC")
            tags.append(tag)
    return tags


def tensorboard_grids(cfg) -> list[str]:
    """The cluster stage's hook: sample classes per `report.*` and log their grids (no-op before labels)."""
    samples = collect(cfg["run_dir"], cfg["data"]["shards"], cfg["report"]["classes"],
                      cfg["report"]["per_class"], cfg["seed"], cfg["report"]["thumb_size"], cfg["progress"],
                      keys_dir=continuation.embed_source(cfg))
    if samples is None:
        return []
    return log_grids(cfg["run_dir"], samples, cfg["report"]["tensorboard_grids"])
