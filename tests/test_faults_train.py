"""Training faults, injected for real through 2-rank `deepspeed` launches on one run directory:

- a finite base run (steps 0-2), then lr=1e39, whose first update makes the weights infinite: the save is
  refused, the job exits non-zero, `latest` and backbone.pt stay as they were;
- a NaN loss injected at given steps on both ranks (tests/nan_loss_train.py): exactly those steps are skipped, on
  both ranks together (no hang), the job stops after train.max_bad_steps with a one-line error and a non-zero
  exit, every checkpoint left is finite;
- lr=1e6 (the issue's reproduction), whose path to NaN depends on the machine's floating point: the job stops
  with a non-zero exit, the last checkpoint finite;
- a pickle payload planted in a rank file, resumed from outside the run: refused without
  train.trust_checkpoint, and with it the payload still does not run;
- labels made for other shards: the job fails before the first step, naming the run directory;
- reruns the job would refuse (another model, a resume from outside the run, another stage's key) are refused
  by the launcher, and the finished run stays byte-identical.
"""
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.nan_loss_train import NAN_STEPS
from tests.train_fixtures import ds_config, make_run
from unicom_ds import config, tblog, train
from unicom_ds.checkpoint import ENGINE_TAG, rank_file, read_rank_file

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def launch(run: Path, ds: Path, log: Path, *overrides: str,
           script: Path = REPO / "unicom_ds/train.py") -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", "2", "--master_port", str(train.free_port()),
            str(script), "--deepspeed_config", str(ds), f"run_dir={run}", *overrides]
    proc = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=540)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def finite_checkpoint(step_dir: Path) -> bool:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=ENGINE_TAG)
    blocks = [read_rank_file(rank_file(step_dir, r))["weight"] for r in (0, 1)]
    return all(bool(torch.isfinite(t).all()) for t in (*state.values(), *blocks) if t.is_floating_point())


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_run(root, [13, 9, 6], k=10)
    ds = ds_config(root / "ds.json")
    cfg = config.resolve([f"run_dir={data['run']}", f"data.shards={data['shards']}", "model=ViT-Tiny-16", "stage=train",
                          "device=cpu", f"train.deepspeed_config={ds}", "train.epochs=10", "train.steps_per_epoch=4",
                          "train.max_steps=2", "train.ckpt_every_steps=1", "train.log_every=1", "train.workers=0",
                          "train.local_processes=2", "loss.r1=1.0", "train.keep_checkpoints=1", "train.warmup_epochs=0",
                          "progress=off"])
    proc = subprocess.run(train.local_command(cfg), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return {"root": root, "run": data["run"], "ds": ds, "data": data}


@pytest.fixture(scope="module")
def exploded(base):
    """lr=1e39: the first update of step 3 makes the weights infinite; then, from the same checkpoint, NaN losses at
    NAN_STEPS; then lr=1e6 from where that stopped."""
    run, ckpt = base["run"], base["run"] / "train" / "ckpt"

    def state() -> dict:
        latest = (ckpt / "latest").read_text()
        return {"latest": latest, "steps": sorted(p.name for p in ckpt.glob("step_*")),
                "backbone": sha(run / "train" / "backbone.pt"), "export": (run / "train" / "export.json").read_text(),
                "finite": finite_checkpoint(ckpt / latest.strip())}

    before = state()
    inf = launch(run, base["ds"], base["root"] / "inf.log", "train.lr=1e39", "train.max_steps=6")
    after_inf = state()
    nan = launch(run, base["ds"], base["root"] / "nan.log", "train.max_steps=12", "train.max_bad_steps=2",
                 script=REPO / "tests/nan_loss_train.py")
    after_nan = state()
    diverged = launch(run, base["ds"], base["root"] / "lr1e6.log", "train.lr=1e6", "train.max_steps=20",
                      "train.max_bad_steps=2")
    return {"before": before, "inf": inf, "after_inf": after_inf, "nan": nan, "after_nan": after_nan,
            "diverged": diverged, "after_diverged": state()}


@pytest.mark.slow
def test_infinite_weights_are_never_saved(base, exploded):
    inf = exploded["inf"]
    out = inf.stdout + inf.stderr
    assert inf.returncode != 0
    assert "error: step 3: the weights are not finite; no checkpoint written. The last finite checkpoint is " \
           f"{base['run'] / 'train' / 'ckpt' / 'step_2'}" in out
    assert "Traceback" not in out
    assert exploded["after_inf"] == exploded["before"]  # latest (finite), backbone.pt, export.json kept


@pytest.mark.slow
def test_nan_steps_are_skipped_then_the_job_stops_with_an_error(base, exploded):
    """Steps 4, 6 and 7 have a NaN loss on both ranks, from step 2's checkpoint: those three are skipped and the third
    stops the job; steps 3 and 5 train, and the checkpoints after a skipped step are finite."""
    nan = exploded["nan"]
    out = nan.stdout + nan.stderr
    ckpt = base["run"] / "train" / "ckpt"
    assert nan.returncode != 0
    skipped = [int(m[1]) for m in re.finditer(r"step (\d+): non-finite loss or gradients, step skipped", out)]
    assert skipped == sorted(NAN_STEPS)  # rank 0 logs: both ranks decided together, neither hung
    said = "error: 3 optimizer steps with non-finite loss or gradients (train.max_bad_steps=2); stopping without " \
           f"saving. The last finite checkpoint is {ckpt / 'step_6'} (train.resume=latest continues from it); "
    errors = [line for line in out.splitlines() if "optimizer steps with non-finite" in line]
    assert errors and all(line.startswith(said) for line in errors), out[-4000:]  # each rank that said it: one line
    assert "Traceback" not in out
    # step_6 alone (keep_checkpoints=1), finite; backbone.pt and export.json never rewritten
    assert exploded["after_nan"] == {**exploded["before"], "latest": "step_6\n", "steps": ["step_6"]}
    scalars = dict(tblog.read_scalars(str(base["run"] / "tensorboard" / "train"))["train/skipped_steps"])
    assert [scalars[step] for step in (4, 5, 6)] == [1, 1, 2]  # logged after the 1st and 2nd skip


@pytest.mark.slow
def test_a_diverging_learning_rate_stops_the_job_and_keeps_a_finite_checkpoint(base, exploded):
    """lr=1e6 from step 6: however this machine's floating point reaches non-finite values, the job fails and what
    it leaves is finite, backbone.pt untouched."""
    assert exploded["diverged"].returncode != 0
    assert exploded["after_diverged"]["finite"]
    assert exploded["after_diverged"]["backbone"] == exploded["before"]["backbone"]


@pytest.mark.slow
def test_a_planted_payload_in_a_resumed_checkpoint_does_not_run(base, exploded, tmp_path):
    ckpt = base["run"] / "train" / "ckpt"
    outside = tmp_path / "downloaded" / "step_x"
    shutil.copytree(ckpt / (ckpt / "latest").read_text().strip(), outside)
    marker = tmp_path / "pwned"
    state = torch.load(rank_file(outside, 0), weights_only=True)
    torch.save({**state, "rng": Payload(marker)}, rank_file(outside, 0))
    run2 = tmp_path / "run2"
    shutil.copytree(base["run"], run2, ignore=shutil.ignore_patterns("ckpt", "tensorboard"))
    (run2 / "config.yaml").write_text((run2 / "config.yaml").read_text().replace(str(base["run"]), str(run2)))
    refused = launch(run2, base["ds"], tmp_path / "untrusted.log", f"train.resume={outside}", "train.lr=1e-3")
    assert refused.returncode != 0
    assert "is outside this run's checkpoints" in refused.stdout + refused.stderr
    trusted = launch(run2, base["ds"], tmp_path / "trusted.log", f"train.resume={outside}",
                     "train.trust_checkpoint=true", "train.lr=1e-3")
    assert trusted.returncode != 0
    assert "rank_00000.pt: not a rank file this project wrote" in trusted.stdout + trusted.stderr
    assert not marker.exists()


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_labels_of_other_shards_fail_before_the_first_step(base, tmp_path):
    run3 = tmp_path / "run3"
    shutil.copytree(base["run"], run3, ignore=shutil.ignore_patterns("train", "tensorboard", "config.yaml"))
    for keys in (run3 / "embed").glob("*.keys.txt"):
        keys.write_text("".join(f"x{i}\n" for i in range(len(keys.read_text().splitlines()))))
    proc = launch(run3, base["ds"], tmp_path / "unlabelled.log", f"data.shards={base['data']['shards']}",
                  "model=ViT-Tiny-16", "device=cpu", "train.workers=0", "train.steps_per_epoch=2")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"LabelError: run_dir={run3}: none of the first 13 samples of " in out and "keys file: 'x0'" in out
    assert not (run3 / "train" / "ckpt").exists() and not (run3 / "config.yaml").exists()


def test_a_refused_rerun_leaves_the_finished_run_byte_identical(base, tmp_path, capsys):
    """Each rerun the job would refuse is refused by the launcher, before RUN/config.yaml or anything else is
    written: another model, a resume from outside the run, a key of a stage this one does not run."""
    from conftest import load_submit

    from unicom_ds.checkpoint import latest

    run = tmp_path / "run"
    shutil.copytree(base["run"], run)
    last = latest(run / "train" / "ckpt")  # the module's earlier faults may have moved it past step 2
    outside = tmp_path / "elsewhere" / last.name
    shutil.copytree(last, outside)
    before = {p.relative_to(run): sha(p) for p in run.rglob("*") if p.is_file()}
    saved_k = config.resolve([f"run_dir={run}"]).kmeans.k
    refusals = {
        ("stage=train", "model=ViT-Tiny-32"):
            f"{last} was made with a different config (model: 'ViT-Tiny-16' there, 'ViT-Tiny-32' now)",
        ("stage=train", f"train.resume={outside}"):
            f"train.resume={outside}: {outside} is outside this run's checkpoints",
        ("stage=train", "kmeans.k=5"):
            f"kmeans.k=5: {run}/kmeans was made with kmeans.k={saved_k}, and stage=train does not run kmeans",
        ("stage=eval", "model=ViT-Tiny-32"):
            f"model=ViT-Tiny-32: {run}/train was made with model=ViT-Tiny-16, and stage=eval does not run train",
    }
    submit = load_submit()
    for args, message in refusals.items():
        assert submit.main([*args, f"run_dir={run}", "launcher=local"]) == 2, args
        err = capsys.readouterr().err
        assert message in err, err
        assert {p.relative_to(run): sha(p) for p in run.rglob("*") if p.is_file()} == before, args
    # the trust key of a resume names its own section
    submit.main(["stage=train", f"run_dir={run}", "launcher=local", f"train.resume={outside}"])
    assert "pass train.trust_checkpoint=true" in capsys.readouterr().err
