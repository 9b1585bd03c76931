"""Reading img2dataset-style webdataset shards row by row, telling apart every way a row can be bad.

webdataset's own pipeline drops or raises on a bad sample; here each row comes out with a reason
(missing image, missing caption, corrupt image, duplicate key) so the embed stage can count it, and a
damaged tar (truncated, unreadable) ends the shard with the rows read so far plus a description of the
fault. A read that fails with OSError is retried a few times first: network file systems report
passing trouble that way, and only an error that persists counts as damage.
"""
from __future__ import annotations

import sys
import tarfile
import time
from collections import Counter
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_iterator

from unicom_ds.decode import needed_size, open_for

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


READ_ATTEMPTS = 4        # one read + 3 retries
RETRY_BACKOFF_S = 0.5    # doubled after each failed attempt: 0.5 s, 1 s, 2 s


def stats_path(path: str) -> Path:
    """img2dataset's `S_stats.json` beside shard `S.tar` (its "successes" is the shard's sample count)."""
    return Path(path).with_name(Path(path).name.split(".")[0] + "_stats.json")


def _open_raw(path: str) -> BinaryIO:
    return open(path, "rb")


def _retried(what: str, call: Callable):
    """call(), tried READ_ATTEMPTS times while it raises OSError, with a doubling backoff in between."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return call()
        except OSError as exn:
            if attempt == READ_ATTEMPTS:
                raise
            wait = RETRY_BACKOFF_S * 2 ** (attempt - 1)
            print(f"{what}: {type(exn).__name__}: {exn}; retry {attempt}/{READ_ATTEMPTS - 1} in {wait:g}s",
                  file=sys.stderr, flush=True)
            time.sleep(wait)


class RetryingReader:
    """A binary file whose open, read and seek are retried on OSError (see module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.f = _retried(f"open {path}", lambda: _open_raw(path))

    def read(self, size: int = -1) -> bytes:
        at = self.f.tell()
        return _retried(f"read {self.path} at byte {at}", lambda: self._read_at(at, size))

    def _read_at(self, at: int, size: int) -> bytes:
        self.f.seek(at)  # a failed attempt may have moved the position; within the buffer this costs nothing
        return self.f.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return _retried(f"seek {self.path}", lambda: self.f.seek(offset, whence))

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()

    def __enter__(self) -> "RetryingReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:  # webdataset appends the stream to its error messages
        return self.path


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
        try:
            with RetryingReader(self.path) as f:
                files = ({**s, "__url__": self.path} for s in tar_file_iterator(f, handler=self._handler))
                yield from group_by_keys(files)
        except (tarfile.TarError, OSError, EOFError) as exn:  # raised opening the stream or reading a header
            self._handler(exn)
        if self.fault is None:
            try:
                self.fault = missing_end_marker(self.path)
            except OSError as exn:
                self._handler(exn)


def missing_end_marker(path: str) -> str | None:
    """Python's tarfile ends quietly when a tar stops at a header; a complete tar ends in zero blocks."""
    with RetryingReader(path) as f:
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


class ShardBatches(IterableDataset):
    """Decoded, tokenised batches of one shard, in tar order.

    With W DataLoader workers every worker reads the tar (cheap: headers and bytes) but decodes only
    batches j with j % W == its id; the DataLoader takes workers round-robin, so batches arrive in tar
    order. Each worker ends with a record {"end": True, "fault": the tar's fault or None}.
    """

    def __init__(self, path: str, batch_size: int, preprocess: Callable, tokenizer: Callable, raw_images: bool = False):
        self.path, self.batch_size = path, int(batch_size)
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.raw_images = raw_images  # leave decoding to the consumer (on a GPU): batches carry "raw" bytes
        self.need = needed_size(preprocess)  # JPEGs decode at the smallest scale its Resize still needs

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
        yield {"end": True, "fault": samples.fault}

    def _decode(self, chunk: list) -> dict:
        keys, images, captions, skipped = [], [], [], Counter()
        for key, data, caption, reason in chunk:
            if reason is None and self.raw_images:
                images.append(data)
            elif reason is None:
                try:
                    images.append(self.preprocess(open_for(data, self.need)))
                except Exception:  # PIL raises many types for broken files; all mean the same here
                    reason = "corrupt_image"
            if reason is not None:
                skipped[reason] += 1
                continue
            keys.append(key)
            captions.append(caption)
        batch = {"keys": keys, "skipped": dict(skipped)}
        if keys:
            batch["raw" if self.raw_images else "images"] = images if self.raw_images else torch.stack(images)
            batch["tokens"] = self.tokenizer(captions)
        return batch
