"""Training data: the original image shards, labels joined by __key__ from the run directory.

Shards are resampled with replacement (seeded by run seed, rank, DataLoader worker, epoch and the
step the epoch starts at), so every rank can always draw the same fixed number of batches per
epoch: uneven shards can never leave one rank waiting for another. Samples without a label, or
whose image does not decode, are skipped; each batch says how many were skipped before it.
"""
from __future__ import annotations

import io
import math
from functools import partial
from collections import OrderedDict
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T

from unicom_ds import shards

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("no_label", "undecodable")


def train_transform(image_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + horizontal flip + CLIP normalisation (open_clip's mean/std)."""
    return T.Compose([
        T.RandomResizedCrop(image_size, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
    ])


def label_files(run_dir: str | Path, shard_stem: str) -> tuple[Path, Path]:
    run = Path(run_dir)
    return run / "embed" / f"{shard_stem}.keys.txt", run / "labels" / f"{shard_stem}.npy"


def labelled_shards(run_dir: str | Path, pattern: str) -> tuple[list[str], int]:
    """The shards of `pattern` that have labels in the run directory, and their number of rows."""
    found, rows = [], 0
    for path in shards.expand(pattern):
        keys, labels = label_files(run_dir, shards.stem(path))
        if keys.is_file() and labels.is_file():
            found.append(path)
            rows += int(np.load(labels, mmap_mode="r").shape[0])
    if not found:
        raise FileNotFoundError(f"no shard of data.shards={pattern!r} has labels in {Path(run_dir) / 'labels'} "
                                "(and keys in embed/): run stage=cluster first")
    return found, rows


def read_label_table(run_dir: str | Path, shard_stem: str) -> dict[str, int]:
    """{__key__: class} of one shard; rows with a negative label are left out (unlabelled)."""
    keys_path, labels_path = label_files(run_dir, shard_stem)
    keys = keys_path.read_text().splitlines()
    labels = np.load(labels_path)
    if labels.ndim != 1 or len(labels) != len(keys):
        raise ValueError(f"{labels_path} holds {labels.shape} labels but {keys_path} has {len(keys)} keys: "
                         "the cluster stage's outputs of this shard do not match")
    return {k: int(c) for k, c in zip(keys, labels.tolist()) if c >= 0}


class LabelJoin:
    """Pipeline stage: raw webdataset samples -> (image tensor, class, skipped-before counts).

    Only the label tables of recently seen shards are kept (a resampled stream stays on one
    shard for a while), so memory does not grow with the number of shards.
    """

    def __init__(self, run_dir: str | Path, transform: Callable, cached_shards: int = 8):
        self.run_dir, self.transform, self.cached = run_dir, transform, cached_shards
        self.tables: OrderedDict[str, dict[str, int]] = OrderedDict()

    def table(self, url: str) -> dict[str, int]:
        name = shards.stem(url)
        if name not in self.tables:
            self.tables[name] = read_label_table(self.run_dir, name)
            if len(self.tables) > self.cached:
                self.tables.popitem(last=False)
        self.tables.move_to_end(name)
        return self.tables[name]

    def prepare(self, sample: dict) -> tuple[torch.Tensor, int] | str:
        """(image, label), or the reason the sample is skipped."""
        label = self.table(sample["__url__"]).get(sample["__key__"])
        if label is None:
            return "no_label"
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception:  # missing, truncated or not an image: skip and count, never crash
            return "undecodable"
        return self.transform(image), label

    def __call__(self, src: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        for sample in src:
            item = self.prepare(sample)
            if isinstance(item, str):
                skipped[SKIP_REASONS.index(item)] += 1
                continue
            yield item[0], item[1], skipped
            skipped = torch.zeros_like(skipped)


def collate(samples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels, skipped = zip(*samples)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.stack(skipped).sum(0)


def _worker_seed(rank: int) -> int:
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def pipeline(urls: list[str], run_dir: str | Path, image_size: int, batch_size: int, *, seed: int,
             rank: int, batches_per_worker: int, shuffle: int = 1000) -> wds.DataPipeline:
    """Full batches (images, labels, skipped[no_label, undecodable]) of one rank, `batches_per_worker` each."""
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=partial(_worker_seed, rank), deterministic=True),
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(shuffle, initial=min(shuffle, 100)),
        LabelJoin(run_dir, train_transform(image_size)),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ).with_epoch(batches_per_worker)


def epoch_batches(urls: list[str], run_dir: str | Path, image_size: int, batch_size: int, num_batches: int,
                  *, seed: int, rank: int, workers: int = 0) -> Iterator:
    """Exactly `num_batches` micro-batches for this rank (the same count on every rank)."""
    workers = max(0, int(workers))
    per_worker = math.ceil(num_batches / max(1, workers))
    data = pipeline(urls, run_dir, image_size, batch_size, seed=seed, rank=rank, batches_per_worker=per_worker)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                         persistent_workers=False, pin_memory=torch.cuda.is_available())
    return islice(loader, num_batches)
