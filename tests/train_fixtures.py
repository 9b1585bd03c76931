"""A tiny run directory for the train stage: real webdataset tars of generated images, with the
cluster stage's files (embed/S.keys.txt, labels/S.npy, kmeans/summary.json) written beside them."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from webdataset import TarWriter

BROKEN = b"not an image"


def image_bytes(color: tuple[int, int, int], size: int, fmt: str) -> bytes:
    arr = np.zeros((size, size, 3), np.uint8) + np.array(color, np.uint8)
    arr[: size // 2, : size // 2] = 255 - arr[0, 0]  # a corner so crops differ
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def ds_config(path: Path, batch: int = 8, micro: int = 4, bf16: bool | None = True) -> Path:
    """A small ZeRO-2 config for 2-rank CPU runs (bf16=None: the key left out, train.precision decides)."""
    cfg = {"train_batch_size": batch, "train_micro_batch_size_per_gpu": micro, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 2, "elastic_checkpoint": True}, "steps_per_print": 10**6}
    if bf16 is not None:
        cfg["bf16"] = {"enabled": bf16}
    path.write_text(json.dumps(cfg))
    return path


def make_run(root: Path, sizes: list[int], k: int, *, unlabelled_every: int = 0, broken: tuple = (),
             size: int = 40) -> dict:
    """Shards root/data/{00000..}.tar of `sizes` samples; class of sample j of shard i = (7*i + j) % k.

    Every `unlabelled_every`-th sample is left out of keys.txt (no label); keys in `broken` hold bytes
    that are not an image. Returns {"shards": brace pattern, "run": run dir, "labels": {key: class}}.
    """
    data, run = root / "data", root / "run"
    for sub in ("embed", "labels", "kmeans"):
        (run / sub).mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    labels = {}
    for i, n in enumerate(sizes):
        stem, keys, classes = f"{i:05d}", [], []
        with TarWriter(str(data / f"{stem}.tar")) as sink:
            for j in range(n):
                key, label = f"{stem}{j:04d}", (7 * i + j) % k
                color = ((37 * label) % 256, (91 * label) % 256, (53 * label + 17) % 256)
                fmt = "PNG" if j % 2 else "JPEG"
                img = BROKEN if key in broken else image_bytes(color, size, fmt)
                sink.write({"__key__": key, "png" if fmt == "PNG" else "jpg": img, "txt": f"class {label}"})
                if unlabelled_every and j % unlabelled_every == unlabelled_every - 1:
                    continue
                keys.append(key)
                classes.append(label)
                labels[key] = label
        (run / "embed" / f"{stem}.keys.txt").write_text("".join(f"{key}\n" for key in keys))
        np.save(run / "labels" / f"{stem}.npy", np.array(classes, np.int64))
    (run / "kmeans" / "summary.json").write_text(json.dumps({"k": k, "d": 64, "mode": "joint"}))
    return {"shards": f"{data}/{{00000..{len(sizes) - 1:05d}}}.tar", "run": run, "labels": labels}
