"""Forward+backward time and peak memory of MLCDPrototypes (l = 1 and l = 8) against ShardedPrototypes.

    python benchmarks/bench_mlcd_loss.py                      # CPU, one process: batch 128, dim 512, r1 0.1
    python benchmarks/bench_mlcd_loss.py --device cuda --ks 1000000

Timing and peak memory as benchmarks/bench_prototypes.py (fastest of the repeats; peak extra memory
over the live tensors: CUDA allocator peak, or peak RSS on the CPU, where the script re-runs itself
with MALLOC_MMAP_THRESHOLD_ so freed tensors leave the RSS). Labels are uniform random class ids.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

from bench_prototypes import measure  # benchmarks/ is on sys.path when the script runs
from unicom_ds.mlcd import MLCDPrototypes
from unicom_ds.prototypes import ShardedPrototypes


def bench(k, width, args, device):
    """width 0: the single-label layer; otherwise MLCD with `width` labels per image."""
    if width:
        layer = MLCDPrototypes(k, args.dim, r1=args.r1).to(device)
        labels = torch.randint(0, k, (args.batch, width), device=device)
    else:
        layer = ShardedPrototypes(k, args.dim, r1=args.r1).to(device)
        labels = torch.randint(0, k, (args.batch,), device=device)
    emb = torch.randn(args.batch, args.dim, device=device, requires_grad=True)

    def step():
        layer(emb, labels).backward()
        layer.advance()

    return measure(step, [layer.weight, emb], device, args.warmup, args.repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--r1", type=float, default=0.1)
    parser.add_argument("--ks", default="100000,1000000")
    parser.add_argument("--widths", default="1,8", help="labels per image of the MLCD runs")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    widths = [int(w) for w in args.widths.split(",")]
    print(f"device={device} batch={args.batch} dim={args.dim} r1={args.r1} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (fastest)\n")
    print("| k | layer | fwd+bwd ms | peak extra MiB | time vs single-label |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for k in (int(v) for v in args.ks.split(",")):
        base = None
        for width in [0, *widths]:
            seconds, peak = bench(k, width, args, device)
            base = base or seconds
            name = f"MLCD l={width}" if width else "single-label (ArcFace)"
            print(f"| {k:,} | {name} | {seconds * 1e3:.1f} | {peak / 2**20:.0f} | {seconds / base:.2f} |", flush=True)
            gc.collect()


if __name__ == "__main__":
    main()
