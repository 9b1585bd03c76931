"""A train job that reaches its SLURM time limit is signalled, requeued by submitit, and resumes from its
latest checkpoint: the real thing on the local cluster.

The limit is set once the first run has published a periodic checkpoint, not at submission: the job is submitted
with 30 minutes, and once `RUN/train/ckpt/latest` exists its limit is brought to 2 minutes past its run time
(`scontrol update TimeLimit`). SLURM then sends submitit's USR2, 90 s before the new limit, as at any time limit.
A fixed 3-minute limit left the first run 90 s to start its ranks and reach a checkpoint, which a loaded machine
(or a DeepSpeed op build) could miss; now there is always a checkpoint to resume from, whatever the load. (submitit
judges "timed out" from the 30 minutes it submitted, so its log calls this signal a preemption; its handler is the
same: TrainJob.checkpoint, then the requeue. 260 s on cpu2 at load 4-5, 2026-12-07.)"""
from __future__ import annotations

import math
import re
import subprocess
import time

import pytest

from test_slurm_cluster_stage import SLURM, submit
from test_train_deepspeed import ds_config
from train_fixtures import make_run

WAIT_S = 600


def run_time_s(job: str) -> int:
    """The job's RunTime in seconds, from `scontrol show job` ([D-]HH:MM:SS)."""
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, check=True).stdout
    days, h, m, s = re.search(r"RunTime=(?:(\d+)-)?(\d+):(\d+):(\d+)", text).groups()
    return ((int(days or 0) * 24 + int(h)) * 60 + int(m)) * 60 + int(s)


def job_running(job: str) -> bool:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip() == "RUNNING"


@pytest.mark.slurm
@pytest.mark.slow
def test_train_job_requeues_at_its_time_limit_and_resumes(slurm, tmp_path):
    data = make_run(tmp_path, [16, 16], k=10)              # a labelled run directory, no cluster stage needed
    run, shards = data["run"], data["shards"]
    ds = ds_config(tmp_path / "ds.json")
    res = submit("stage=train", f"run_dir={run}", f"data.shards={shards}", *SLURM, "slurm.time_min=30",
                 "model=ViT-Tiny-16", f"train.deepspeed_config={ds}", "train.precision=fp32",
                 "train.epochs=100000", "train.steps_per_epoch=100", "train.workers=0", "train.ckpt_every_steps=5",
                 "train.log_every=5")
    assert res.returncode == 0, res.stdout + res.stderr
    job = re.search(r"^train: job (\d+)", res.stdout, re.M).group(1)
    log = run / "logs" / job / f"{job}_0_log.out"
    latest = run / "train" / "ckpt" / "latest"
    deadline = time.time() + WAIT_S
    text = ""
    try:
        while not latest.is_file():  # the first run's first periodic checkpoint
            text = log.read_text() if log.is_file() else ""
            assert time.time() < deadline, f"no checkpoint within {WAIT_S}s; log:\n{text[-3000:]}"
            time.sleep(2)
        first = int(latest.read_text().strip().split("_")[1])
        assert job_running(job)
        # The time limit: 2 minutes past the run time, rounded up to a minute (SLURM's unit): USR2 30-90 s from now.
        limit_min = math.ceil(run_time_s(job) / 60) + 2
        subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit_min}"], check=True)
        while time.time() < deadline:
            text = log.read_text() if log.is_file() else ""
            if "resumed from" in text:
                break
            time.sleep(5)
        else:
            pytest.fail(f"no resume within {WAIT_S}s; log:\n{text[-3000:]}")
    finally:
        subprocess.run(["scancel", job])
    err = (run / "logs" / job / f"{job}_0_log.err").read_text()
    assert "timed-out and not checkpointed" not in err and "Caught signal SIGUSR2" in err, err[-3000:]
    resumed = int(re.search(r"resumed from \S*step_(\d+) at step (\d+)", text).group(1))
    assert resumed >= first and resumed % 5 == 0                # a periodic checkpoint of the first run
