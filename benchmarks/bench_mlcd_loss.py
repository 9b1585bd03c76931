"""Forward+backward time and peak memory of MLCDPrototypes (l = 1 and l = 8) against ShardedPrototypes, and
of one rank's share of MLCD at the paper's scale.

    python benchmarks/bench_mlcd_loss.py                      # CPU, one process: batch 128, dim 512, r1 0.1
    python benchmarks/bench_mlcd_loss.py --device cuda --ks 1000000
    python benchmarks/bench_mlcd_loss.py --paper --rows 1024,2048,4096 --dim 1024

--paper: one rank of --ranks holding its block of --k classes (k / ranks) scores --rows rows of the global
batch, each with --l labels uniform over k (those of other ranks' blocks are the -1 this rank sees), then
the projection to --full-rows rows (the paper: k = 1M, 32,768 x 8 labels, 8 ranks' blocks of 125,000): time
and peak memory fitted as a fixed part plus a part per logit entry (rows x slots), slots as the layer sizes
them (min(block, rows * l + ceil(r1 * block))). No collectives: one process is one rank.

Timing and peak memory as benchmarks/bench_prototypes.py (fastest of the repeats; peak extra memory
over the live tensors: CUDA allocator peak, or peak RSS on the CPU, where the script re-runs itself
with MALLOC_MMAP_THRESHOLD_ so freed tensors leave the RSS). Labels are uniform random class ids.
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import sys

import numpy as np
import torch

from bench_prototypes import measure  # benchmarks/ is on sys.path when the script runs
from unicom_ds.margin import fraction_count
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


def slots_of(rows: int, args) -> int:
    """The layer's slots for one rank's block: room for every label of the global batch plus r1's sample."""
    block = args.k // args.ranks
    return min(block, rows * args.l + fraction_count(args.r1, block))


def bench_rank(rows: int, args, device):
    """One rank's forward+backward at `rows` rows: (seconds, peak bytes, slots, positives, sampled negatives)."""
    block = args.k // args.ranks
    layer = MLCDPrototypes(block, args.dim, r1=args.r1).to(device)
    labels = torch.randint(0, args.k, (rows, args.l), device=device)
    labels = torch.where(labels < block, labels, -1)  # this rank is block 0: the other ranks' classes pad
    emb = torch.randn(rows, args.dim, device=device, requires_grad=True)

    def step():
        layer(emb, labels).backward()
        layer.advance()

    seconds, peak = measure(step, [layer.weight, emb], device, args.warmup, args.repeats)
    stats = layer.last_stats
    return seconds, peak, layer._slots[0].numel(), stats["positives"], stats["selected_classes"] - stats["positives"]


def paper(args, device) -> None:
    block = args.k // args.ranks
    print(f"device={device} k={args.k:,} ranks={args.ranks} (block {block:,}) l={args.l} dim={args.dim} r1={args.r1} "
          f"threads={torch.get_num_threads()} repeats={args.repeats} (fastest)\n")
    print("| rows (global batch) | slots | positives | sampled negatives | fwd+bwd s | peak extra MiB | bytes / logit |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    entries, seconds, peaks = [], [], []
    for rows in (int(v) for v in args.rows.split(",")):
        t, peak, slots, positives, negatives = bench_rank(rows, args, device)
        entries.append(rows * slots)
        seconds.append(t)
        peaks.append(peak)
        print(f"| {rows:,} | {slots:,} | {positives:,} | {negatives:,} | {t:.2f} | {peak / 2**20:,.0f} | "
              f"{peak / (rows * slots):.1f} |", flush=True)
        gc.collect()
    # Least squares: a fixed part (the block's gradient and optimizer-sized buffers) plus one per logit entry.
    (t_entry, t0), (m_entry, m0) = (np.polyfit(entries, y, 1) for y in (seconds, peaks))
    full = args.full_rows
    slots = slots_of(full, args)
    positives = block * (1 - math.exp(-full * args.l / args.k))  # expected distinct labels in the block
    print(f"\nfit: {t_entry * 1e9:.3f} s per 1e9 logit entries + {t0:.2f} s; {m_entry:.1f} bytes per entry + "
          f"{m0 / 2**20:,.0f} MiB")
    print(f"projected, {full:,} rows: slots {slots:,}, about {positives:,.0f} positives and "
          f"{args.r1 * (block - positives):,.0f} sampled negatives, {full * slots / 1e9:.2f}e9 logit entries: "
          f"{t0 + t_entry * full * slots:,.0f} s, {(m0 + m_entry * full * slots) / 2**30:,.1f} GiB")


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
    parser.add_argument("--paper", action="store_true", help="one rank's share at the paper's scale (see above)")
    parser.add_argument("--k", type=int, default=1_000_000)
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--l", type=int, default=8)
    parser.add_argument("--rows", default="1024,2048,4096", help="global-batch rows measured")
    parser.add_argument("--full-rows", type=int, default=32768, help="global-batch rows projected to")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.paper:
        return paper(args, device)
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
