"""A train job that reaches its SLURM time limit is signalled, requeued by submitit, and resumes from its
latest checkpoint: the real thing on the local cluster. A 3-minute limit: submitit asks for USR2 90 s
before it, which leaves the first run time to write a periodic checkpoint."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from test_slurm_cluster_stage import SLURM, submit
from test_train_deepspeed import ds_config
from train_fixtures import make_run

WAIT_S = 600


@pytest.mark.slurm
@pytest.mark.slow
def test_train_job_requeues_at_its_time_limit_and_resumes(slurm, tmp_path):
    data = make_run(tmp_path, [16, 16], k=10)              # a labelled run directory, no cluster stage needed
    run, shards = data["run"], data["shards"]
    ds = ds_config(tmp_path / "ds.json")
    res = submit("stage=train", f"run_dir={run}", f"data.shards={shards}", *SLURM, "slurm.time_min=3",
                 "model=ViT-Tiny-16", f"train.deepspeed_config={ds}", "train.precision=fp32",
                 "train.epochs=100000", "train.steps_per_epoch=100", "train.workers=0", "train.ckpt_every_steps=5",
                 "train.log_every=5")
    assert res.returncode == 0, res.stdout + res.stderr
    job = re.search(r"^train: job (\d+)", res.stdout, re.M).group(1)
    log = run / "logs" / job / f"{job}_0_log.out"
    deadline = time.time() + WAIT_S
    try:
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
    assert "timed-out and not checkpointed" not in err
    resumed = int(re.search(r"resumed from \S*step_(\d+) at step (\d+)", text).group(1))
    assert resumed >= 5 and resumed % 5 == 0                   # a periodic checkpoint of the first run
