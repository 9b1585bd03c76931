"""Helpers for cluster-stage tests: small real webdataset tars, and RUN/embed shards written directly,
without a CLIP model."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

from unicom_ds.atomic import write_json_atomic

CLIP = {"clip.model": "ViT-Tiny-16", "clip.pretrained": "random", "seed": 0}  # random weights: seeded


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embedded(run_dir, stem: str, img: np.ndarray, txt: np.ndarray, clip: dict = CLIP,
                   shard: str | None = None) -> list[str]:
    """The four RUN/embed files of one shard as the embed stage writes them (from input `shard`, by
    default /data/S.tar); returns the keys."""
    out = Path(run_dir) / "embed"
    out.mkdir(parents=True, exist_ok=True)
    keys = [f"{stem}{i:04d}" for i in range(len(img))]
    np.save(out / f"{stem}.img.npy", unit(img).astype(np.float16))
    np.save(out / f"{stem}.txt.npy", unit(txt).astype(np.float16))
    (out / f"{stem}.keys.txt").write_text("".join(k + "\n" for k in keys))
    write_json_atomic(out / f"{stem}.done.json", {"n": len(img), "skipped": {}, "damaged": None,
                                                  "config": {**clip, "data.shard": shard or f"/data/{stem}.tar"}})
    return keys


def blobs(centers: np.ndarray, per: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`per` noisy points around each center, shuffled; returns (points, true group of each)."""
    truth = np.repeat(np.arange(len(centers)), per)
    rng.shuffle(truth)
    return centers[truth] + noise * rng.standard_normal((len(truth), centers.shape[1])), truth


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path, samples) -> str:
    with open(path, "wb") as f:
        sink = TarWriter(f, mtime=0.0)
        for s in samples:
            sink.write(s)
        sink.close()
    return str(path)


def good(i: int) -> dict:
    return {"__key__": f"k{i:03d}", "jpg": jpeg(i), "txt": f"caption number {i}", "json": "{}"}


def member_offsets(path) -> dict[str, tuple[int, int]]:
    """{member name: (header offset, data offset)} of a tar."""
    with tarfile.open(path) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}
