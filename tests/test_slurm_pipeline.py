"""End to end on the local SLURM cluster: `stage=all` submits cluster -> train -> eval -> report chained
afterok; every job completes, and each stage's files and TensorBoard tags are there."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import unicom_ds
from evaluation.demo_sets import digit_images, write_eurosat, write_sop
from test_slurm_cluster_stage import SLURM, TINY, check_cluster_run, log_tails, submit, wait_for
from unicom_ds.shards import expand
from unicom_ds.tblog import read_scalars

STEPS = ["embed", "kmeans", "assign", "train", "eval", "report"]


@pytest.fixture(scope="module")
def pipeline(slurm, tmp_path_factory, demo_shards):
    tmp = tmp_path_factory.mktemp("pipeline")
    run, data = tmp / "run", tmp / "eval_data"
    x, y = digit_images(300)
    write_sop(data, x[:120], y[:120])
    write_eurosat(data, x, y)
    ds = tmp / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8,
                              "bf16": {"enabled": False}, "zero_optimization": {"stage": 2}}))
    res = submit("stage=all", f"run_dir={run}", f"data.shards={demo_shards}", *TINY, *SLURM,
                 "model=ViT-Tiny-16", f"train.deepspeed_config={ds}", "train.precision=fp32", "train.epochs=2",
                 "train.steps_per_epoch=3", "train.workers=0", "train.ckpt_every_steps=3", "train.log_every=1",
                 f"eval.data_root={data}", "eval.datasets=[sop,eurosat]", "eval.workers=0", "eval.batch_size=64",
                 "eval.dims=[32,16]", "eval.probe.max_iter=100", "report.classes=3", "report.per_class=4")
    assert res.returncode == 0, res.stdout + res.stderr
    ids = {m.group(1): m.group(2) for m in (re.match(r"(\w+): job (\d+)", ln) for ln in res.stdout.splitlines()) if m}
    states = wait_for(list(ids.values()))
    return run, res.stdout, ids, states, demo_shards


@pytest.mark.slurm
@pytest.mark.slow
def test_all_stages_chained_afterok_and_completed(pipeline):
    run, stdout, ids, states, _ = pipeline
    assert list(ids) == STEPS, stdout
    for before, step in zip(STEPS, STEPS[1:]):      # each job waits for the one before it
        assert re.search(rf"^{step}: job {ids[step]}.*afterok {before}", stdout, re.M), stdout
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n{log_tails(run)}"


@pytest.mark.slurm
@pytest.mark.slow
def test_each_stage_wrote_its_contract(pipeline):
    run, _, _, states, shards = pipeline
    assert set(states.values()) == {"COMPLETED"}, log_tails(run)
    check_cluster_run(run, expand(shards))

    model, preprocess = unicom_ds.load("ViT-Tiny-16", checkpoint=run / "train" / "backbone.pt")
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 64))
    assert feats.shape == (2, 64) and torch.isfinite(feats).all()
    assert (run / "train" / "ckpt" / "latest").read_text().strip() == "step_6"   # 2 epochs x 3 steps

    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(results["run"]) == {"sop", "eurosat"}
    assert 0.0 <= results["run"]["sop"]["R@1"] <= 1.0 and 0.0 <= results["run"]["eurosat"]["top1"] <= 1.0
    assert "| run |" in (run / "eval" / "results.md").read_text()

    page = (run / "report" / "index.html").read_text()
    assert "Cluster browser" in page and "thumbs/" in page


@pytest.mark.slurm
@pytest.mark.slow
def test_tensorboard_has_every_stage(pipeline):
    run, *_ = pipeline
    scalars = read_scalars(run / "tensorboard")
    assert any(t.startswith("labels/") for t in scalars)              # cluster statistics
    losses = [v for _, v in scalars["train/loss"]]
    assert len(losses) == 6 and np.isfinite(losses).all()            # one per step, log_every=1
    assert "eval/run/sop/R@1" in scalars and "eval/run/eurosat/top1" in scalars

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard" / "cluster"), size_guidance={"images": 0})
    acc.Reload()
    grids = [t for t in acc.Tags()["images"] if t.startswith("cluster_samples/")]
    assert grids, "no cluster sample grids in TensorBoard"
