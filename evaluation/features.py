"""Batched feature extraction with a DataLoader, cached as .npy per model and data set.

- `ImageFiles(paths, transform)`: a Dataset of image files -> transformed tensors (an unreadable
  image is an error naming the file: every row must have its feature).
- `extract(model, dataset, batch_size, workers, device, rank=0, world=1)` -> float32 [rows, d], the
  raw model outputs (not normalised) for this rank's contiguous block of rows (`shard_rows`), so
  the ranks' blocks concatenated in rank order are the data set in order. fp16 autocast on CUDA.
  Progress counts images under `desc` (the eval job names the model and the data set). On CUDA,
  an ImageFiles whose transform has a tensor version (`decode.TensorPreprocess`) is decoded and
  resized there (nvJPEG, PIL per file where nvJPEG refuses); the workers only read the files.
- `features_path(run_dir, model, dataset)` -> RUN/eval/features/MODEL/DATASET.npy.
- `cached_extract(path, model, dataset, ...)` (dataset: an ImageFiles, or any Dataset with a
  `paths` list) -> the whole data set's features: read from `path`
  when cached, else extracted and saved (atomically, with `path`.json holding the image list's
  fingerprint, written last). A cache made from another image list is refused. With world > 1,
  every rank calls it inside an initialised torch.distributed group: each extracts its block into
  a part file, rank 0 joins the parts, every rank returns the whole array. A rerun keeps finished
  parts.
"""
from __future__ import annotations

import contextlib
import hashlib
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from unicom_ds.arrays import torch_device
from unicom_ds.atomic import read_json, save_npy_atomic, write_json_atomic
from unicom_ds.decode import TensorPreprocess, decode_batch, draft, needed_size
from unicom_ds.progress import progress

from evaluation.files import array_row, read_cifar_batch


class ImageFiles(Dataset):
    def __init__(self, paths: Sequence[str], transform: Callable):
        self.paths = list(paths)
        self.transform = transform
        self.need = needed_size(transform)  # JPEGs decode at the smallest scale its Resize still needs
        self._batches: dict[str, np.ndarray] = {}  # CIFAR batches read so far (per worker)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        if (row := array_row(self.paths[i])) is not None:
            if row[0] not in self._batches:
                self._batches[row[0]] = read_cifar_batch(row[0])[0]
            return self.transform(Image.fromarray(self._batches[row[0]][row[1]]))
        try:
            with Image.open(self.paths[i]) as image:
                if self.need is not None:
                    draft(image, self.need(image.size))
                return self.transform(image.convert("RGB"))
        except OSError as e:
            raise OSError(f"{self.paths[i]}: cannot read image ({e})") from e


class FileBytes(Dataset):
    """(path, bytes) of image files, for decoding on the device."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, bytes]:
        try:
            with open(self.paths[i], "rb") as f:
                return self.paths[i], f.read()
        except OSError as e:
            raise OSError(f"{self.paths[i]}: cannot read image ({e})") from e


def device_preprocess(dataset: Dataset, device: torch.device) -> TensorPreprocess | None:
    """The dataset's preprocess as tensor operations where its images decode on the device (an
    ImageFiles on CUDA whose transform has a tensor version), else None."""
    if device.type != "cuda" or not isinstance(dataset, ImageFiles) or any(map(array_row, dataset.paths[:1])):
        return None
    try:
        return TensorPreprocess(dataset.transform)
    except ValueError:
        return None


def decode_on(files: list[tuple[str, bytes]], tensor_pre: TensorPreprocess, device: torch.device) -> torch.Tensor:
    """A batch of image files decoded (nvJPEG, PIL fallback per file) and preprocessed on `device`."""
    images, _ = decode_batch([data for _, data in files], device)
    for (path, _), image in zip(files, images):
        if image is None:
            raise OSError(f"{path}: cannot read image (undecodable)")
    return torch.stack([tensor_pre(image) for image in images])


def shard_rows(n: int, rank: int, world: int) -> np.ndarray:
    """Rank `rank`'s contiguous block of rows 0..n-1 (blocks differ in size by at most one)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return np.array_split(np.arange(n), world)[rank]


def _autocast(device: torch.device):
    # Half precision only where it is fast and safe (CUDA); CPU stays fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def extract(model: torch.nn.Module, dataset: Dataset, batch_size: int = 256, workers: int = 8,
            device: str = "auto", rank: int = 0, world: int = 1, progress_mode: str = "auto",
            desc: str = "features") -> np.ndarray:
    device = torch_device(device)
    rows = shard_rows(len(dataset), rank, world)
    tensor_pre = device_preprocess(dataset, device)
    if tensor_pre is None:
        loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, num_workers=workers,
                            shuffle=False, pin_memory=device.type == "cuda")
        batches = (images.to(device, non_blocking=True) for images in loader)
    else:  # workers only read the files; the batch decodes and resizes on the device
        loader = DataLoader(Subset(FileBytes(dataset.paths), rows.tolist()), batch_size=batch_size,
                            num_workers=workers, shuffle=False, collate_fn=list)
        batches = (decode_on(files, tensor_pre, device) for files in loader)
    model = model.to(device).eval()
    out = []

    def per_image():  # one item per image extracted, so progress counts (and rates) images
        for images in batches:
            with _autocast(device):
                out.append(model(images).float().cpu())
            yield from range(len(images))

    for _ in progress(per_image(), total=len(rows), desc=f"{desc}, rank {rank} of {world}", mode=progress_mode,
                      unit="image"):
        pass
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy()


def features_path(run_dir, model_name: str, dataset_name: str) -> Path:
    """RUN/eval/features/MODEL/DATASET.npy with characters unsafe in file names replaced by '_'."""
    safe = lambda s: re.sub(r"[^A-Za-z0-9._@+-]", "_", s)  # noqa: E731
    return Path(run_dir) / "eval" / "features" / safe(model_name) / f"{safe(dataset_name)}.npy"


def fingerprint(paths: Sequence[str]) -> str:
    return hashlib.sha1("\n".join(map(str, paths)).encode()).hexdigest()


def _part(path: Path, key: str, rank: int, world: int) -> Path:
    # The fingerprint in the name keeps parts of another image list from ever being joined.
    return path.with_name(f"{path.stem}.{key[:12]}.part{rank}-of-{world}.npy")


def _cached(path: Path, key: str) -> bool:
    meta = path.with_suffix(".json")
    if not meta.is_file():
        return False
    recorded = read_json(meta)
    if recorded.get("fingerprint") != key:
        raise ValueError(f"{path}: cached features were made from another image list "
                         f"({recorded.get('n')} images, fingerprint {recorded.get('fingerprint')}); "
                         f"delete {path} and {meta} to extract again")
    return True


def cached_extract(path, model: torch.nn.Module, dataset: ImageFiles, batch_size: int = 256,
                   workers: int = 8, device: str = "auto", rank: int = 0, world: int = 1,
                   progress_mode: str = "auto", desc: str = "features") -> np.ndarray:
    path = Path(path)
    key = fingerprint(dataset.paths)
    if not _cached(path, key):
        part = _part(path, key, rank, world)
        if not part.is_file():
            save_npy_atomic(part, extract(model, dataset, batch_size, workers, device, rank, world, progress_mode,
                                          desc))
        _barrier(world)
        if rank == 0:
            parts = [_part(path, key, r, world) for r in range(world)]
            blocks = [np.load(p) for p in parts]
            save_npy_atomic(path, np.concatenate([b for b in blocks if len(b)]))  # a rank may get no rows
            write_json_atomic(path.with_suffix(".json"), {"n": len(dataset), "fingerprint": key})
            for p in parts:
                p.unlink()
        _barrier(world)
    return np.load(path)


def _barrier(world: int) -> None:
    if world == 1:
        return
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError(f"cached_extract with world={world} needs an initialised torch.distributed group")
    torch.distributed.barrier()
