"""Helpers for cluster-stage tests: RUN/embed shards written directly, without a CLIP model."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from unicom_ds.atomic import write_json_atomic

CLIP = {"clip.model": "ViT-Tiny-16", "clip.pretrained": "random"}


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embedded(run_dir, stem: str, img: np.ndarray, txt: np.ndarray, clip: dict = CLIP) -> list[str]:
    """The four RUN/embed files of one shard as the embed stage writes them; returns the keys."""
    out = Path(run_dir) / "embed"
    out.mkdir(parents=True, exist_ok=True)
    keys = [f"{stem}{i:04d}" for i in range(len(img))]
    np.save(out / f"{stem}.img.npy", unit(img).astype(np.float16))
    np.save(out / f"{stem}.txt.npy", unit(txt).astype(np.float16))
    (out / f"{stem}.keys.txt").write_text("".join(k + "\n" for k in keys))
    write_json_atomic(out / f"{stem}.done.json", {"n": len(img), "skipped": {}, "fault": None,
                                                  "config": {**clip, "data.shard": f"/data/{stem}.tar"}})
    return keys


def blobs(centers: np.ndarray, per: int, noise: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """`per` noisy points around each center, shuffled; returns (points, true group of each)."""
    truth = np.repeat(np.arange(len(centers)), per)
    rng.shuffle(truth)
    return centers[truth] + noise * rng.standard_normal((len(truth), centers.shape[1])), truth
