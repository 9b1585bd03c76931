"""How far the finetune recipes' lr and beta1 schedules sit from deepglint/unicom retrieval.py's as it runs.

retrieval.py builds torch's OneCycleLR for `n // world // batch + 1` steps per epoch, but its loader
(DistributedSampler padding each rank to ceil(n / world) images, drop_last) yields `ceil(n / world) // batch`:
the cycle is stretched by one step per epoch and never reaches its end. The finetune stage runs the whole
cycle over `n // global batch` steps per epoch, its peak at the rounded warmup step. This replays both,
torch's OneCycleLR for the reference and unicom_ds.schedule for ours, per recipe, at the train-set sizes
below, and prints the largest gaps (lr relative to the peak lr) and the last step's lr of each.

    python benchmarks/bench_finetune_schedule.py
    python benchmarks/bench_finetune_schedule.py --recipes sop_vit_b_16 inat_vit_l_14   # some recipes only
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path

import torch
import yaml

from unicom_ds import schedule

REPO = Path(__file__).resolve().parents[1]
# Train images: SOP and In-Shop as their list files hold them, iNat 2018 in the Smooth-AP split retrieval.py reads.
TRAIN_IMAGES = {"sop": 59551, "inshop": 25882, "inat": 325846}


def reference(n: int, world: int, batch: int, epochs: int, lr: float) -> tuple[list[float], list[float]]:
    """(lr, beta1) of every step retrieval.py takes: OneCycleLR(pct_start 0.1) stepped after each batch."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, steps_per_epoch=n // world // batch + 1,
                                                epochs=epochs, pct_start=0.1)
    lrs, betas = [], []
    for _ in range(epochs * (math.ceil(n / world) // batch)):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    return lrs, betas


def ours(n: int, global_batch: int, epochs: int, warmup_epochs: float, lr: float) -> tuple[list[float], list[float]]:
    spe = n // global_batch
    total, warmup = epochs * spe, round(warmup_epochs * spe)  # as the Trainer computes them
    return ([schedule.lr_at(s, lr, warmup, total, "onecycle") for s in range(total)],
            [schedule.beta1_at(s, warmup, total, "onecycle", True) for s in range(total)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="*", default=None, help="recipe file stems (default: every finetune recipe)")
    args = ap.parse_args(argv)
    paths = sorted((REPO / "slurm/configs/recipes/finetune").glob("*.yaml"))
    if args.recipes is not None:
        unknown = set(args.recipes) - {p.stem for p in paths}
        if unknown:
            ap.error(f"unknown recipes {sorted(unknown)}; known: {', '.join(p.stem for p in paths)}")
        paths = [p for p in paths if p.stem in args.recipes]
    print("| recipe | steps (reference / ours) | max lr gap / peak | max beta1 gap | last lr / peak (reference / ours) |")
    print("| --- | --- | ---: | ---: | --- |")
    for path in paths:
        text = path.read_text()
        f = yaml.safe_load(text)["finetune"]
        gpus = int(re.search(r"slurm\.gpus_per_node=(\d+)", text).group(1))
        n, lr = TRAIN_IMAGES[f["datasets"][0]], float(f["lr"])
        ref_lr, ref_b = reference(n, gpus, f["batch_size"] // gpus, f["epochs"], lr)
        our_lr, our_b = ours(n, f["batch_size"], f["epochs"], f["warmup_epochs"], lr)
        common = min(len(ref_lr), len(our_lr))
        lr_gap = max(abs(a - b) for a, b in zip(ref_lr[:common], our_lr[:common])) / lr
        b_gap = max(abs(a - b) for a, b in zip(ref_b[:common], our_b[:common]))
        print(f"| {path.stem} | {len(ref_lr)} / {len(our_lr)} | {lr_gap:.2e} | {b_gap:.2e} | "
              f"{ref_lr[-1] / lr:.2e} / {our_lr[-1] / lr:.2e} |")


if __name__ == "__main__":
    main()
