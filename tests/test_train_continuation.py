"""Continuation runs, end to end with real `deepspeed` launches: the README's demo commands for the compact
epoch and the 336-px epoch (here 64 -> 96 px) run on a finished 2-rank base run, at their recipes' stated lr,
and a continuation killed with SIGKILL resumes from its own checkpoint, not from its base again."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import fresh_run
from tests.train_fixtures import ds_config, make_run
from unicom_ds import config, schedule, tblog, train, unicom_vit
from unicom_ds.checkpoint import rank_file, read_rank_file

REPO = Path(__file__).resolve().parents[1]
PAUSE = REPO / "tests" / "pause_after_first_checkpoint.py"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
# Test-sized runs of the README's commands: STEPS optimizer steps an epoch, a checkpoint every step.
STEPS = 12
FAST = [f"train.steps_per_epoch={STEPS}", "train.ckpt_every_steps=1", "train.log_every=1", "progress=off"]


def readme_continuations() -> dict[str, list[str]]:
    """The README's demo continuation commands, as argv, by the recipe they use."""
    text = (REPO / "README.md").read_text()
    lines = [line for line in text.splitlines() if line.startswith("python slurm/submit.py") and
             "train.continue_from=runs/demo" in line]
    return {re.search(r"recipes/(\w+)\.yaml", line)[1]: shlex.split(line) for line in lines}


def run_readme(argv: list[str], base: Path, run: Path, log: Path, pause_marker: Path | None = None):
    """The README command on test-sized data; with `pause_marker`, started (not waited for) through
    tests/pause_after_first_checkpoint.py: its ranks stand still once their first checkpoint is published."""
    argv = [a.replace("train.continue_from=runs/demo", f"train.continue_from={base}")
             .replace("run_dir=runs/", f"run_dir={run.parent}/") for a in argv]
    assert argv[:2] == ["python", "slurm/submit.py"] and f"run_dir={run}" in argv
    argv = [sys.executable, *argv[1:], *FAST]
    if pause_marker is not None:
        return subprocess.Popen([sys.executable, str(PAUSE), *argv[1:]], cwd=REPO,
                                env={**ENV, "UNICOM_TEST_PAUSE_MARKER": str(pause_marker)}, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=540)
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{argv} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A finished 2-rank run of ViT-Tiny-16 (64 px): 2 epochs of 2 steps."""
    root = tmp_path_factory.mktemp("continuation")
    data = make_run(root, [13, 9, 6], k=10)
    ds = ds_config(root / "ds.json", bf16=None)
    cfg = config.resolve([f"run_dir={data['run']}", f"data.shards={data['shards']}", "model=ViT-Tiny-16", "stage=train",
                          "device=cpu", f"train.deepspeed_config={ds}", "train.precision=fp32", "train.epochs=2",
                          "train.steps_per_epoch=2", "train.workers=0", "train.local_processes=2", "loss.r1=0.5",
                          "train.log_every=1"])
    proc = subprocess.run(train.local_command(cfg), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"root": root, "run": data["run"]}


def wait_paused(proc: subprocess.Popen, marker: Path, log: Path, timeout_s: float = 540) -> dict:
    """The marker of tests/pause_after_first_checkpoint.py: the launch stands at its first checkpoint."""
    deadline = time.time() + timeout_s
    while not marker.is_file():
        assert proc.poll() is None, f"the launch ended (exit {proc.returncode}) before its first checkpoint:\n" \
            + log.read_text()[-3000:]
        assert time.time() < deadline, f"no checkpoint within {timeout_s:.0f} s:\n" + log.read_text()[-3000:]
        time.sleep(0.2)
    return json.loads(marker.read_text())


def lrs(run: Path) -> dict[int, float]:
    return dict(tblog.read_scalars(str(run / "tensorboard" / "train"))["train/lr"])


@pytest.mark.slow
def test_compact_epoch_runs_at_its_stated_lr_and_resumes_after_a_kill(base):
    argv = readme_continuations()["compact"]
    run = base["root"] / "demo-compact"
    marker = base["root"] / "compact1.paused.json"
    first = run_readme(argv, base["run"], run, base["root"] / "compact1.log", pause_marker=marker)
    paused = wait_paused(first, marker, base["root"] / "compact1.log")
    os.killpg(paused["pgid"], signal.SIGKILL)  # the deepspeed ranks (a session of their own), mid-run ...
    os.killpg(first.pid, signal.SIGKILL)  # ... and the launcher
    first.wait()
    killed_at = int((run / "train" / "ckpt" / "latest").read_text().strip().split("_")[1])
    assert killed_at == paused["step"] == 1 and not (run / "train" / "backbone.pt").exists()
    log = run_readme(argv, base["run"], run, base["root"] / "compact2.log")
    assert f"resumed from {run / 'train' / 'ckpt' / f'step_{killed_at}'}" in log and "[train] continues from" not in log
    assert f"steps {killed_at} -> {STEPS} of {STEPS}" in log
    saved = config.resolve([f"run_dir={run}"])
    assert saved.loss.r2 == 0.5 and saved.train.continue_from == str(base["run"])
    assert saved.data.shards == config.resolve([f"run_dir={base['run']}"]).data.shards  # inherited from the base
    assert lrs(run) == pytest.approx(recipe_lrs())
    export = json.loads((run / "train" / "export.json").read_text())
    assert export["step"] == STEPS and export["model"] == "ViT-Tiny-16"


def recipe_lrs() -> dict[int, float]:
    """The recipes' own schedule (lr 1e-4, warmup round(0.05 * STEPS) steps, cosine over STEPS), as logged after
    each step with the lr that step used; never the tail of the base run's finished cosine (0 by now)."""
    for name in ("compact", "vit_l_14_336"):
        recipe = config.resolve([f"config=slurm/configs/recipes/{name}.yaml", fresh_run()]).train
        assert (float(recipe.lr), recipe.schedule, recipe.warmup_epochs) == (1e-4, "cosine", 0.05)
    warmup = round(0.05 * STEPS)
    expected = {s: schedule.lr_at(s - 1, 1e-4, warmup, STEPS) for s in range(1, STEPS + 1)}
    assert warmup == 1 and expected[2] == pytest.approx(1e-4)
    return expected


@pytest.mark.slow
def test_96px_epoch_interpolates_the_position_grid_and_carries_the_prototypes(base):
    argv = readme_continuations()["vit_l_14_336"]
    assert "model=ViT-Tiny-16-96" in argv
    run = base["root"] / "demo-96px"
    log = run_readme(argv, base["run"], run, base["root"] / "96px.log")
    assert f"continues from {base['run']} (ViT-Tiny-16 at its step 4)" in log
    assert "ViT-Tiny-16-96" in log and f"steps 0 -> {STEPS} of {STEPS}" in log
    before = torch.load(base["run"] / "train" / "backbone.pt", weights_only=True)
    after = torch.load(run / "train" / "backbone.pt", weights_only=True)
    resized = unicom_vit.resize_state_dict(before, 96)
    assert after["pos_embed"].shape == (1, 36, 64) and before["pos_embed"].shape == (1, 16, 64)
    # 12 AdamW steps at lr <= 1e-4 move a weight by at most ~1e-3: the start was the bicubic resize.
    for key in ("pos_embed", "feature.0.weight"):
        assert (after[key] - resized[key]).abs().max() < 2e-3, key
    official = unicom_vit.UnicomViT(**unicom_vit.CONFIGS["ViT-Tiny-16-96"]).eval()
    official.load_state_dict(after, strict=True)
    with torch.no_grad():
        assert official(torch.randn(2, 3, 96, 96)).shape == (2, 64)
    # The prototypes continue from the base's blocks (a fresh init would differ by ~0.01 per entry).
    base_ckpt = base["run"] / "train" / "ckpt" / json.loads((base["run"] / "train" / "export.json").read_text())[
        "checkpoint"]
    old = torch.cat([read_rank_file(rank_file(base_ckpt, r))["weight"] for r in (0, 1)])
    new = torch.cat([read_rank_file(rank_file(run / "train" / "ckpt" / f"step_{STEPS}", r))["weight"]
                     for r in (0, 1)])
    assert (new - old).abs().max() < 2e-3 and (old.abs().max() > 1e-2)
    assert lrs(run) == pytest.approx(recipe_lrs())


def test_continuation_errors_before_anything_runs(base, tmp_path):
    from unicom_ds import train_plan
    unfinished = tmp_path / "unfinished"
    (unfinished / "train").mkdir(parents=True)
    (unfinished / "config.yaml").write_text("model: ViT-Tiny-16\n")
    cfg = config.resolve([f"run_dir={tmp_path / 'new'}", f"train.continue_from={unfinished}"])
    with pytest.raises(config.ConfigError, match=r"train.continue_from=.*unfinished: .*export.json is missing; "
                                                 r"the run has not finished training"):
        train_plan.precheck(cfg, 1, "1 rank", labels_expected=False)
    cfg = config.resolve([f"run_dir={tmp_path / 'new2'}", f"train.continue_from={base['run']}", "model=ViT-Tiny-32"])
    with pytest.raises(config.ConfigError, match=r"model=ViT-Tiny-32: .* trained ViT-Tiny-16; a continuation keeps "
                                                 r"the architecture"):
        train_plan.precheck(cfg, 1, "1 rank", labels_expected=False)
