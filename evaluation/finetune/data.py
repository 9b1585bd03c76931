"""The train split of a retrieval set as the Trainer's data source, augmented as deepglint/unicom
retrieval.py does (--transform timm: timm's `create_transform`: RandomResizedCrop, flip, RandAugment,
colour jitter, random erasing, CLIP normalisation; origin_clip: the model's preprocess), and its test
images transformed as retrieval.py scores them."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import open_clip
import torch
from torch.utils.data import DataLoader, Dataset

from evaluation.features import ImageFiles
from evaluation.retrieval_sets import TrainSplit


def _pillow13_posterize() -> None:
    """timm's increasing posterize asks for 0 bits at the top magnitude (10, which m9 +- 0.5 noise
    reaches when clipped); Pillow >= 13 refuses 0 bits, older Pillow returned a black image. Keep 1 bit."""
    from timm.data import auto_augment as aa
    inner = aa._posterize_increasing_level_to_arg
    aa.LEVEL_TO_ARG["PosterizeIncreasing"] = lambda level, hparams: (max(1, inner(level, hparams)[0]),)


def timm_eval_crop(image_size: int) -> tuple[int, int]:
    """(resize, crop) of retrieval.py's get_transform(is_train=False): crop_pct 224/256 up to 224 px
    (Resize 256, crop 224), 1.0 above (Resize 336, crop 336)."""
    crop_pct = 224 / 256 if image_size <= 224 else 1.0
    return int(image_size / crop_pct), image_size


def eval_transform(finetune: Any, image_size: int) -> Callable:
    """The test images of a fine-tuned model as retrieval.py scores them: origin_clip, the model's own
    preprocess; timm, bicubic Resize and centre crop at timm_eval_crop's sizes, CLIP normalisation."""
    from torchvision import transforms as T
    from unicom_ds.loading import clip_transform
    if str(finetune.transform) == "origin_clip":
        return clip_transform(image_size)
    resize, crop = timm_eval_crop(image_size)
    return T.Compose([T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(crop), T.ToTensor(),
                      T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])


def finetune_transform(finetune: Any, image_size: int) -> Callable:
    """The train images: retrieval.py's --transform, timm (train_transform) or origin_clip (the model's
    preprocess: resize and centre crop, no augmentation, as the SOP scripts train)."""
    from unicom_ds.loading import clip_transform
    if str(finetune.transform) == "origin_clip":
        return clip_transform(image_size)
    return train_transform(finetune.augment, image_size)


def train_transform(augment: Any, image_size: int) -> Callable:
    """retrieval.py's get_transform(is_train=True), from the finetune.augment keys."""
    from timm.data import create_transform
    _pillow13_posterize()
    return create_transform(input_size=image_size, is_training=True, scale=(float(augment.crop_scale_min), 1.0),
                            hflip=float(augment.hflip),
                            color_jitter=float(augment.color_jitter),
                            auto_augment=augment.auto_augment or None, interpolation="bicubic",
                            re_prob=float(augment.re_prob), re_mode=str(augment.re_mode),
                            re_count=int(augment.re_count), mean=open_clip.OPENAI_DATASET_MEAN,
                            std=open_clip.OPENAI_DATASET_STD)


class _Labelled(Dataset):
    def __init__(self, files: ImageFiles, labels: np.ndarray):
        self.files, self.labels = files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.files[i], int(self.labels[i])


def _collate(items: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = zip(*items)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.zeros(0)


def micro_batch_rows(n: int, *, epoch: int, first: int, count: int, micro: int, rank: int, world: int,
                     seed: int) -> list[np.ndarray]:
    """Rows of this rank's micro batches `first`..`first + count - 1` of `epoch`.

    Each epoch is one permutation of the rows seeded by (seed, epoch), read in global micro batches of
    `micro` x `world` rows (rank r takes the r-th part); an epoch longer than the set draws further
    permutations. Pure, so a resume at any step continues the same epoch without replaying it.
    """
    rng = np.random.default_rng([seed, epoch])
    need = (first + count) * micro * world
    order = np.concatenate([rng.permutation(n) for _ in range(-(-need // n))])
    return [order[((m * world) + rank) * micro:((m * world) + rank + 1) * micro] for m in range(first, first + count)]


def row_loader(dataset: Dataset, rows: list[np.ndarray], collate: Callable, workers: int,
               timeout_s: float) -> Iterator:
    """The micro batches `rows` of `dataset` read by `workers` loader processes."""
    return iter(DataLoader(dataset, batch_sampler=[r.tolist() for r in rows], num_workers=workers,
                           collate_fn=collate, timeout=timeout_s if workers else 0,
                           pin_memory=torch.cuda.is_available()))


class TrainImages:
    """Trainer data source over a TrainSplit: class ids mapped to 0..classes-1, unreadable images an
    error naming the file (a fine-tuning set is small and curated: nothing is skipped silently)."""

    skip_reasons: tuple[str, ...] = ()

    def __init__(self, split: TrainSplit, transform: Callable):
        ids, self.labels = np.unique(split.labels, return_inverse=True)
        self.classes = len(ids)
        self.dataset = _Labelled(ImageFiles(split.paths, transform), self.labels)

    def check(self, rank: int, world: int, device: torch.device) -> int:
        return len(self.dataset)

    def batches(self, *, epoch: int, in_epoch: int, accum: int, count: int, micro: int, image_size: int,
                rank: int, world: int, seed: int, workers: int, timeout_s: float) -> Iterator:
        rows = micro_batch_rows(len(self.dataset), epoch=epoch, first=in_epoch * accum, count=count, micro=micro,
                                rank=rank, world=world, seed=seed)
        return row_loader(self.dataset, rows, _collate, workers, timeout_s)
