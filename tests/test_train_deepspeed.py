"""The train stage end to end: real `deepspeed` launches of 2 and 1 CPU processes (gloo).

Four launches share one run directory: 2 ranks train steps 0-4 (checkpoints at 2 and 4), 2 ranks
resume to step 6 with the compact recipe's r2=0.5 and one more epoch, then 1 rank resumes with
lr=0 for one step and 2 ranks again for another, so the weights must equal the first 2-rank
checkpoint's exactly, and the Adam moments must follow Adam's recurrence across each change.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.train_fixtures import ds_config, make_run
from unicom_ds import config, tblog, train, train_plan
from unicom_ds.checkpoint import ENGINE_TAG, rank_file, read_meta, read_rank_file
from unicom_ds.optim import adamw

REPO = Path(__file__).resolve().parents[1]
TAGS = ("loss", "lr", "images_per_s", "images_per_s_per_gpu", "grad_norm", "selected_classes",
        "peak_mem_mb", "skipped_samples", "skipped_steps")


def launch(argv: list[str], log: Path) -> str:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{' '.join(argv)} failed; log {log}:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data = make_run(root, [13, 9, 6], k=10, unlabelled_every=5, broken=("000010002",))
    ds = ds_config(root / "ds.json")
    run = data["run"]
    first = config.resolve([f"run_dir={run}", f"data.shards={data['shards']}", "model=ViT-Tiny-16", "stage=train",
                            "device=cpu", f"train.deepspeed_config={ds}", "train.epochs=2", "train.steps_per_epoch=3",
                            "train.max_steps=4", "train.ckpt_every_steps=2", "train.log_every=1", "train.workers=0",
                            "train.local_processes=2", "loss.r1=0.5"])
    out = {"run": run, "logs": [launch(train.local_command(first), root / "run1.log")]}
    resume = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--master_port", str(train.free_port()), str(REPO / "unicom_ds/train.py"),
              "--deepspeed_config", str(ds), f"run_dir={run}", "train.epochs=3"]
    out["logs"].append(launch(resume[:5] + ["--num_gpus", "2"] + resume[5:] + ["loss.r2=0.5", "train.max_steps=6"],
                              root / "run2.log"))
    out["logs"].append(launch(resume[:5] + ["--num_gpus", "1"] + resume[5:] + ["train.max_steps=7", "train.lr=0.0"],
                              root / "run3.log"))
    out["logs"].append(launch(resume[:5] + ["--num_gpus", "2"] + resume[5:] + ["train.max_steps=8", "train.lr=0.0",
                                                                               "train.keep_checkpoints=3"],
                              root / "run4.log"))
    return out


def zero_moments(step_dir: Path) -> list[dict]:
    """Per ZeRO param group: Adam's step and its moments over the whole flat group, merged from
    the elastic (unpadded) partitions of every rank in `step_dir`."""
    files = sorted((step_dir / ENGINE_TAG).glob("*_optim_states.pt"))
    parts = [torch.load(f, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"] for f in files]
    return [{"step": float(groups[0]["step"]),
             **{k: torch.cat([g[k] for g in groups]) for k in ("exp_avg", "exp_avg_sq")}}
            for groups in zip(*parts)]


@pytest.mark.slow
def test_two_ranks_train_checkpoint_and_resume(runs):
    ckpt = runs["run"] / "train" / "ckpt"
    first, second = runs["logs"][:2]
    assert "on 2 rank(s)" in first and "step 4/4" in first and "steps 0 -> 4" in first
    assert f"resumed from {ckpt / 'step_4'} at step 4" in second and "steps 4 -> 6" in second
    assert read_meta(ckpt / "step_6") == {**read_meta(ckpt / "step_6"), "step": 6, "world_size": 2, "epoch": 2,
                                         "step_in_epoch": 0, "model": "ViT-Tiny-16", "num_classes": 10}
    assert rank_file(ckpt / "step_6", 1).is_file()


@pytest.mark.slow
def test_resume_on_another_rank_count_restores_backbone_and_prototypes(runs):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = runs["run"] / "train" / "ckpt"
    third, fourth = runs["logs"][2:]
    assert "on 1 rank(s)" in third and "4 x 1 x 2 accumulation" in third and "steps 6 -> 7" in third
    assert "on 2 rank(s)" in fourth and "steps 7 -> 8" in fourth
    for log, before in ((third, 2), (fourth, 1)):
        assert f"from a {before}-rank checkpoint: prototype blocks re-sliced, backbone fp32 weights and Adam " \
               "moments re-partitioned" in log
    assert (ckpt / "latest").read_text().strip() == "step_8"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_6", "step_7", "step_8"]  # keep_checkpoints=3
    # lr=0 changes nothing: 1-rank step_7 and 2-rank step_8 must hold exactly the 2-rank step_6 weights.
    before = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "step_6"), tag=ENGINE_TAG)
    export = torch.load(runs["run"] / "train" / "backbone.pt", weights_only=True)  # release format: a plain state dict
    assert export.keys() == before.keys()
    # lr=0 keeps the parameters; the BatchNorm statistics still move in train-mode forwards.
    params = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert "feature.0.weight" in params and len(params) < len(before)
    for key in params:
        assert export[key].dtype == torch.float32
        assert torch.equal(export[key], before[key]), key
    blocks = [read_rank_file(rank_file(ckpt / "step_6", r)) for r in (0, 1)]
    assert [b["class_range"] for b in blocks] == [(0, 5), (5, 10)]
    merged = read_rank_file(rank_file(ckpt / "step_7", 0))
    assert merged["class_range"] == (0, 10)
    assert torch.equal(merged["weight"], torch.cat([b["weight"] for b in blocks]))
    split = [read_rank_file(rank_file(ckpt / "step_8", r)) for r in (0, 1)]
    assert [b["class_range"] for b in split] == [(0, 5), (5, 10)]
    assert torch.equal(torch.cat([b["weight"] for b in split]), merged["weight"])


@pytest.mark.slow
def test_resume_on_another_rank_count_keeps_adam_moments(runs):
    """One Adam step from (m, v) with gradient g gives m' = b1 m + (1 - b1) g, v' = b2 v + (1 - b2) g^2:
    g read off m' must explain v'. Had the moments restarted from zero, v' = (1 - b2) (m' / (1 - b1))^2."""
    b1, b2 = adamw([torch.nn.Parameter(torch.zeros(1))], 1e-3, 0.05).defaults["betas"]
    ckpt = runs["run"] / "train" / "ckpt"
    for old, new in (("step_6", "step_7"), ("step_7", "step_8")):
        for prev, cur in zip(zero_moments(ckpt / old), zero_moments(ckpt / new), strict=True):
            assert cur["step"] == prev["step"] + 1 == int(new[5:])
            assert cur["exp_avg"].shape == prev["exp_avg"].shape
            grad = (cur["exp_avg"] - b1 * prev["exp_avg"]) / (1 - b1)
            implied_v = b2 * prev["exp_avg_sq"] + (1 - b2) * grad**2
            scale = float(cur["exp_avg_sq"].abs().max())
            assert scale > 0 and float((implied_v - cur["exp_avg_sq"]).abs().max()) < 1e-4 * scale, (old, new)


@pytest.mark.slow
def test_tensorboard_scalars_continue_across_resumes(runs):
    scalars = tblog.read_scalars(str(runs["run"] / "tensorboard" / "train"))
    assert {f"train/{t}" for t in TAGS} <= scalars.keys()
    steps = sorted(s for s, _ in scalars["train/loss"])
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["train/loss"])
    assert all(math.isfinite(v) for _, v in scalars["train/grad_norm"])
    assert all(v > 0 for _, v in scalars["train/images_per_s"] + scalars["train/peak_mem_mb"])
    lr = dict(scalars["train/lr"])
    assert lr[1] == pytest.approx(1e-3 / 3) and lr[7] == lr[8] == 0.0  # warmup of one 3-step epoch; lr=0 runs
    # 2 ranks x ceil(0.5 * 5) classes at least, and never more than all 10.
    assert all(6 <= v <= 10 for s, v in scalars["train/selected_classes"] if s <= 6)
    assert max(v for _, v in scalars["train/skipped_samples"]) > 0  # unlabelled and broken samples


@pytest.mark.slow
def test_exported_backbone_loads(runs):
    import unicom_ds

    model, preprocess = unicom_ds.load("ViT-Tiny-16", checkpoint=runs["run"] / "train" / "backbone.pt")
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 64) and torch.isfinite(out).all()


def test_deepspeed_config_errors(tmp_path):
    cfg = config.resolve([f"run_dir={tmp_path}", f"train.deepspeed_config={ds_config(tmp_path / 'ds.json')}"])
    assert train_plan.deepspeed_config(cfg, 1)["gradient_accumulation_steps"] == 2
    assert train_plan.deepspeed_config(cfg, 2)["gradient_accumulation_steps"] == 1
    cfg.train.precision = "fp32"
    assert train_plan.deepspeed_config(cfg, 2)["bf16"]["enabled"] is False
    with pytest.raises(config.ConfigError, match=r"ds\.json: train_batch_size 8 is not a multiple of .* 4 x 3 ranks; "
                                                 r"with this file the number of ranks must divide 2 \(e\.g\. 1, 2\)"):
        train_plan.deepspeed_config(cfg, 3)
    cfg.train.precision = "fp16"
    with pytest.raises(config.ConfigError, match="train.precision=fp16"):
        train_plan.deepspeed_config(cfg, 1)
    cfg.train.deepspeed_config = str(tmp_path / "nope.json")
    with pytest.raises(config.ConfigError, match="train.deepspeed_config=.*nope.json is not a file"):
        train_plan.deepspeed_config(cfg, 1)
    (tmp_path / "broken.json").write_text("{")
    cfg.train.deepspeed_config = str(tmp_path / "broken.json")
    with pytest.raises(config.ConfigError, match="broken.json is not readable JSON"):
        train_plan.deepspeed_config(cfg, 1)


def test_local_command_passes_only_changed_keys(tmp_path):
    cfg = config.resolve([f"run_dir={tmp_path}", "loss.r2=0.5", "train.epochs=33", "device=cpu"])
    argv = train.local_command(config.select(cfg))
    assert argv[:5] == ["env", "DS_ACCELERATOR=cpu", sys.executable, "-m", "deepspeed.launcher.runner"]
    assert argv[argv.index("--num_gpus") + 1] == "1" and str(train.TRAIN_PY) in argv
    assert sorted(a for a in argv if "=" in a and not a.startswith("DS_")) == sorted(
        [f"run_dir={tmp_path}", "loss.r2=0.5", "train.epochs=33", "device=cpu"])


def test_requeue_resumes_from_latest(tmp_path):
    cfg = config.select(config.resolve([f"run_dir={tmp_path}", "train.resume=none"]))
    delayed = train.TrainJob().checkpoint(cfg)
    assert isinstance(delayed.function, train.TrainJob)
    assert delayed.args[0]["train"]["resume"] == "latest" and cfg["train"]["resume"] == "none"
    assert train.master_port("1234_5") == train.master_port("1234_5") != train.master_port("1235_5")
