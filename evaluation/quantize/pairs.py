"""SCQ's data sources for the Trainer: two different augmented views of each training image per row.

- `ViewPairs`: the frozen backbone's cached features of V >= 2 views (the fast path).
- `ImagePairs`: the images themselves, two fresh augmentations per row, for training end to end
  (quantize.scq.backbone_lr_mult > 0).

Both draw an epoch as a permutation seeded by (seed, epoch) and read it in global micro batches of
micro x world rows (rank r takes the r-th part), so a resumed run continues where it stopped.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from evaluation.features import ImageFiles
from evaluation.finetune.data import micro_batch_rows, row_loader


class ViewPairs:
    """Rows (view a, view b) of cached features [V >= 2, n, D], the two views of an image drawn from
    (seed, epoch, micro batch, rank) alone."""

    skip_reasons: tuple[str, ...] = ()

    def __init__(self, views: np.ndarray):
        if views.ndim != 3 or len(views) < 2:
            raise ValueError(f"SCQ needs features of at least 2 views per image [V, n, D], got shape {views.shape}")
        self.x = torch.as_tensor(np.ascontiguousarray(views, dtype=np.float32))

    def check(self, rank: int, world: int, device: torch.device) -> int:
        return self.x.shape[1]

    def batches(self, *, epoch: int, in_epoch: int, accum: int, count: int, micro: int, rank: int, world: int,
                seed: int, **_):
        """Micro batches in_epoch * accum.. of `epoch` (wrapping round the permutation when it runs out)."""
        views, n = self.x.shape[:2]
        order = torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(n))
        for m in range(in_epoch * accum, in_epoch * accum + count):
            rows = order[((m * world + rank) * micro + torch.arange(micro)) % n]
            rng = np.random.default_rng([seed, epoch, m, rank])
            va = torch.as_tensor(rng.integers(0, views, micro))
            vb = (va + torch.as_tensor(rng.integers(1, views, micro))) % views  # a different view of each image
            yield self.x[va, rows], self.x[vb, rows], torch.zeros(0)


class _TwoViews:
    """One decoded image, two independent draws of the transform."""

    def __init__(self, transform: Callable):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    a, b = zip(*items)
    return torch.stack(a), torch.stack(b), torch.zeros(0)


class ImagePairs:
    """Rows (view a, view b) of image files, each view a fresh draw of `transform` (the train stage's);
    an unreadable image is an error naming the file (a retrieval set's train split is curated)."""

    skip_reasons: tuple[str, ...] = ()

    def __init__(self, paths: Sequence[str], transform: Callable):
        self.files = ImageFiles(paths, _TwoViews(transform))

    def check(self, rank: int, world: int, device: torch.device) -> int:
        return len(self.files)

    def batches(self, *, epoch: int, in_epoch: int, accum: int, count: int, micro: int, rank: int, world: int,
                seed: int, workers: int, timeout_s: float, **_):
        rows = micro_batch_rows(len(self.files), epoch=epoch, first=in_epoch * accum, count=count, micro=micro,
                                rank=rank, world=world, seed=seed)
        return row_loader(self.files, rows, _collate, workers, timeout_s)
