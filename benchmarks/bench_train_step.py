"""The whole training step against the backbone's own forward+backward on the same batch.

    python benchmarks/bench_train_step.py --device cuda --model ViT-B-32 --batch 128 --classes 125000 --bf16
    python benchmarks/bench_train_step.py --device cpu --model ViT-Tiny-16 --batch 32 --classes 10000

One process (one GPU): `backbone` times the ViT forward+backward alone (loss = sum of the
embeddings); `backbone_adamw` adds the backbone's AdamW step, what training it with any loss costs;
`step` times what a rank does per optimizer step: forward, the prototype layer over `--classes`
rows (one rank's block) with r1/r2, backward, the backbone's and the prototypes' AdamW steps.
Target: step <= 1.10 x backbone. The modes run in alternating rounds (`--rounds`) so drift on a
shared machine hits all of them alike; each figure is the median over rounds. Prints one JSON
line per mode and round, then the summary. `--profile FILE` writes torch.profiler's table of one
profiled train step burst, sorted by device time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from unicom_ds import backbone
from unicom_ds.optim import adamw
from unicom_ds.prototypes import ShardedPrototypes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, steps: int, warmup: int, device: torch.device) -> tuple[float, float | None]:
    """(seconds per call, peak GPU memory MB or None on CPU) of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    return seconds, peak


def write_profile(fn, steps: int, device: torch.device, path: str) -> None:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="ViT-Tiny-16", choices=backbone.MODELS)
    ap.add_argument("--batch", type=int, default=32, help="images per step on this device")
    ap.add_argument("--classes", type=int, default=10000, help="prototype rows held by this rank")
    ap.add_argument("--r1", type=float, default=0.1)
    ap.add_argument("--r2", type=float, default=1.0)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the backbone (as the engine runs it)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--unfused", action="store_true", help="torch's default AdamW instead of the fused one train.py uses")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds over the modes")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--profile", default=None, help="write the profiler table of the train step here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    model = backbone.build(a.model, a.grad_checkpointing).to(device)
    layer = ShardedPrototypes(a.classes, backbone.embed_dim(a.model), r1=a.r1, r2=a.r2).to(device)
    opt = adamw(backbone.param_groups(model, 0.05), 1e-4, 0.05, fused=not a.unfused)
    proto_opt = adamw(layer.parameters(), 1e-4, 0.05, fused=not a.unfused)
    size = backbone.image_size(a.model)
    images = torch.randn(a.batch, 3, size, size, device=device)
    labels = torch.randint(0, a.classes, (a.batch,), device=device)

    def forward() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=a.bf16):
            return model(images)

    def backbone_only() -> None:
        forward().float().sum().backward()
        model.zero_grad(set_to_none=True)

    def backbone_adamw() -> None:
        forward().float().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def train_step() -> None:
        loss = layer(forward().float(), labels)
        loss.backward()
        opt.step()
        proto_opt.step()
        opt.zero_grad(set_to_none=True)
        proto_opt.zero_grad(set_to_none=True)
        layer.advance()

    modes = {"backbone": backbone_only, "backbone_adamw": backbone_adamw, "step": train_step}
    times, peaks = {name: [] for name in modes}, {}
    for r in range(a.rounds):
        for name, fn in modes.items():
            seconds, peaks[name] = measure(fn, a.steps, a.warmup, device)
            times[name].append(seconds)
            print(json.dumps({"mode": name, "round": r, "ms": round(seconds * 1e3, 2),
                              "images_per_s": round(a.batch / seconds, 1), "peak_mem_mb": peaks[name]}), flush=True)
    ms = {name: round(statistics.median(t) * 1e3, 2) for name, t in times.items()}
    if a.profile:
        write_profile(train_step, a.steps, device, a.profile)
    summary = {"model": a.model, "device": str(device), "bf16": a.bf16, "batch": a.batch, "classes": a.classes,
               "r1": a.r1, "r2": a.r2, "fused_adamw": not a.unfused,
               "overhead": round(ms["step"] / ms["backbone"] - 1, 4), "target": 0.10,
               "overhead_over_backbone_adamw": round(ms["step"] / ms["backbone_adamw"] - 1, 4), "ms": ms,
               "images_per_s": round(a.batch / ms["step"] * 1e3, 1), "peak_mem_mb": peaks["step"]}
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
