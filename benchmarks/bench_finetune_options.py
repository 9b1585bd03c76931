"""What a finetune option does to the scores: the finetune stage (slurm/submit.py stage=finetune launcher=local)
in tests/test_finetune.py's learning setting (digit pairs in CUB's layout, 50 train and 50 held-out classes, a
random-init ViT-Tiny-16 release file, 8 epochs at lr 1e-3, no margin, origin_clip images), with the given
overrides; prints the final model's R@1 / MAP@R on the held-out classes, the best epoch's R@1 (selected on
the test set) and the seconds.

    python benchmarks/bench_finetune_options.py                          # the defaults (fp32, beta1 cycle, drop path 0.1)
    python benchmarks/bench_finetune_options.py finetune.precision=bf16
    python benchmarks/bench_finetune_options.py finetune.cycle_momentum=false finetune.drop_path=0
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evaluation import demo_sets
from unicom_ds import unicom_vit

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    overrides = sys.argv[1:]
    tmp = Path(tempfile.mkdtemp(prefix="bench_finetune_options_"))
    x, y = demo_sets.digit_pairs(per_train=30, per_test=20, jitter=8)
    demo_sets.write_cub(tmp / "data", x, y, test_from=50)
    torch.manual_seed(0)
    torch.save(unicom_vit.build("ViT-Tiny-16").state_dict(), tmp / "init.pt")
    argv = [sys.executable, "slurm/submit.py", "stage=finetune", "launcher=local", f"run_dir={tmp / 'run'}",
            "model=ViT-Tiny-16", "device=cpu", "finetune.datasets=[cub]", f"finetune.init=unicom:ViT-Tiny-16@{tmp / 'init.pt'}",
            f"eval.data_root={tmp / 'data'}", "finetune.batch_size=64", "finetune.epochs=8", "finetune.workers=0",
            "finetune.lr=1e-3", "finetune.loss.margin=0.0", "finetune.transform=origin_clip", "eval.workers=0",
            "eval.batch_size=256", "eval.dims=[32]", *overrides]
    start = time.time()
    proc = subprocess.run(argv, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    if proc.returncode:
        sys.exit((proc.stdout + proc.stderr)[-4000:])
    found = json.loads((tmp / "run" / "eval" / "results.json").read_text())
    tuned = found["ft-cub:unicom:ViT-Tiny-16"]["cub"]
    start_r1 = found["unicom:ViT-Tiny-16"]["cub"]["R@1"]
    print(f"overrides {' '.join(overrides) or '(none)'}: R@1 {start_r1:.3f} -> {tuned['R@1']:.3f}, "
          f"MAP@R {tuned['MAP@R']:.3f}; selected on the test set R@1 {tuned.get('test-selected/R@1', float('nan')):.3f} "
          f"(epoch {tuned.get('test-selected/epoch')}); {time.time() - start:.0f} s; run {tmp / 'run'}")


if __name__ == "__main__":
    main()
