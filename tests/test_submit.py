"""slurm/submit.py: dry-run sbatch scripts, up-front checks, and the local launcher's order and failures."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, load_submit
from slurm import launch, launch_local
from unicom_ds import config


submit = load_submit()


def tiny(run, shards, *extra):
    return [f"run_dir={run}", f"data.shards={shards}", "clip.model=ViT-Tiny-16", "clip.pretrained=random",
            "kmeans.k=8", *extra]


def scripts_by_step(out: str) -> dict[str, str]:
    """The printed dry-run output split into {step: sbatch script}."""
    parts = re.split(r"^# ---- (\w+): \d+ task\(s\) ----$", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", script, flags=re.M))


def test_dry_run_prints_scripts_with_resources_and_dependencies(tmp_path, demo_shards, capsys):
    run = tmp_path / "run"
    code = submit.main(tiny(run, demo_shards, "stage=cluster", "dry_run=true", "embed.shards_per_task=2",
                            "assign.shards_per_task=1", "embed.slurm.cpus_per_task=3", "slurm.mem_gb=2",
                            "slurm.time_min=17", "slurm.partition=debug", "slurm.account=lab",
                            "slurm.gpus_per_node=0", "slurm.array_parallelism=2"))
    out = capsys.readouterr().out
    assert code == 0
    scripts = scripts_by_step(out)
    assert list(scripts) == ["embed", "kmeans", "assign"]
    embed, kmeans, assign = (sbatch_options(scripts[s]) for s in ("embed", "kmeans", "assign"))

    # 3 shards in groups of 2 -> 2 embed tasks; 3 stems one by one -> 3 assign tasks, 2 at a time.
    assert embed["array"] == "0-1%2" and assign["array"] == "0-2%2"
    assert "array" not in kmeans
    assert embed["cpus-per-task"] == "3"                       # the stage's own slurm setting
    kmeans_default = yaml.safe_load((REPO / "slurm/configs/cluster.yaml").read_text())["kmeans"]["slurm"]
    assert kmeans["cpus-per-task"] == str(kmeans_default["cpus_per_task"])
    for opts in (embed, kmeans, assign):                      # top-level slurm.* overrides every stage
        assert (opts["mem"], opts["time"], opts["partition"], opts["account"]) == ("2G", "17", "debug", "lab")
        assert opts["nodes"] == "1" and opts["ntasks-per-node"] == "1"
        assert str(run / "logs") in opts["output"]
    assert "dependency" not in embed
    assert kmeans["dependency"] == "'afterok:<embed job id>'"
    assert assign["dependency"] == "'afterok:<kmeans job id>'"
    assert "gpus" not in out and "gres" not in out             # GPU-less cluster: no GPU request at all
    assert "python -u -m submitit.core._submit" in scripts["embed"]
    assert not run.exists()                                     # nothing saved, nothing submitted


def test_dry_run_train_and_eval_one_task_per_gpu(tmp_path, demo_shards, capsys, monkeypatch):
    # eval's data-set check is eval's business (tests/test_eval_job.py); here: what gets submitted.
    monkeypatch.setattr(launch, "precheck", lambda cfg: [])
    code = submit.main(tiny(tmp_path / "run", demo_shards, "stage=all", "dry_run=true", "slurm.gpus_per_node=4",
                            "slurm.nodes=2", "slurm.log_dir=" + str(tmp_path / "logs")))
    scripts = scripts_by_step(capsys.readouterr().out)
    assert code == 0 and list(scripts) == ["embed", "kmeans", "assign", "train", "eval", "report"]
    train, evaluation, kmeans, report = (sbatch_options(scripts[s]) for s in ("train", "eval", "kmeans", "report"))
    assert (train["nodes"], train["ntasks-per-node"], train["gpus-per-node"]) == ("2", "4", "4")
    assert (evaluation["ntasks-per-node"], evaluation["gpus-per-node"]) == ("4", "4")
    assert kmeans["nodes"] == "1"                               # single-process jobs never span nodes
    assert train["dependency"] == "'afterok:<assign job id>'"
    assert evaluation["dependency"] == "'afterok:<train job id>'"
    assert report["dependency"] == "'afterok:<eval job id>'"
    assert (report["nodes"], "gpus-per-node" in report) == ("1", False)   # the report needs no GPU
    assert train["output"].startswith(str(tmp_path / "logs"))
    # a failed task (a full disk on one rank) ends its partners instead of leaving them in a collective
    assert all("--kill-on-bad-exit=1" in scripts[s] for s in ("train", "eval"))
    assert not any("--kill-on-bad-exit" in scripts[s] for s in ("embed", "kmeans", "report"))


def run_cli(*args):
    return subprocess.run([sys.executable, "slurm/submit.py", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=300)


def test_failing_precheck_exits_2_and_writes_nothing(tmp_path, demo_shards):
    run = tmp_path / "run"
    missing = demo_shards.replace("00002}", "00003}")          # one shard more than exist
    res = run_cli(*tiny(run, missing, "stage=cluster", "launcher=slurm"))
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert "00003.tar" in res.stderr and "data.shards" in res.stderr
    assert not run.exists()

    res = run_cli(*tiny(run, demo_shards, "stage=cluster", "kmeans.kk=3"))
    assert res.returncode == 2 and "did you mean 'kmeans.k'" in res.stderr and "Traceback" not in res.stderr
    assert not run.exists()


def test_k_larger_than_the_data_is_refused_before_anything_runs(tmp_path, demo_shards, capsys):
    run = tmp_path / "run"
    code = submit.main(tiny(run, demo_shards, "stage=cluster", "kmeans.k=100000"))
    assert code == 2
    assert "kmeans.k" in capsys.readouterr().err
    assert not run.exists()


class Recorder:
    """Stand-in job functions that record their calls (the launcher's order is under test here)."""

    def __init__(self, fail: str | None = None):
        self.calls, self.fail = [], fail

    def job(self, step):
        def fn(cfg, *args):
            assert isinstance(cfg, dict)                         # job functions get a plain, picklable dict
            self.calls.append((step, *args))
            print(f"{step} working on {args}")
            if step == self.fail:
                raise RuntimeError(f"{step} broke on purpose")
        return fn

    def targets(self):
        fakes = {step: self.job(step) for step in ("embed", "kmeans", "assign", "eval", "report")}
        fakes["train_local"] = lambda cfg: [sys.executable, "-c", "print('train subprocess ran')"]
        return fakes.__getitem__


def test_local_launcher_runs_every_step_in_order(tmp_path, demo_shards, monkeypatch, capsys):
    rec = Recorder()
    monkeypatch.setattr(launch, "precheck", lambda cfg: [])
    monkeypatch.setattr(launch_local, "target", rec.targets())
    run = tmp_path / "run"
    code = submit.main(tiny(run, demo_shards, "stage=all", "launcher=local", "embed.shards_per_task=2",
                            "assign.shards_per_task=2"))
    out = capsys.readouterr().out
    assert code == 0
    shard = [demo_shards.replace("{00000..00002}", s) for s in ("00000", "00001", "00002")]
    assert rec.calls == [("embed", shard[:2]), ("embed", shard[2:]), ("kmeans",),
                         ("assign", ["00000", "00001"]), ("assign", ["00002"]), ("eval",), ("report",)]
    assert "train subprocess ran" in (run / "logs" / "local_train.log").read_text()
    assert "kmeans working on ()" in (run / "logs" / "local_kmeans.log").read_text()
    assert (run / "config.yaml").is_file()
    summary = out[out.index("summary:"):].splitlines()[1:]
    assert [line.split()[0] for line in summary] == ["embed", "kmeans", "assign", "train", "eval", "report"]
    assert str(run / "labels") in summary[2]


def test_local_launcher_failure_stops_the_chain(tmp_path, demo_shards, monkeypatch, capsys):
    rec = Recorder(fail="kmeans")
    monkeypatch.setattr(launch, "precheck", lambda cfg: [])
    monkeypatch.setattr(launch_local, "target", rec.targets())
    run = tmp_path / "run"
    code = submit.main(tiny(run, demo_shards, "stage=all", "launcher=local"))
    err = capsys.readouterr().err
    assert code == 1
    assert [c[0] for c in rec.calls] == ["embed", "kmeans"]    # assign, train, eval never started
    log = run / "logs" / "local_kmeans.log"
    assert "stage kmeans FAILED" in err and str(log) in err
    assert "RuntimeError: kmeans broke on purpose" in log.read_text()
    assert not (run / "logs" / "local_assign.log").exists()


def test_local_summary_counts_shards_rows_and_data_sets(tmp_path, demo_shards, monkeypatch, capsys):
    """The summary line of each step says what it made (once: `assign done 1 task(s)` for 3 shards)."""
    run = tmp_path / "run"

    def embed(cfg, paths):
        for p in paths:
            damaged = {"reason": "truncated", "rows_kept": 21, "rows_lost": 3} if p.endswith("00002.tar") else None
            write_json(run / "embed" / f"{Path(p).stem}.done.json",
                       {"n": 21, "skipped": {"corrupt image": 1}, "damaged": damaged})

    def assign(cfg, stems):
        for s in stems:
            np.save(run / "labels" / f"{s}.npy", np.zeros(21, np.int64))
        write_json(run / "labels" / "summary.json", {"shards": 3, "rows": 63, "non_empty_classes": 5})

    fakes = {
        "embed": embed, "assign": assign,
        "kmeans": lambda cfg: write_json(run / "kmeans" / "summary.json",
                                         {"k": 8, "points_used": 60, "points_embedded": 63}),
        "eval": lambda cfg: write_json(run / "eval" / "results.json",
                                       {"run": {"sop": {"R@1": 0.5}, "eurosat": {"top1": 0.9}}}),
        "report": lambda cfg: write_json(run / "report" / "index.html", {}),
        "train_local": lambda cfg: [sys.executable, "-c", "import pathlib; p = pathlib.Path(r'%s');"
                                    "(p / 'ckpt' / 'step_12').mkdir(parents=True); (p / 'backbone.pt').touch()"
                                    % (run / "train")],
    }
    (run / "labels").mkdir(parents=True)
    monkeypatch.setattr(launch, "precheck", lambda cfg: [])
    monkeypatch.setattr(launch_local, "target", fakes.__getitem__)
    code = submit.main(tiny(run, demo_shards, "stage=all", "launcher=local", "embed.shards_per_task=2",
                            "assign.shards_per_task=2"))
    out = capsys.readouterr().out
    assert code == 0
    summary = {line.split()[0]: line for line in out[out.index("summary:"):].splitlines()[1:]}
    assert "3 of 3 shards, 63 rows (3 skipped), 1 damaged" in summary["embed"]
    assert "k=8 on 60 of 63 rows" in summary["kmeans"]
    assert "3 shards, 63 rows, 5 non-empty classes" in summary["assign"]
    assert "12 steps, backbone.pt" in summary["train"]
    assert "1 model x 2 data sets (eurosat, sop)" in summary["eval"]
    assert "task" not in out[out.index("summary:"):]
    assert "[embed] task 1/2: 2 shards" in out and "[assign] task 2/2: 1 shard\n" in out


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_help_prints_usage_stages_and_the_key_reference():
    for flag in ("--help", "-h"):
        res = run_cli(flag)
        assert res.returncode == 0 and not res.stderr, res.stderr
        assert res.stdout.startswith("usage: python slurm/submit.py stage=STAGE")
        stages = re.search(r"^stages:\n((?:  .*\n)+)", res.stdout, flags=re.M).group(1)
        assert [line.split()[0] for line in stages.splitlines()] == list(config.STAGES)
        assert 'README.md, section "Config keys"' in res.stdout
        assert "python docs/config_reference.py --show" in res.stdout
    shown = subprocess.run([sys.executable, "docs/config_reference.py", "--show"], capture_output=True,
                           text=True, cwd=REPO)
    assert shown.returncode == 0 and "| `kmeans.k` | `1000000` | an integer >= 1 |" in shown.stdout


@pytest.mark.parametrize("arg, expected", [
    ("train.lr=abc", "error: train.lr=abc: expected a number"),
    ("kmeans.k=abc", "error: kmeans.k=abc: expected an integer >= 1"),
    ("kmeans.k=1.5", "error: kmeans.k=1.5: expected an integer >= 1"),
    ("kmeans.niter=abc", "error: kmeans.niter=abc: expected an integer >= 1"),
    ("run_dir=/proc/x", "error: run_dir=/proc/x: cannot create a directory in /proc"),
])
def test_bad_values_fail_before_anything_is_saved(tmp_path, arg, expected):
    run = tmp_path / "run"
    res = run_cli(f"run_dir={run}", "stage=cluster", "launcher=local", "kmeans.k=8", arg)
    assert res.returncode == 2 and res.stderr.startswith(expected), res.stderr
    assert len(res.stderr.splitlines()) == 1 and not run.exists()
