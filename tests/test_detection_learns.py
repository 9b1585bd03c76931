"""The detect stage for real on CPU: a tiny ViT Mask R-CNN trained on rendered shapes (a COCO-format set
with polygon masks and real instances_*.json) reaches box and mask AP on the held-out split that the same
model untrained does not; a resumed run equals an uninterrupted one; the job runs through the local
SLURM cluster too."""
from __future__ import annotations

import json
import re

import pytest
import torch

from evaluation.detection import job, synthetic
from unicom_ds import backbone, config, unicom_vit
from unicom_ds.tblog import read_scalars

SIZE = 96
# What the job is given: a tiny schedule for 4-image batches, no lr decay down the random-init ViT, no decay step.
TINY = ["model=ViT-Tiny-16", f"detect.image_size={SIZE}", "detect.scale_range=[0.8,1.25]", "detect.batch_size=4",
        "detect.lr=1e-3", "detect.layer_decay=1.0", "detect.warmup_steps=20", "detect.decay_steps=[100000]",
        "detect.window_size=3",
        "detect.fpn_channels=32", "detect.rois_per_image=32", "detect.workers=0", "detect.eval_batch_size=12",
        "detect.log_every=10", "progress=lines", "device=cpu"]
STEPS = 200
# Measured (docs/benchmarks.md, "Detect stage", the model as ViTDet): untrained (the same seeded model), AP50 0.002
# box and 0.0 mask; after STEPS steps, AP50 0.11 box and 0.20 mask (0.11-0.20 and 0.14-0.24 over seeds 0-3).
# The bars sit between, 40 x above and 1.4 x below the lowest.
BAR = {"box/AP50": 0.08, "mask/AP50": 0.08}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on 2 busy cores, two threads spin against each other (3-5x slower here), and
    one thread makes the CPU run bit-for-bit repeatable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(tmp, *extra: str) -> dict:
    return config.select(config.resolve([f"run_dir={tmp / 'run'}", f"detect.data_root={tmp / 'coco'}", *TINY,
                                         *extra]))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """The set and a run directory whose RUN/train/backbone.pt is a random-init ViT-Tiny-16 export."""
    tmp = tmp_path_factory.mktemp("det")
    synthetic.write(tmp / "coco", train=64, val=24, size=SIZE, seed=0)
    torch.manual_seed(0)
    (tmp / "run" / "train").mkdir(parents=True)
    torch.save(backbone.export("ViT-Tiny-16", unicom_vit.build("ViT-Tiny-16").state_dict()),
               tmp / "run" / "train" / "backbone.pt")
    return tmp


@pytest.fixture(scope="module")
def trained(shapes):
    """STEPS steps of the detect job on the shapes run: its metrics and RUN/detect/run/ckpt/step_STEPS.pt, which
    the two-rank test continues (a fixture, so that test runs alone too)."""
    cfg = config.as_config(_run(shapes, f"detect.steps={STEPS}", f"detect.ckpt_every_steps={STEPS}"))
    return cfg, job.detect(cfg)


@pytest.mark.slow
def test_trained_detector_beats_untrained(shapes, trained):
    from evaluation.detection.data import CocoSplit
    cfg, trained = trained
    det = job.Detector(cfg)
    val = CocoSplit(cfg.detect.data_root, "val2017", train=False)
    untrained_model, _ = det.build(val.num_classes)  # seeded as the trained model's start
    untrained = job.coco_metrics(val.coco, det.predict(untrained_model, val))

    print({"untrained": untrained, "trained": trained})
    for key, bar in BAR.items():
        assert untrained.get(key, 0.0) < bar <= trained[key], (key, untrained, trained)
    run = shapes / "run"
    assert json.loads((run / "eval" / "results.json").read_text())["run"]["shapes"] == trained  # not "coco"
    table = (run / "eval" / "results.md").read_text()
    assert "Synthetic shapes" in table and "COCO detection" not in table and re.search(r"\| run \| [\d.]+ \|", table)
    tags = read_scalars(str(run / "tensorboard" / "detect"))
    assert {"detect/loss", "detect/loss_mask", "detect/lr", "detect/run/box/AP", "detect/run/mask/AP"} <= set(tags)
    loss = [v for _, v in sorted(tags["detect/loss"])]
    assert sum(loss[-3:]) < sum(loss[:3])
    # A rerun finds the metrics and trains nothing.
    assert job.detect(cfg) == trained


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(tmp_path, shapes):
    """Stopped after step 2 (its checkpoint), continued to 4: the same weights as 4 steps in one go."""
    from evaluation.detection.data import CocoSplit

    def train(run_dir, steps):
        cfg = config.as_config(_run(shapes, f"run_dir={run_dir}", f"detect.steps={steps}", "detect.ckpt_every_steps=2",
                                    "detect.drop_path=0.3"))
        det = job.Detector(cfg)
        split = CocoSplit(cfg.detect.data_root, "train2017", train=True)
        model, mean = det.build(split.num_classes)
        det.train(model, split, mean)
        return model.state_dict()

    for d in ("a", "b"):  # both runs read the same backbone file
        (tmp_path / d / "train").mkdir(parents=True)
        (tmp_path / d / "train" / "backbone.pt").write_bytes((shapes / "run" / "train" / "backbone.pt").read_bytes())
    train(tmp_path / "a", 2)
    resumed = train(tmp_path / "a", 4)
    straight = train(tmp_path / "b", 4)
    assert job.latest_step(tmp_path / "a" / "detect" / "run" / "ckpt") == 4
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k


@pytest.mark.slurm
@pytest.mark.slow
def test_detect_stage_through_slurm(slurm, tmp_path, shapes):
    """`python slurm/submit.py stage=detect launcher=slurm`: a short run as a submitit job (DetectJob, one
    CPU task), its metrics in RUN/detect and RUN/eval, the COCO set checked before submission."""
    from test_slurm_cluster_stage import SLURM, log_tails, submit, wait_for
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / "backbone.pt").write_bytes((shapes / "run" / "train" / "backbone.pt").read_bytes())
    args = ["stage=detect", f"run_dir={run}", f"detect.data_root={shapes / 'coco'}", *TINY, *SLURM,
            "detect.steps=3", "detect.ckpt_every_steps=2"]
    missing = submit(*args, f"detect.data_root={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and str(tmp_path / "nowhere" / "train2017") in missing.stderr
    res = submit(*args)
    assert res.returncode == 0, res.stdout + res.stderr
    ids = re.findall(r"detect: job (\d+)", res.stdout)
    states = wait_for(ids)
    assert set(states.values()) == {"COMPLETED"}, log_tails(run)
    metrics = json.loads((run / "detect" / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and set(metrics["metrics"]) >= {"box/AP", "mask/AP", "box/AP50", "mask/AP75"}
    assert metrics["boxes"] == {s: {"clipped": 0, "dropped": 0} for s in ("train2017", "val2017")}
    assert json.loads((run / "eval" / "results.json").read_text())["run"]["shapes"] == metrics["metrics"]
    assert job.latest_step(run / "detect" / "run" / "ckpt") == 3


@pytest.mark.slow
def test_non_finite_steps_skipped_then_the_job_stops_with_its_checkpoint_kept(tmp_path, shapes):
    """Fault injection: steps 2 and 3 give a NaN loss. Step 2 is skipped (weights untouched), step 3 is one
    more than detect.max_bad_steps=1: the job stops naming the key, and step 1's finite checkpoint stays latest."""
    from evaluation.detection.data import CocoSplit
    (tmp_path / "run" / "train").mkdir(parents=True)
    (tmp_path / "run" / "train" / "backbone.pt").write_bytes((shapes / "run" / "train" / "backbone.pt").read_bytes())
    cfg = config.as_config(_run(shapes, f"run_dir={tmp_path / 'run'}", "detect.steps=4", "detect.ckpt_every_steps=1",
                                "detect.max_bad_steps=1"))
    det = job.Detector(cfg)
    split = CocoSplit(cfg.detect.data_root, "train2017", train=True)
    model, mean = det.build(split.num_classes)
    real, calls, seen = model.forward, [], {}

    def forward(images, targets=None):
        out = real(images, targets)
        calls.append(1)
        if len(calls) == 2:
            seen["before"] = {k: v.clone() for k, v in model.state_dict().items()}
        if len(calls) == 3:
            seen["after"] = {k: v.clone() for k, v in model.state_dict().items()}
        if len(calls) in (2, 3):
            out["loss_mask"] = out["loss_mask"] * float("nan")
        return out

    model.forward = forward
    with pytest.raises(RuntimeError, match="detect.max_bad_steps=1"):
        det.train(model, split, mean)
    assert len(calls) == 3
    assert all(torch.equal(v, seen["after"][k]) for k, v in seen["before"].items())  # step 2 changed nothing
    ckpt = tmp_path / "run" / "detect" / "run" / "ckpt"
    assert job.latest_step(ckpt) == 1
    state = torch.load(ckpt / "step_1.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_requeue_resubmits_the_same_job():
    """At the time limit submitit calls checkpoint(): the same DetectJob and config, resumed from `latest`."""
    import submitit
    cfg = {"run_dir": "/x", "detect": {"steps": 10}}
    delayed = job.DetectJob().checkpoint(cfg)
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert isinstance(delayed.function, job.DetectJob) and delayed.args == (cfg,)


def _ddp_rank(rank: int, port: int, cfg: dict) -> None:
    import os
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        job.detect(cfg)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_ddp_train_and_gather_every_prediction(tmp_path, shapes, trained):
    """Two gloo ranks (2 images each) continue the trained model 2 steps: DDP keeps them in step, rank 0
    checkpoints, and both ranks' val predictions are gathered: the metrics equal one process scoring every
    image with the final weights (and are not zero, so a lost half would show)."""
    from evaluation.detection.data import CocoSplit
    from unicom_ds.train import free_port
    trained = shapes / "run" / "detect" / "run" / "ckpt" / f"step_{STEPS}.pt"  # the `trained` fixture's
    assert trained.is_file()
    run = tmp_path / "run"
    (run / "train").mkdir(parents=True)
    (run / "train" / "backbone.pt").write_bytes((shapes / "run" / "train" / "backbone.pt").read_bytes())
    ckpt = run / "detect" / "run" / "ckpt"
    ckpt.mkdir(parents=True)
    (ckpt / trained.name).write_bytes(trained.read_bytes())
    (ckpt / "latest").write_text(trained.name + "\n")
    cfg = _run(shapes, f"run_dir={run}", f"detect.steps={STEPS + 2}", f"detect.ckpt_every_steps={STEPS + 2}")
    torch.multiprocessing.spawn(_ddp_rank, args=(free_port(), cfg), nprocs=2, join=True)
    metrics = json.loads((run / "detect" / "run" / "metrics.json").read_text())["metrics"]
    assert metrics["box/AP50"] > 0 and metrics["mask/AP50"] > 0
    det = job.Detector(config.as_config(cfg))
    val = CocoSplit(str(shapes / "coco"), "val2017", train=False)
    model, _ = det.build(val.num_classes)
    model.load_state_dict(torch.load(ckpt / f"step_{STEPS + 2}.pt", weights_only=True)["model"])
    assert job.coco_metrics(val.coco, det.predict(model, val)) == pytest.approx(metrics)
