"""Forward+backward time and peak memory of ShardedPrototypes against k and r1, on one process.

    python benchmarks/bench_prototypes.py                      # CPU: batch 128, dim 512
    python benchmarks/bench_prototypes.py --device cuda --batch 1024 --dim 768

Compared with a dense linear layer + cross-entropy over all k classes. Target: at k = 1M,
r1 = 0.1 costs <= 0.25x of r1 = 1.0. Peak memory is what one step adds on top of the live
tensors (weight, inputs): CUDA allocator peak on a GPU, peak RSS (VmHWM, reset through
/proc/self/clear_refs) on the CPU, where the script re-runs itself with glibc's
MALLOC_MMAP_THRESHOLD_=1 MiB so that freed tensors leave the RSS instead of hiding in the heap.
"""
from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unicom_ds.prototypes import ShardedPrototypes

_STATUS = Path("/proc/self/status")


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", _STATUS.read_text()).group(1))


class PeakMemory:
    """Peak bytes allocated inside the block beyond what was live when it started."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.base = _rss_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss_kb("VmHWM") * 1024 - self.base


def measure(step, params, device: torch.device, warmup: int, repeats: int) -> tuple[float, int]:
    """Fastest seconds of `step()` (forward+backward) over `repeats`, and its peak extra memory.

    The minimum, not the mean: on a shared machine other load only ever adds time.
    """
    def clear():
        for p in params:
            p.grad = None  # as optimizer.zero_grad(): the grad buffer is part of each step

    for _ in range(warmup):
        clear()
        step()
    clear()
    times = []
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            clear()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return min(times), mem.peak


def bench_layer(k, r1, args, device):
    layer = ShardedPrototypes(k, args.dim, r1=r1, r2=1.0).to(device)
    emb = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, k, (args.batch,), device=device)

    def step():
        layer(emb, labels).backward()
        layer.advance()

    return measure(step, [layer.weight, emb], device, args.warmup, args.repeats)


def bench_dense(k, args, device):
    linear = torch.nn.Linear(args.dim, k, bias=False).to(device)
    emb = torch.randn(args.batch, args.dim, device=device, requires_grad=True)
    labels = torch.randint(0, k, (args.batch,), device=device)

    def step():
        F.cross_entropy(linear(emb), labels).backward()

    return measure(step, [linear.weight, emb], device, args.warmup, args.repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ks", default="10000,100000,1000000")
    parser.add_argument("--r1s", default="1.0,0.3,0.1")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    r1s = [float(r) for r in args.r1s.split(",")]

    print(f"device={device} batch={args.batch} dim={args.dim} threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (fastest)\n")
    print("| k | layer | fwd+bwd ms | peak extra MiB | time vs r1=1.0 |")
    print("| ---: | --- | ---: | ---: | ---: |")
    ratios = {}
    for k in ks:
        rows = [(f"r1={r1}", *bench_layer(k, r1, args, device)) for r1 in r1s]
        rows.append(("dense linear + CE", *bench_dense(k, args, device)))
        full = dict((name, t) for name, t, _ in rows).get("r1=1.0")
        for name, seconds, peak in rows:
            ratio = f"{seconds / full:.3f}" if full else "-"
            print(f"| {k:,} | {name} | {seconds * 1e3:.1f} | {peak / 2**20:.0f} | {ratio} |", flush=True)
            if name == "r1=0.1" and full:
                ratios[k] = seconds / full
        gc.collect()
    for k, ratio in ratios.items():
        verdict = "meets" if ratio <= 0.25 else "MISSES"
        print(f"\nk={k:,}: r1=0.1 / r1=1.0 = {ratio:.3f} ({verdict} the <= 0.25 target)")


if __name__ == "__main__":
    main()
