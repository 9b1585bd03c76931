"""A run directory is a ledger (issue 29): each command below is tried, as a new user would type it, on a copy
of one finished small run (the real cluster stage on real demo shards, then 2 DeepSpeed ranks of training).

For every refusal: the exit code, the message naming the key or the file, the run tree byte-identical (every
file outside logs/ hashed before and after), and the plain command working when rerun afterwards.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, load_submit
from unicom_ds import config, train_data
from unicom_ds.continuation import LabelSource

ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
K = 4


def common(run: Path, shards: str) -> list[str]:
    return [f"run_dir={run}", f"data.shards={shards}", "launcher=local", "device=cpu", "progress=off",
            "clip.model=ViT-Tiny-16", "clip.pretrained=random", f"kmeans.k={K}", "model=ViT-Tiny-16",
            "train.deepspeed_config=ds_configs/demo_cpu.json", "train.precision=fp32", "train.local_processes=2",
            "train.workers=0", "train.epochs=1", "train.steps_per_epoch=3", "train.ckpt_every_steps=2",
            "loss.r1=1.0"]


def tree(run: Path) -> dict:
    """sha256 of every file of the run outside logs/ (the launcher's own log of a refused command may grow)."""
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file() and p.relative_to(run).parts[0] != "logs"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, demo_shards):
    root = tmp_path_factory.mktemp("ledger")
    shards = root / "shards"
    shutil.copytree(Path(demo_shards.split("{")[0]), shards)  # the tests below remove some
    pattern = f"{shards}/{{00000..00002}}.tar"
    run = root / "run"
    proc = subprocess.run([sys.executable, "slurm/submit.py", "stage=cluster", *common(run, pattern)], cwd=REPO,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    proc = subprocess.run([sys.executable, "slurm/submit.py", "stage=train", f"run_dir={run}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (run / "train" / "backbone.pt").is_file() and (run / "labels" / "summary.json").is_file()
    return {"root": root, "run": run, "shards": shards, "pattern": pattern}


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run whose config.yaml names its own folder."""
    copy = tmp_path / "run"
    shutil.copytree(finished["run"], copy)
    saved = copy / "config.yaml"
    saved.write_text(saved.read_text().replace(str(finished["run"]), str(copy)))
    return copy


def submit(capsys, *args) -> tuple[int, str]:
    code = load_submit().main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def refused(capsys, run: Path, args: list[str], message: str) -> None:
    """`args` exit 2 with `message`, before anything of the run changed; dry_run=true reports the same refusal
    (an input that is missing as a line of its plan: "a real submission stops here")."""
    before = tree(run)
    code, out = submit(capsys, *args, f"run_dir={run}")
    assert code == 2, out
    assert message in out and "Traceback" not in out, out
    assert tree(run) == before
    code, dry = submit(capsys, *args, f"run_dir={run}", "dry_run=true")
    assert message in dry, dry
    assert code == 2 or "a real submission stops here): " + message in dry, dry
    assert tree(run) == before


def test_train_resume_none_never_overwrites_a_finished_run(capsys, run):
    backbone = (run / "train" / "backbone.pt").read_bytes()
    refused(capsys, run, ["stage=train", "model=ViT-Tiny-32", "train.resume=none"],
            f"train.resume=none: {run}/train holds checkpoints up to step_3; training from scratch would overwrite "
            f"them: use a new run_dir, or remove {run}/train yourself")
    refused(capsys, run, ["stage=train", "train.resume=none"], "training from scratch would overwrite them")
    # the plain command still works: it resumes at the end, trains nothing, keeps the export
    proc = subprocess.run([sys.executable, "slurm/submit.py", "stage=train", f"run_dir={run}"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "train" / "backbone.pt").read_bytes() == backbone


def test_one_off_keys_are_never_recorded_nor_read_back(capsys, run):
    # An older run recorded `resume: none` and a trust: read back, they would switch the checks off for good.
    saved = run / "config.yaml"
    recorded = yaml.safe_load(saved.read_text())
    recorded["train"].update(resume="none", trust_checkpoint=True)
    saved.write_text(yaml.safe_dump(recorded))
    assert config.resolve([f"run_dir={run}"]).train.resume == "latest"
    refused(capsys, run, ["stage=train", "model=ViT-Tiny-32"],
            "was made with a different config (model: 'ViT-Tiny-16' there, 'ViT-Tiny-32' now)")
    refused(capsys, run, ["stage=train", "loss.kind=mlcd"], "00000.topl.npy is missing")
    config.save(config.resolve([f"run_dir={run}", "train.resume=none", "dry_run=true", "stage=train"]))
    written = yaml.safe_load(saved.read_text())
    assert "resume" not in written["train"] and "trust_checkpoint" not in written["train"]
    assert "stage" not in written and "dry_run" not in written


def test_cluster_rerun_with_another_top_l_is_refused_before_anything_runs(capsys, run):
    refused(capsys, run, ["stage=cluster", "assign.top_l=3"],
            f"{run}/labels holds labels of another search ({run}/labels/search.json: top_l 1 there, 3 now); delete "
            f"{run}/labels to label again, or use a new run_dir")
    code, out = submit(capsys, "stage=cluster", f"run_dir={run}")
    assert code == 0, out
    assert "3 of 3 shards already done" in out and "assign: 3 of 3 shards already labelled" in out


def test_top_l_above_k_is_refused_before_kmeans(capsys, finished, tmp_path):
    fresh = tmp_path / "fresh"
    code, out = submit(capsys, "stage=cluster", *common(fresh, finished["pattern"]), "assign.top_l=5")
    assert code == 2
    assert f"assign.top_l=5: more than the k={K} centroids (kmeans.k); at most {K}" in out
    assert not fresh.exists()


def test_ivf_settings_beyond_k_are_clamped_and_recorded_as_used(capsys, finished, tmp_path):
    fresh = tmp_path / "ivf"
    code, out = submit(capsys, "stage=cluster", *common(fresh, finished["pattern"]), f"embed.from={finished['run']}",
                       "assign.search=ivf", "assign.nlist=1000", "assign.nprobe=5000")
    assert code == 0, out
    assert f"assign.nlist=1000: k={K} centroids make at most {K} lists; {K} used" in out
    assert f"assign.nprobe=5000: more than the {K} lists; {K} used" in out
    search = yaml.safe_load((fresh / "labels" / "search.json").read_text())
    assert (search["nlist"], search["nprobe"]) == (K, K)


def test_missing_shards_are_refused_at_submission(capsys, finished, run, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(finished["shards"], shards)
    saved = run / "config.yaml"
    saved.write_text(saved.read_text().replace(str(finished["shards"]), str(shards)))
    (shards / "00001.tar").unlink()
    (shards / "00002.tar").unlink()
    refused(capsys, run, ["stage=train", "train.epochs=2"],
            f"data.shards: 2 of 3 shard(s) missing or unreadable: {shards}/00001.tar, {shards}/00002.tar")


def test_a_train_job_without_its_shards_stops_at_once_naming_them(finished, run, tmp_path):
    """The issue's case: the run's config names the shards relatively and the job starts in another folder.
    Before, webdataset warned about the missing files for ever; now the job stops before its first step."""
    rel = os.path.relpath(finished["shards"], REPO)
    saved = run / "config.yaml"
    saved.write_text(saved.read_text().replace(str(finished["shards"]), rel))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", "2",
            "--master_port", str(__import__("unicom_ds.train", fromlist=["free_port"]).free_port()),
            str(REPO / "unicom_ds" / "train.py"), "--deepspeed_config", str(REPO / "ds_configs" / "demo_cpu.json"),
            f"run_dir={run}", "train.epochs=2"]
    proc = subprocess.run(argv, cwd=elsewhere, env={**ENV, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=300)  # before: no end at all
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"data.shards: 3 of 3 shard(s) missing or unreadable (relative paths from {elsewhere}): " \
           f"{rel}/00000.tar" in out, out[-3000:]
    assert "step 4" not in out


def test_a_shard_gone_while_training_stops_the_loader(finished, tmp_path):
    """A shard that disappears after the job's check: the loader's first attempt to open it ends the job."""
    run = finished["run"]
    shards = tmp_path / "shards"
    shutil.copytree(finished["shards"], shards)
    urls = [str(shards / f"0000{i}.tar") for i in range(3)]
    (shards / "00001.tar").unlink()
    batches = train_data.epoch_batches(urls, LabelSource(run, run / "embed"), 32, 4, 1000, seed=0, rank=0)
    start = time.monotonic()
    with pytest.raises(train_data.LabelError, match=f"shard unreadable while training: .*{shards}/00001.tar"):
        for _ in batches:
            pass
    assert time.monotonic() - start < 120  # generous: it stops at the first draw of the shard


def test_an_embed_task_whose_shard_is_gone_stops_naming_it(finished, tmp_path):
    from cluster_job.embed import embed_shards

    cfg = config.resolve(common(tmp_path / "embed", finished["pattern"]))
    gone = str(tmp_path / "00009.tar")
    with pytest.raises(FileNotFoundError, match=f"data.shards: 1 of 1 shard\\(s\\) missing or unreadable: {gone}"):
        embed_shards(config.select(cfg), [gone])
    assert not (tmp_path / "embed" / "embed").exists()
