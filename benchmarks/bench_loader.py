"""Images/s per rank that the train loader delivers, against the step rate a GPU sustains.

    python benchmarks/bench_loader.py                          # workers 1 2, 224 px, batch 64, CPU
    python benchmarks/bench_loader.py --workers 4 8 16 --batch 256 --device cuda --step-rate 4700

Real-size photos: the scikit-image photos, longer side scaled to --side (500: about LAION's
500 x 400), re-encoded as JPEG quality 90, written into webdataset tars with labels and keys laid
out as the cluster stage leaves them. The loader is the train stage's own
(`unicom_ds.train_data.epoch_batches`: resampled shards, shuffle, label join, decode drafted to the
crop, RandomResizedCrop, flip, normalise, collate) with N DataLoader workers; with --device cuda each
batch is also copied to the GPU (pinned, non-blocking) as the train step does. The first batches
(worker start-up, shuffle buffer) are left out of the rate. --step-rate is the GPU's img/s for
the model (bench_train_step.py) to print the ratio against.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from webdataset import TarWriter

from bench_decode import photo_jpegs
from unicom_ds import train_data
from unicom_ds.continuation import LabelSource


def make_shards(root: Path, n: int, per_shard: int, side: int, classes: int = 1000) -> tuple[list[str], LabelSource]:
    jpegs = photo_jpegs(side)
    run = root / "run"
    (run / "labels").mkdir(parents=True)
    (run / "embed").mkdir()
    rng = np.random.default_rng(0)
    urls = []
    for s in range((n + per_shard - 1) // per_shard):
        stem, keys = f"{s:05d}", [f"{s:05d}{i:05d}" for i in range(min(per_shard, n - s * per_shard))]
        with open(root / f"{stem}.tar", "wb") as f:
            sink = TarWriter(f, mtime=0.0)
            for i, key in enumerate(keys):
                sink.write({"__key__": key, "jpg": jpegs[(s * per_shard + i) % len(jpegs)], "txt": "a photo"})
            sink.close()
        (run / "embed" / f"{stem}.keys.txt").write_text("".join(k + "\n" for k in keys))
        np.save(run / "labels" / f"{stem}.npy", rng.integers(0, classes, len(keys)))
        urls.append(str(root / f"{stem}.tar"))
    return urls, LabelSource(run, run / "embed")


def rate(urls, source, args, workers: int, device: torch.device) -> float:
    warm = max(2, workers)  # every worker's first batch carries its start-up
    batches = train_data.epoch_batches(urls, source, args.image_size, args.batch, warm + args.batches,
                                       seed=0, rank=0, workers=workers)
    n, start = 0, None
    for i, (images, labels, _) in enumerate(batches):
        if device.type == "cuda":
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        if i == warm - 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        elif i >= warm:
            n += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=20, help="timed batches per setting")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--side", type=int, default=500, help="longer side of the photos in the shards")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--step-rate", type=float, default=None, help="the GPU's training img/s to compare with")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        urls, source = make_shards(Path(tmp), args.samples, 500, args.side)
        print(f"# {os.cpu_count()} CPUs visible, {args.samples} photos of longer side {args.side} (JPEG q90) in "
              f"{len(urls)} shards, batch {args.batch}, {args.image_size} px, device {device}")
        print("| workers | img/s per rank | img/s per worker |" + (" x step rate |" if args.step_rate else ""))
        print("|---|---|---|" + ("---|" if args.step_rate else ""))
        for workers in args.workers:
            ips = rate(urls, source, args, workers, device)
            ratio = f" {ips / args.step_rate:.3f} |" if args.step_rate else ""
            print(f"| {workers} | {ips:.0f} | {ips / max(1, workers):.0f} |{ratio}", flush=True)


if __name__ == "__main__":
    main()
