"""Embed stage throughput vs the same model's forward pass alone (target: stage >= 0.8 x forward).

    python benchmarks/bench_embed.py                       # ViT-B-32 @224, random weights, CPU
    python benchmarks/bench_embed.py --device cuda --n 4096 --batch-size 256 --workers 8

Both sides use one loaded model. Forward-only encodes pre-decoded, pre-tokenised batches (the same
`encode` the stage calls); the stage reads a webdataset tar of JPEGs (skimage photos, augmented, 256 px),
decodes, tokenises, encodes and writes its files. Model loading is outside both timings.
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from webdataset import TarWriter

from cluster_job import embed
from cluster_job import demo_data
from unicom_ds.config import resolve


def make_shard(path: Path, n: int, size: int) -> list[tuple[bytes, str]]:
    photos = demo_data.samples(copies=max(1, n // len(demo_data.PHOTOS)), seed=0, size=size)
    rows = [(demo_data.jpeg(s["img"]), s["caption"]) for s in (photos * (n // len(photos) + 1))[:n]]
    with open(path, "wb") as f:
        sink = TarWriter(f, mtime=0.0)
        for i, (jpg, txt) in enumerate(rows):
            sink.write({"__key__": f"{i:09d}", "jpg": jpg, "txt": txt})
        sink.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n", type=int, default=128, help="images in the shard")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="decode workers of the stage")
    ap.add_argument("--size", type=int, default=256, help="shorter side of the stored JPEGs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_"))
    rows = make_shard(tmp / "00000.tar", a.n, a.size)
    model, preprocess, tokenizer = embed.load_clip(a.model, "random", device)

    images = [preprocess(Image.open(io.BytesIO(j)).convert("RGB")) for j, _ in rows]
    batches = [(torch.stack(images[i:i + a.batch_size]), tokenizer([t for _, t in rows[i:i + a.batch_size]]))
               for i in range(0, a.n, a.batch_size)]
    embed.encode(model, *batches[0], device)  # warm-up (allocations, cuDNN/oneDNN kernel choice)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for imgs, toks in batches:
        embed.encode(model, imgs, toks, device)
    sync()
    forward_s = time.perf_counter() - t0

    cfg = resolve([f"run_dir={tmp / 'run'}", f"clip.model={a.model}", "clip.pretrained=random",
                   f"embed.batch_size={a.batch_size}", f"embed.workers={a.workers}", f"device={a.device}",
                   "progress=off"])
    t0 = time.perf_counter()
    done = embed.embed_shard(cfg, str(tmp / "00000.tar"), model, preprocess, tokenizer, device)
    stage_s = time.perf_counter() - t0
    assert done["n"] == a.n, done

    fwd, stage = a.n / forward_s, a.n / stage_s
    print(f"\n{a.model} @{model.visual.image_size[0]}, random weights, {device.type}, n={a.n}, "
          f"batch={a.batch_size}, workers={a.workers}, torch threads={torch.get_num_threads()}, "
          f"cpus={os.cpu_count()}\n")
    print("| measure | images/s |\n| --- | --- |")
    print(f"| forward only (encode_image + encode_text) | {fwd:.1f} |")
    print(f"| embed stage (read tar, decode, tokenise, encode, write) | {stage:.1f} |")
    print(f"| ratio stage / forward (target >= 0.8) | {stage / fwd:.2f} |")


if __name__ == "__main__":
    main()
