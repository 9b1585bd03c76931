"""Training data: the original image shards, labels joined by __key__ from the run directory.

Shards are resampled with replacement (seeded by run seed, rank, DataLoader worker, epoch and the
step the epoch starts at), so every rank can always draw the same fixed number of batches per
epoch: uneven shards can never leave one rank waiting for another. Samples without a label, or
whose image does not decode, are skipped; each batch says how many were skipped before it.

With `gpu_decode` the workers only read tar members (and check that a member opens as an image):
batches carry the encoded bytes, and `DeviceCrops` decodes them on the GPU (nvJPEG, PIL on the CPU
for members it refuses) and crops there with the train transform's draws (`decode.TensorTrainCrop`).
"""
from __future__ import annotations

import io
import math
import tarfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image
from torchvision import transforms as T
from webdataset.tariterators import base_plus_ext

from unicom_ds import shards
from unicom_ds.continuation import LabelSource
from unicom_ds.decode import Augment, DraftRandomResizedCrop, TensorTrainCrop, decode_batch
from unicom_ds.progress import progress

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_REASONS = ("no_label", "undecodable")


def train_transform(image_size: int, augment: Augment = Augment()) -> Callable[[Image.Image], torch.Tensor]:
    """RandomResizedCrop + horizontal flip + CLIP normalisation (open_clip's mean/std); `augment` holds the
    crop's smallest area fraction and the flip's probability (train.augment).

    Give it images straight from Image.open: a JPEG decodes at the smallest DCT scale that still
    covers the crop at `image_size` (`decode.DraftRandomResizedCrop`).
    """
    return T.Compose([
        DraftRandomResizedCrop(image_size, scale=(augment.crop_scale_min, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(augment.hflip),
        T.ToTensor(),
        T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
    ])


class LabelError(ValueError):
    """The cluster stage's labels cannot train this run; the message names the file and the fault."""


@dataclass(frozen=True)
class LabelledShards:
    urls: list[str]          # the shards of data.shards that have labels
    rows: int                # labelled samples over those shards (label >= 0)
    per_shard: dict[str, int]


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _tar_keys(url: str, limit: int) -> list[str]:
    """The first `limit` webdataset keys of a local tar, from its member headers only."""
    keys: list[str] = []
    with tarfile.open(url) as tar:
        for member in tar:
            key, _ = base_plus_ext(member.name)
            if member.isfile() and key and (not keys or keys[-1] != key):
                keys.append(key)
                if len(keys) >= limit:
                    break
    return keys


def check_labels(source: LabelSource, pattern: str, num_classes: int, *, key_probe: int = 3,
                 progress_mode: str = "auto") -> LabelledShards:
    """Every labels file of `pattern` checked before the first step, and the labelled samples counted.

    Raises LabelError naming the file for a length that differs from S.keys.txt, a class outside
    [-1, k), a keys file without labels, or a run with no labelled sample at all. The keys of up to
    `key_probe` shards (first, middle, last) are compared with their tars' __key__s, so labels made for
    other shards fail here rather than as a loader that skips every sample.

    A `source.multi` (loss.kind=mlcd) checks S.topl.npy ([n, l], the same l in every shard) instead, and
    refuses a shard assigned without it (assign.top_l=1).
    """
    urls, per_shard, widths = [], {}, {}
    paths = shards.expand(pattern)
    ndim = 2 if source.multi else 1
    for url in progress(paths, total=len(paths), desc="train: checking labels", unit="shard", mode=progress_mode):
        name = shards.stem(url)
        keys, labels = source.keys(name), source.labels(name)
        if source.multi and source.without_topl([name]):
            raise LabelError(source.missing_topl([name]))
        if not labels.is_file():
            continue  # not assigned (yet): trained without it
        if not keys.is_file():
            raise LabelError(f"{labels} exists but {keys} does not: the labels number rows of a keys file")
        table = np.load(labels, mmap_mode="r")
        n_keys = _count_lines(keys)
        if table.ndim != ndim or len(table) != n_keys or not np.issubdtype(table.dtype, np.integer):
            raise LabelError(f"{labels} holds {table.dtype} {table.shape} labels but {keys} has {n_keys} keys: "
                             "the cluster stage's outputs of this shard do not match (rerun stage=assign)")
        if source.multi:
            widths.setdefault(table.shape[1], labels)
            if len(widths) > 1:
                (a, first), (b, _) = widths.items()
                raise LabelError(f"{labels} holds {b} labels per row but {first} holds {a}: the shards were "
                                 "assigned with different assign.top_l (rerun stage=assign)")
        if len(table):
            lo, hi = int(table.min()), int(table.max())
            if lo < -1 or hi >= num_classes:
                bad = lo if lo < -1 else hi
                raise LabelError(f"{labels} holds class {bad}, outside [0, {num_classes}) of "
                                 f"{source.kmeans_summary} (-1 marks an unlabelled row)")
        urls.append(url)
        table = np.asarray(table)
        per_shard[name] = int((table.max(axis=1, initial=-1) >= 0 if source.multi else table >= 0).sum())
    try:  # a missing shard would only be warned about by the loader, for ever
        shards.check_present(urls)
    except FileNotFoundError as e:
        raise LabelError(str(e)) from None
    rows = sum(per_shard.values())
    if not urls:
        raise LabelError(f"no shard of data.shards={pattern!r} has labels in {source.run / 'labels'}: "
                         "run stage=cluster first, or point data.shards at the shards that were clustered")
    if rows == 0:
        raise LabelError(f"{source.run / 'labels'}: every label of the {len(urls)} labelled shard(s) is -1: "
                         "no sample can be trained")
    _probe_keys(source, [u for u in urls if per_shard[shards.stem(u)]], key_probe)
    return LabelledShards(urls, rows, per_shard)


def _probe_keys(source: LabelSource, urls: list[str], count: int) -> None:
    picks = sorted({0, len(urls) // 2, len(urls) - 1})[:count]
    for url in (urls[i] for i in picks):
        if not Path(url).is_file():
            continue  # remote shards (pipe:, http): the loader's watchdog is the check
        keys_path = source.keys(shards.stem(url))
        with open(keys_path) as f:
            wanted = {line.rstrip("\n") for line in f}
        found = _tar_keys(url, 1000)
        if found and not wanted.intersection(found):
            raise LabelError(f"none of the first {len(found)} samples of {url} has a key in {keys_path} "
                             f"(tar: {found[0]!r}, keys file: {min(wanted, default='')!r}): the labels were made "
                             "for other shards; check data.shards against the run's embed stage")


def read_label_table(source: LabelSource, shard_stem: str) -> dict[str, int | tuple[int, ...]]:
    """{__key__: class} of one shard; rows with a negative label are left out (unlabelled).
    A `source.multi` gives {__key__: (class, ...)} from S.topl.npy (-1 pads; a row of only -1 is left out)."""
    keys_path, labels_path = source.keys(shard_stem), source.labels(shard_stem)
    keys = keys_path.read_text().splitlines()
    labels = np.load(labels_path)
    if labels.ndim != (2 if source.multi else 1) or len(labels) != len(keys):
        raise LabelError(f"{labels_path} holds {labels.shape} labels but {keys_path} has {len(keys)} keys: "
                         "the cluster stage's outputs of this shard do not match")
    if source.multi:
        return {k: tuple(row) for k, row in zip(keys, labels.tolist()) if max(row, default=-1) >= 0}
    return {k: int(c) for k, c in zip(keys, labels.tolist()) if c >= 0}


class LabelJoin:
    """Pipeline stage: raw webdataset samples -> (image tensor, class, skipped-before counts);
    the class is a tuple of l classes for a `source.multi` (loss.kind=mlcd), so batches carry [B, l].

    Only the label tables of recently seen shards are kept (a resampled stream stays on one
    shard for a while), so memory does not grow with the number of shards.

    With `transform=None` the image stays encoded: (bytes, class, skipped) for `DeviceCrops`; only
    members that do not even open as an image (no image member, an unknown format) are skipped here.
    """

    def __init__(self, source: LabelSource, transform: Callable | None, cached_shards: int = 8,
                 timeout_s: float = 600.0):
        self.source, self.transform, self.cached, self.timeout_s = source, transform, cached_shards, timeout_s
        self.tables: OrderedDict[str, dict[str, int]] = OrderedDict()

    def table(self, url: str) -> dict[str, int]:
        name = shards.stem(url)
        if name not in self.tables:
            self.tables[name] = read_label_table(self.source, name)
            if len(self.tables) > self.cached:
                self.tables.popitem(last=False)
        self.tables.move_to_end(name)
        return self.tables[name]

    def prepare(self, sample: dict) -> tuple[torch.Tensor | bytes, int] | str:
        """(image, label), or the reason the sample is skipped."""
        label = self.table(sample["__url__"]).get(sample["__key__"])
        if label is None:
            return "no_label"
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        try:  # the transform decodes (drafted to its crop), so decoding faults surface inside it
            image = Image.open(io.BytesIO(data))  # reads the header only
            return (data if self.transform is None else self.transform(image)), label
        except Exception:  # missing, truncated or not an image: skip and count, never crash
            return "undecodable"

    def __call__(self, src: Iterator[dict]) -> Iterator[tuple[torch.Tensor, int, torch.Tensor]]:
        skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
        last = time.monotonic()
        for sample in src:
            item = self.prepare(sample)
            if isinstance(item, str):
                skipped[SKIP_REASONS.index(item)] += 1
                # A stream that only skips would spin forever and hold every GPU: stop it instead.
                if time.monotonic() - last > self.timeout_s:
                    counts = ", ".join(f"{n} {r}" for r, n in zip(SKIP_REASONS, skipped.tolist()) if n)
                    raise LabelError(f"no trainable sample for {self.timeout_s:g}s (train.loader_timeout_s): "
                                     f"skipped {counts}, last from {sample.get('__url__')}; do the labels in "
                                     f"{self.source.run / 'labels'} belong to these shards?")
                continue
            yield item[0], item[1], skipped
            skipped = torch.zeros_like(skipped)
            last = time.monotonic()


def collate(samples: list) -> tuple[torch.Tensor | list[bytes], torch.Tensor, torch.Tensor]:
    images, labels, skipped = zip(*samples)
    images = list(images) if isinstance(images[0], bytes) else torch.stack(images)
    return images, torch.tensor(labels, dtype=torch.long), torch.stack(skipped).sum(0)


class DeviceCrops:
    """Batches of encoded images (a `gpu_decode` pipeline's) -> the train transform's tensors on `device`.

    The batch decodes at once (`decode.decode_batch`: nvJPEG on CUDA, PIL on the CPU for members it
    refuses) and each image is cropped there (`decode.TensorTrainCrop`). A member that decodes nowhere
    is skipped and counted as "undecodable", as the CPU workers count it; its place in the batch takes
    another crop of a decodable member, so every rank's micro batch keeps its size (the prototype layer
    gathers without exchanging sizes).
    """

    def __init__(self, image_size: int, device: torch.device | str, augment: Augment = Augment()):
        self.crop, self.device = TensorTrainCrop(image_size, open_clip.OPENAI_DATASET_MEAN,
                                                 open_clip.OPENAI_DATASET_STD, augment), torch.device(device)

    def __call__(self, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        datas, labels, skipped = batch
        images, _ = decode_batch(datas, self.device)
        good = [i for i, image in enumerate(images) if image is not None]
        if not good:
            raise LabelError(f"none of the {len(datas)} images of a micro batch decodes, on the GPU nor with PIL; "
                             "the shards hold no images this loader can read")
        order = (good * (len(datas) // len(good) + 1))[: len(datas)]  # refill: decodable members again
        skipped = skipped.clone()
        skipped[SKIP_REASONS.index("undecodable")] += len(datas) - len(good)
        crops = torch.stack([self.crop(images[i]) for i in order])
        return crops, labels[order].to(self.device, non_blocking=True), skipped


def shard_fault(exn: Exception) -> bool:
    """webdataset's handler: a damaged tar is warned about and skipped; a shard that is gone or unreadable stops
    the job (resampling would otherwise warn about it for ever, every GPU of the allocation waiting)."""
    if isinstance(exn, (FileNotFoundError, PermissionError, IsADirectoryError)):
        raise LabelError(f"shard unreadable while training: {exn}; data.shards names files that are gone") from exn
    return wds.warn_and_continue(exn)


def _worker_seed(rank: int) -> int:
    info = torch.utils.data.get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def pipeline(urls: list[str], source: LabelSource, image_size: int, batch_size: int, *, seed: int,
             rank: int, batches_per_worker: int, shuffle: int = 1000, timeout_s: float = 600.0,
             gpu_decode: bool = False, augment: Augment = Augment()) -> wds.DataPipeline:
    """Full batches (images, labels, skipped[no_label, undecodable]) of one rank, `batches_per_worker` each;
    with `gpu_decode` the images are a list of their encoded bytes."""
    return wds.DataPipeline(
        wds.ResampledShards(urls, seed=seed, worker_seed=partial(_worker_seed, rank), deterministic=True),
        wds.tarfile_to_samples(handler=shard_fault),
        # webdataset seeds an unseeded buffer from the pid and the clock: the same run seed must draw the same run
        wds.shuffle(shuffle, initial=min(shuffle, 100), seed=hash((seed, rank)) & 0x7FFFFFFF),
        LabelJoin(source, None if gpu_decode else train_transform(image_size, augment), timeout_s=timeout_s),
        wds.batched(batch_size, collation_fn=collate, partial=False),
    ).with_epoch(batches_per_worker)


def epoch_batches(urls: list[str], source: LabelSource, image_size: int, batch_size: int, num_batches: int,
                  *, seed: int, rank: int, workers: int = 0, timeout_s: float = 600.0,
                  decode_on: torch.device | None = None, augment: Augment = Augment()) -> Iterator:
    """Exactly `num_batches` micro-batches for this rank (the same count on every rank); with `decode_on`
    the workers only read the images, which decode and crop on that device (`DeviceCrops`). The crops
    follow `augment` (the train stage: the run's train.augment keys)."""
    workers = max(0, int(workers))
    per_worker = math.ceil(num_batches / max(1, workers))
    data = pipeline(urls, source, image_size, batch_size, seed=seed, rank=rank, batches_per_worker=per_worker,
                    timeout_s=timeout_s, gpu_decode=decode_on is not None, augment=augment)
    loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=workers,
                                         persistent_workers=False, pin_memory=torch.cuda.is_available())
    batches = islice(loader, num_batches)
    return batches if decode_on is None else map(DeviceCrops(image_size, decode_on, augment), batches)
