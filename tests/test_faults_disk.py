"""A full disk, for real (a filled tmpfs, see conftest.full_disk): every writer stops with one line naming the
path and the free space, the other ranks of a training job exit too, and finished work elsewhere is kept."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import suppress

import numpy as np
import pytest
import torch

from conftest import REPO
from tests.train_fixtures import ds_config, make_run
from unicom_ds import checkpoint, disk
from unicom_ds.atomic import save_npy_atomic, write_json_atomic


def built_cpu_comm_op() -> bool:
    """Whether DeepSpeed's CPU communication op is built where the ranks look for it (tests/install.sh builds it)."""
    code = ("from unicom_ds import dist; folder = dist.prepare_cpu_comm_op(local_rank=1); "
            "print(folder is not None and any(folder.glob(dist.CPU_COMM_OP + '*.so')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.strip() == "True"


def test_atomic_writes_say_the_disk_is_full(full_disk):
    """Python's own writers (OSError ENOSPC) and torch.save's C++ writer ("basic_ios::clear" or "unexpected pos",
    errno lost) both come out as DiskFull; no temporary file is left behind."""
    cases = {"a.json": lambda p: write_json_atomic(p, {"x": "y" * 100_000}),
             "b.npy": lambda p: save_npy_atomic(p, np.zeros(100_000, np.float32)),
             "c.pt": lambda p: disk_torch_save(p, torch.zeros(100_000))}
    for name, write in cases.items():
        with pytest.raises(disk.DiskFull) as err:
            write(full_disk / "sub" / name)
        assert str(err.value) == f"disk full writing {full_disk / 'sub' / name}: 0 B free on {full_disk}"
    assert sorted(p.name for p in full_disk.rglob("*")) == ["filler", "sub"]


def disk_torch_save(path, obj) -> None:
    from unicom_ds.atomic import atomic_path
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def test_a_checkpoint_whose_meta_json_does_not_fit_is_removed(full_disk):
    """Rank 0's commit on a full disk: the staging folder goes, `latest` still names the previous checkpoint."""
    root = full_disk / "ckpt"
    os.truncate(full_disk / "filler", 0)
    (root / "step_1").mkdir(parents=True)
    (root / "latest").write_text("step_1\n")
    checkpoint.rank_file(checkpoint.begin(root, 2), 0).write_bytes(b"rank 0's part")
    with open(full_disk / "filler", "ab", buffering=0) as f, suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    with pytest.raises(disk.DiskFull):
        checkpoint.commit(root, 2, {"world_size": 1}, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_1"]
    assert (root / "latest").read_text() == "step_1\n"


def test_a_local_stage_on_a_full_disk_stops_with_one_line(full_disk, demo_shards, tmp_path):
    """stage=embed writing RUN/embed on a full file system: exit 1, the line, no traceback; RUN/config.yaml (on
    another file system) is kept."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "embed").symlink_to(full_disk)
    proc = subprocess.run([sys.executable, "slurm/submit.py", "stage=embed", "launcher=local", f"run_dir={run}",
                           f"data.shards={demo_shards}", "clip.model=ViT-Tiny-16", "clip.pretrained=random",
                           "embed.workers=0", "progress=off"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"error: disk full writing {run}/embed/00000.img.npy: 0 B free on {full_disk}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (run / "config.yaml").is_file()


def test_the_launcher_says_so_when_config_yaml_does_not_fit(full_disk, demo_shards):
    proc = subprocess.run([sys.executable, "slurm/submit.py", "stage=embed", "launcher=local",
                           f"run_dir={full_disk / 'run'}", f"data.shards={demo_shards}", "clip.model=ViT-Tiny-16",
                           "clip.pretrained=random"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    # the first file a submission writes: what RUN/config.yaml held, kept for config.undo_save
    assert proc.stderr == f"error: disk full writing {full_disk}/run/logs/config_undo.json: 0 B free on {full_disk}\n"
    assert not (full_disk / "run" / "config.yaml").exists()


def test_two_training_ranks_exit_promptly_when_one_cannot_save(full_disk, tmp_path):
    """RUN/train on a disk with room for one checkpoint: step 1's is saved, step 2's cannot be written. Once no rank
    writes any more, each stops with one line naming the staging folder (or its file in it), none is left waiting
    in a barrier, the half-written `.step_2.tmp` is removed and `latest` still names step_1."""
    data = make_run(tmp_path, [13, 9, 6], k=10)
    run = data["run"]
    (run / "kmeans" / "summary.json").write_text(json.dumps({"k": 10}))
    (run / "train").symlink_to(full_disk)
    argv = [sys.executable, "slurm/submit.py", "stage=train", "launcher=local", f"run_dir={run}",
            f"data.shards={data['shards']}", "model=ViT-Tiny-16", "device=cpu",
            f"train.deepspeed_config={ds_config(tmp_path / 'ds.json', bf16=False)}", "train.precision=fp32",
            "train.epochs=1", "train.steps_per_epoch=4", "train.ckpt_every_steps=1", "train.workers=0",
            "train.local_processes=2", "loss.r1=1.0", "progress=off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Step 1 on a roomy disk (untimed: where tests/install.sh did not build DeepSpeed's CPU op, this run does) ...
    subprocess.run(["mount", "-o", "remount,size=1g", str(full_disk)], check=True)
    (full_disk / "filler").unlink()
    first = subprocess.run([*argv, "train.max_steps=1"], cwd=REPO, capture_output=True, text=True, timeout=540,
                           env=env)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]
    # ... then room for half a checkpoint more: step 2's save fills the disk.
    half = sum(p.stat().st_size for p in (full_disk / "ckpt" / "step_1").rglob("*") if p.is_file()) // 2
    subprocess.run(["mount", "-o", f"remount,size={shutil.disk_usage(full_disk).used + half}", str(full_disk)],
                   check=True)
    # The op is built by now, so the timed run below is the ranks' start, three steps and their exit, never a build.
    assert built_cpu_comm_op(), "DeepSpeed's CPU op is not in the environment's torch_extensions after a CPU launch"
    start = time.monotonic()
    proc = subprocess.run([*argv, "train.max_steps=4"], cwd=REPO, capture_output=True, text=True, timeout=540,
                          env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-4000:]
    said = [line for line in out.splitlines() if line.startswith("error: disk full")]
    assert said and all(line.startswith(f"error: disk full writing {run}/train/ckpt/.step_2.tmp")  # or a file in it
                        and line.endswith(f": 0 B free on {full_disk}") for line in said), out[-4000:]
    assert "basic_ios" not in out and "unexpected pos" not in out and "Traceback" not in out, out[-4000:]
    assert time.monotonic() - start < 300  # not the process group's 30-minute timeout
    assert sorted(p.name for p in (full_disk / "ckpt").iterdir()) == ["latest", "step_1"]
    assert (full_disk / "ckpt" / "latest").read_text() == "step_1\n"
