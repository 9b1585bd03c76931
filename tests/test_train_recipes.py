"""The paper's recipes start: every README train command is accepted before submission and plans the stated
global batch (32768); bad rank counts, models and DeepSpeed files are refused up front; the release ViT-B/16
trains for real in 2 deepspeed processes and exports a file the official architecture loads (768-d)."""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fresh_run, load_submit
from tests.train_fixtures import ds_config, make_run
from unicom_ds import config, train, train_plan, unicom_vit

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 32768
MICRO = {"ViT-B-32": 128, "ViT-B-16": 128, "ViT-L-14": 64, "ViT-L-14-336": 32, "MLCD-ViT-B-32": 128,
         "MLCD-ViT-L-14-336": 32, "MLCD-ViT-bigG-14-224": 64, "MLCD-ViT-bigG-14-336": 32, "MLCD-ViT-bigG-14-448": 16}
# Each model's file under train.deepspeed_config=auto (zero2.json for the others).
RECIPE_FILES = {"ViT-L-14": "zero2_l14.json", "ViT-L-14-336": "zero2_l14_336.json",
                "MLCD-ViT-L-14-336": "zero2_l14_336.json", "MLCD-ViT-bigG-14-224": "zero2_bigG_224.json",
                "MLCD-ViT-bigG-14-336": "zero2_bigG_336.json", "MLCD-ViT-bigG-14-448": "zero2_bigG_448.json"}


submit = load_submit()


def finished_run(run: Path, model: str) -> Path:
    """The files a finished run leaves that the launcher checks (cluster outputs, export, its checkpoint)."""
    (run / "kmeans").mkdir(parents=True)
    (run / "kmeans" / "summary.json").write_text(json.dumps({"k": 1000000}))
    (run / "config.yaml").write_text(f"run_dir: {run}\nmodel: {model}\n")
    ckpt = run / "train" / "ckpt" / "step_390"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 390, "model": model}))
    (run / "train" / "backbone.pt").write_bytes(b"")
    (run / "train" / "export.json").write_text(json.dumps({"model": model, "step": 390, "checkpoint": "step_390"}))
    return run


def readme_train_commands() -> list[str]:
    """The README's train commands of the real-cluster recipe: `python slurm/submit.py stage=train` and
    `deepspeed unicom_ds/train.py`, with `$RUN...` placeholders."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("#")[0].split())
            if "$RUN" in line and (line.startswith("deepspeed unicom_ds/train.py") or "stage=train" in line):
                commands.append(line)
    return commands


@pytest.fixture
def runs(tmp_path):
    """$RUN: a finished ViT-B-16 run; $RUN-L14: a finished ViT-L-14 run; anything else: a new directory."""
    return {"$RUN-L14": finished_run(tmp_path / "l14", "ViT-L-14"), "$RUN": finished_run(tmp_path / "b16", "ViT-B-16"),
            "new": tmp_path}


def substitute(arg: str, runs: dict) -> str:
    key, _, value = arg.partition("=")
    if key == "train.continue_from":
        return f"{key}={runs[value]}"
    if key == "run_dir":
        return f"{key}={runs[value] if value in runs else runs['new'] / value.strip('$')}"
    assert "$" not in arg, arg
    return arg


def test_readme_train_commands_are_the_recipes():
    commands = readme_train_commands()
    assert len([c for c in commands if c.startswith("python")]) >= 3 and any(c.startswith("deepspeed") for c in commands)
    assert any("recipes/compact.yaml" in c for c in commands) and any("recipes/vit_l_14_336.yaml" in c for c in commands)
    # MLCD's recipes (issue 30): B/32 and L/14@336 with the paper's loss and schedule keys.
    for model in ("MLCD-ViT-B-32", "MLCD-ViT-L-14-336"):
        assert any(f"model={model} loss.kind=mlcd loss.r1=0.1 train.weight_decay=0.2" in c for c in commands), model


def test_every_mlcd_model_has_its_micro_batch():
    """No MLCD model is left on the default file unsized: each has a recipe micro batch (bigG's own files)."""
    from unicom_ds import mlcd_vit

    assert {name for name in mlcd_vit.CONFIGS if "Tiny" not in name} <= MICRO.keys()


@pytest.mark.parametrize("command", readme_train_commands())
def test_every_readme_train_command_plans_the_stated_global_batch(command, runs, capsys):
    argv = shlex.split(command)
    if argv[0] == "deepspeed":  # one node of 8 GPUs: the launcher sets WORLD_SIZE for each rank
        args = [substitute(a, runs) for a in argv[2:]] + ["dry_run=true"]
        proc = subprocess.run([sys.executable, "unicom_ds/train.py", *args], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "WORLD_SIZE": "8"}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out, ranks = proc.stdout, "8 ranks (WORLD_SIZE=8)"
    else:
        assert argv[:2] == ["python", "slurm/submit.py"]
        code = submit.main([substitute(a, runs) for a in argv[2:]] + ["dry_run=true"])
        out = capsys.readouterr().out
        assert code == 0, out
        ranks = "128 ranks (16 node(s) x 8 GPU(s))"
    model = re.search(r"^train: (\S+) \(", out, flags=re.M)[1]
    micro = MICRO[model]
    world = int(ranks.split()[0])
    assert f"global batch {GLOBAL_BATCH} = micro {micro} x {ranks} x {GLOBAL_BATCH // (micro * world)} accumulation" \
        in out
    assert ("MLCD RoPE2D ViT" if model.startswith("MLCD-") else "Unicom release architecture") in out


def test_the_done_when_command(tmp_path, capsys):
    run = finished_run(tmp_path / "run", "ViT-B-16")
    code = submit.main(["stage=train", f"run_dir={run}", "model=ViT-B-16", "slurm.nodes=16", "slurm.gpus_per_node=8",
                        "dry_run=true"])
    out = capsys.readouterr().out
    assert code == 0
    assert "train: ViT-B-16 (Unicom release architecture, 224 px, 768-d embedding)" in out
    assert "global batch 32768 = micro 128 x 128 ranks (16 node(s) x 8 GPU(s)) x 2 accumulation" in out
    assert "#SBATCH --nodes=16" in out and "#SBATCH --ntasks-per-node=8" in out


@pytest.mark.parametrize("model", list(MICRO))
@pytest.mark.parametrize("world", [1, 8, 128, 256])
def test_each_model_recipe_divides_for_every_power_of_two_up_to_256(model, world):
    cfg = config.resolve([f"model={model}", fresh_run()])
    ds = train_plan.deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == GLOBAL_BATCH and ds["train_micro_batch_size_per_gpu"] == MICRO[model]
    assert ds["gradient_accumulation_steps"] * MICRO[model] * world == GLOBAL_BATCH and ds["bf16"]["enabled"]
    assert train_plan.ds_path(cfg).name == RECIPE_FILES.get(model, "zero2.json")


@pytest.mark.parametrize("args, message", [
    (["slurm.nodes=3", "slurm.gpus_per_node=8"], r"zero2\.json: train_batch_size 32768 is not a multiple of "
                                                 r"train_micro_batch_size_per_gpu 128 x 24 ranks"),
    (["model=ViT-B-33"], r"model=ViT-B-33: expected one of ViT-B-32, ViT-B-16"),
    (["train.deepspeed_config=ds_configs/micro1.json"], r"micro1\.json: train_micro_batch_size_per_gpu 1: the ViT-B-32 "
                                                        r"head's BatchNorm .* at least 2 samples"),
    (["train.deepspeed_config=ds_configs/nope.json"], r"train.deepspeed_config=ds_configs/nope.json: .* is not a file"),
])
def test_bad_train_plans_are_refused_before_submission(tmp_path, capsys, args, message):
    run = finished_run(tmp_path / "run", "ViT-B-16")
    (run / "config.yaml").unlink()
    (tmp_path / "micro1.json").write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 1}))
    args = [a.replace("ds_configs/micro1.json", str(tmp_path / "micro1.json")) for a in args]
    code = submit.main(["stage=train", f"run_dir={run}", *args])
    err = capsys.readouterr().err
    assert code == 2 and re.search(message, err), err
    assert not (run / "config.yaml").exists()  # nothing saved, nothing submitted


def test_train_without_cluster_outputs_is_refused_before_submission(tmp_path, capsys):
    code = submit.main(["stage=train", f"run_dir={tmp_path / 'empty'}", "launcher=slurm"])
    assert code == 2 and "kmeans/summary.json is missing; run stage=cluster first" in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()


def test_a_dry_run_needs_no_data(tmp_path, capsys):
    """The README's 16-node dry run without the shards, k-means output or eval sets: the plan and the sbatch
    scripts still print, and each missing input is a line of the plan."""
    run = tmp_path / "run"
    code = submit.main(["stage=all", f"run_dir={run}", "launcher=slurm", "data.shards=/nowhere/{00000..00009}.tar",
                        "kmeans.k=1000", "model=ViT-B-16", "train.slurm.nodes=16", "train.slurm.gpus_per_node=8",
                        "eval.data_root=/nowhere/eval", "dry_run=true"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "missing (cluster; a real submission stops here): data.shards: 10 of 10 shard(s) missing or unreadable: " \
           "/nowhere/00000.tar, /nowhere/00001.tar" in out
    assert "missing (eval; a real submission stops here): eval.datasets" in out
    assert "global batch 32768 = micro 128 x 128 ranks (16 node(s) x 8 GPU(s)) x 2 accumulation" in out
    assert "#SBATCH --nodes=16" in out and not run.exists()


def test_a_local_run_asking_for_nodes_says_which_launcher_it_uses(tmp_path, capsys):
    """launcher=local recorded in RUN/config.yaml (as the demo's) with slurm.nodes=16: the plan says the local
    launcher runs it, with its local ranks, and shows no sbatch script."""
    run = finished_run(tmp_path / "run", "ViT-B-16")
    (run / "config.yaml").write_text(f"run_dir: {run}\nmodel: ViT-B-16\nlauncher: local\n"
                                     "train:\n  local_processes: 2\n")
    code = submit.main(["stage=train", f"run_dir={run}", "slurm.nodes=16", "dry_run=true"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "launcher=local: this machine runs the stage and slurm.nodes=16 is not used" in out
    assert "x 2 ranks (train.local_processes)" in out
    assert "launcher=local: this machine would run, in order: train" in out
    assert "#SBATCH" not in out and "16 node(s)" not in out


def test_train_help_prints_usage_and_where_the_keys_are():
    proc = subprocess.run([sys.executable, "unicom_ds/train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "usage: deepspeed [--num_gpus N] unicom_ds/train.py" in proc.stdout
    assert "key=value" in proc.stdout and '"Config keys"' in proc.stdout and "dry_run=true" in proc.stdout


@pytest.mark.slow
def test_release_vit_b16_trains_in_two_deepspeed_processes_and_exports_a_release_file(tmp_path):
    data = make_run(tmp_path, [5, 5], k=10)
    ds = ds_config(tmp_path / "ds.json", batch=4, micro=2)
    cfg = config.resolve([f"run_dir={data['run']}", f"data.shards={data['shards']}", "model=ViT-B-16", "stage=train",
                          "device=cpu", f"train.deepspeed_config={ds}", "train.epochs=1", "train.steps_per_epoch=2",
                          "train.workers=0", "train.local_processes=2", "loss.r1=1.0", "train.log_every=1",
                          "progress=off"])
    proc = subprocess.run(train.local_command(cfg), cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "ViT-B-16 on 2 rank(s)" in proc.stdout and "steps 0 -> 2" in proc.stdout
    path = data["run"] / "train" / "backbone.pt"
    official = unicom_vit.UnicomViT(**unicom_vit.CONFIGS["ViT-B-16"]).eval()
    missing, unexpected = official.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not missing and not unexpected
    import unicom_ds
    loaded, preprocess = unicom_ds.load("ViT-B-16", checkpoint=path)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = official(x)
        torch.testing.assert_close(loaded(x), out)
    assert out.shape == (2, 768) and torch.isfinite(out).all()
