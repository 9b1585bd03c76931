"""Fine-tuning throughput: the real finetune stage (slurm/submit.py stage=finetune launcher=local, the
deepspeed launcher, timm augmentation, data loader workers, the Trainer) on scikit-learn digits written in
CUB's layout, from a random-init release-architecture file; images/s as the Trainer logs it to TensorBoard
(finetune/images_per_s), the first logging window (start-up) left out.

    python benchmarks/bench_finetune.py --device cpu --model ViT-Tiny-16 --batch 64 --steps 30 --precision fp32 --workers 1
    python benchmarks/bench_finetune.py --device cuda --model ViT-B-16 --batch 128 --steps 60 --precision bf16 --workers 8
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evaluation import demo_sets
from unicom_ds import unicom_vit
from unicom_ds.tblog import read_scalars

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-Tiny-16", help="a Unicom release architecture name")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=64, help="finetune.batch_size (global)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--processes", type=int, default=None, help="finetune.local_processes (default: one per GPU)")
    ap.add_argument("--keep", default=None, help="keep the run directory here instead of a temporary one")
    args = ap.parse_args()

    tmp = Path(args.keep or tempfile.mkdtemp(prefix="bench_finetune_"))
    x, y = demo_sets.digit_images()
    demo_sets.write_cub(tmp / "data", x, y, test_from=5)
    torch.manual_seed(0)
    init = tmp / "init.pt"
    torch.save(unicom_vit.build(args.model).state_dict(), init)
    log_every = max(1, args.steps // 6)
    argv = [sys.executable, "slurm/submit.py", "stage=finetune", "launcher=local", f"run_dir={tmp / 'run'}",
            f"model={args.model}", f"device={args.device}", "finetune.datasets=[cub]",
            f"finetune.init=unicom:{args.model}@{init}", f"eval.data_root={tmp / 'data'}",
            f"finetune.batch_size={args.batch}", f"finetune.max_steps={args.steps}",
            f"finetune.precision={args.precision}", f"finetune.workers={args.workers}",
            f"finetune.log_every={log_every}", f"finetune.ckpt_every_steps={10 * args.steps}",
            f"eval.workers={args.workers}", "eval.dims=[32]"]
    if args.processes:
        argv.append(f"finetune.local_processes={args.processes}")
    start = time.time()
    proc = subprocess.run(argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "")
                                               or str(os.cpu_count())}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"finetune run failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    windows = [v for _, v in read_scalars(str(tmp / "run" / "tensorboard" / "finetune" / "cub"))["finetune/images_per_s"]]
    steady = windows[1:] or windows
    print(json.dumps({"model": args.model, "device": args.device, "precision": args.precision, "batch": args.batch,
                      "steps": args.steps, "workers": args.workers, "images_per_s_windows": [round(w, 1) for w in windows],
                      "images_per_s": round(statistics.median(steady), 1),
                      "wall_s_with_startup_and_eval": round(time.time() - start, 1)}))


if __name__ == "__main__":
    main()
