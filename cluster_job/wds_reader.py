"""Reading img2dataset-style webdataset shards row by row, telling apart every way a row can be bad.

webdataset's own pipeline drops or raises on a bad sample; here each row comes out with a reason
(missing image, missing caption, corrupt image, duplicate key) so the embed stage can count it, and a
truncated tar ends the shard with the rows read so far plus a description of the fault.
"""
from __future__ import annotations

import io
import tarfile
from collections import Counter
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class TarSamples:
    """The webdataset samples ({"__key__", "jpg", "txt", ...}) of one tar; `fault` is set after iterating."""

    def __init__(self, path: str):
        self.path = path
        self.fault: str | None = None

    def _handler(self, exn: Exception) -> bool:
        self.fault = f"{type(exn).__name__}: {exn}"
        return False  # stop reading: nothing after a broken member can be trusted

    def __iter__(self) -> Iterator[dict]:
        self.fault = None
        with open(self.path, "rb") as f:
            try:
                files = ({**s, "__url__": self.path} for s in tar_file_iterator(f, handler=self._handler))
                yield from group_by_keys(files)
            except (tarfile.TarError, OSError, EOFError) as exn:  # raised opening the stream
                self._handler(exn)
        if self.fault is None:
            self.fault = missing_end_marker(self.path)


def missing_end_marker(path: str) -> str | None:
    """Python's tarfile ends quietly when a tar stops at a header; a complete tar ends in zero blocks."""
    with open(path, "rb") as f:
        head = f.read(2)
        if head == b"\x1f\x8b":  # gzip: the end marker is inside the compressed stream
            return None
        size = f.seek(0, 2)
        if size % 512:
            return f"truncated: {size} bytes is not a whole number of 512-byte tar blocks"
        f.seek(max(0, size - 512))
        if any(f.read(512)):
            return f"truncated: no end-of-archive marker (file ends at byte {size})"
    return None


def classify(sample: dict) -> tuple[str, bytes | None, str | None, str | None]:
    """(key, image bytes, caption, reason to skip or None) of one webdataset sample."""
    key = sample["__key__"]
    image = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    caption = sample.get("txt")
    caption = caption.decode("utf-8", errors="replace").strip() if caption is not None else ""
    if image is None:
        return key, None, None, "missing_image"
    if not caption:
        return key, None, None, "missing_caption"
    return key, image, caption, None


def rows(samples: TarSamples) -> Iterator[tuple[str, bytes | None, str | None, str | None]]:
    """classify() over a tar; the sample cut by a fault is kept only if it already has image and caption."""
    seen: set[str] = set()
    pending = None
    for sample in samples:
        if pending is not None:
            yield pending
        key, image, caption, reason = classify(sample)
        if reason is None and key in seen:
            reason = "duplicate_key"
        seen.add(key)
        pending = (key, image, caption, reason)
    if pending is not None:
        if samples.fault and pending[3] in ("missing_image", "missing_caption"):
            pending = (pending[0], None, None, "truncated")
        yield pending


def decode_image(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()  # decode now, so a corrupt file fails here and not inside the transform
    return img.convert("RGB")


class ShardBatches(IterableDataset):
    """Decoded, tokenised batches of one shard, in tar order.

    With W DataLoader workers every worker reads the tar (cheap: headers and bytes) but decodes only
    batches j with j % W == its id; the DataLoader takes workers round-robin, so batches arrive in tar
    order. Each worker ends with a batch-less record carrying the tar's fault.
    """

    def __init__(self, path: str, batch_size: int, preprocess: Callable, tokenizer: Callable):
        self.path, self.batch_size = path, int(batch_size)
        self.preprocess, self.tokenizer = preprocess, tokenizer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        samples = TarSamples(self.path)
        chunk: list = []
        j = 0
        for row in rows(samples):
            chunk.append(row)
            if len(chunk) == self.batch_size:
                if j % nw == wid:
                    yield self._decode(chunk)
                chunk, j = [], j + 1
        if chunk and j % nw == wid:
            yield self._decode(chunk)
        yield {"keys": [], "skipped": {}, "fault": samples.fault}

    def _decode(self, chunk: list) -> dict:
        keys, images, captions, skipped = [], [], [], Counter()
        for key, data, caption, reason in chunk:
            if reason is None:
                try:
                    images.append(self.preprocess(decode_image(data)))
                except Exception:  # PIL raises many types for broken files; all mean the same here
                    reason = "corrupt_image"
            if reason is not None:
                skipped[reason] += 1
                continue
            keys.append(key)
            captions.append(caption)
        batch = {"keys": keys, "skipped": dict(skipped), "fault": None}
        if keys:
            batch["images"] = torch.stack(images)
            batch["tokens"] = self.tokenizer(captions)
        return batch
