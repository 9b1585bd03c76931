"""One Mask R-CNN training step (forward, backward, AdamW) on the ViTDet backbone: images/s and peak memory.

    python benchmarks/bench_detection.py --device cuda --model ViT-B-16 --size 1024 --batch 2 --window 14
    python benchmarks/bench_detection.py --device cuda --model ViT-B-16 --size 1024 --batch 2 --window 0
    python benchmarks/bench_detection.py --device cpu --model ViT-B-16 --size 256 --batch 2

Random-init backbone (the weights do not change the cost), synthetic images of `--size` px with
`--objects` random boxes and masks each, the detect stage's model (`evaluation.detection.backbone.
build_model`) with the config's heads. `--window 0` is global attention in every block, the choice
the window saves memory against. Prints one JSON line: seconds per step (median of `--rounds`),
images/s, peak memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS), and the
hours the paper's schedule (`--steps` x `--global-batch` images) takes on `--gpus` GPUs at that rate.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

from evaluation.detection.backbone import build_model, param_groups
from unicom_ds import backbone


def batch(n: int, size: int, objects: int, classes: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(n):
        xy = torch.rand(objects, 2, generator=g) * size * 0.7
        wh = (0.05 + torch.rand(objects, 2, generator=g) * 0.25) * size
        boxes = torch.cat([xy, xy + wh], 1).clamp(max=size - 1)
        masks = torch.zeros(objects, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        images.append(torch.rand(3, size, size, generator=g).to(device))
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, classes, (objects,), generator=g).to(device),
                        "masks": masks.to(device)})
    return images, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2, help="images per step on this one device")
    ap.add_argument("--window", type=int, default=14, help="0: global attention in every block")
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--objects", type=int, default=7, help="instances per image (COCO's mean is ~7)")
    ap.add_argument("--classes", type=int, default=81)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (the stage's detect.amp on GPUs)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=184375, help="the schedule's steps (ViTDet ViT-B)")
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--gpus", type=int, default=8)
    a = ap.parse_args()
    device = torch.device(a.device)
    vit = backbone.build(a.model)
    model = build_model(vit, a.classes, a.size, [0.5] * 3, [0.25] * 3, window_size=a.window,
                        channels=a.channels).to(device).train()
    opt = torch.optim.AdamW(param_groups(model, 1e-4, 0.1, 0.7))
    images, targets = batch(a.batch, a.size, a.objects, a.classes, device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
            loss = sum(model(images, targets).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(a.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(a.rounds):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    sec = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rate = a.batch / sec
    print(json.dumps({
        "model": a.model, "size": a.size, "batch": a.batch, "window": a.window, "channels": a.channels,
        "bf16": a.bf16, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "s_per_step": round(sec, 3), "images_per_s": round(rate, 2),
        "peak_mem_gb": round(peak, 2), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "schedule_hours": round(a.steps * a.global_batch / (rate * a.gpus) / 3600, 1),
        "schedule": f"{a.steps} steps x {a.global_batch} images on {a.gpus} x this device"}))


if __name__ == "__main__":
    main()
