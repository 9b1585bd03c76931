"""The eval job end to end on real digits: a retrieval set (SOP layout) and a probe set (EuroSAT
layout), a tiny random ViT exported as the train stage does; plus its checks and reruns."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from evaluation import probe_sets, retrieval_sets, run
from evaluation.features import features_path
from evaluation.demo_sets import digit_images, write_eurosat, write_sop
from unicom_ds import backbone, config
from unicom_ds.atomic import read_json
from unicom_ds.tblog import read_scalars

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def export_backbone(run_dir):
    """RUN/train/backbone.pt of model=ViT-Tiny-16 written as the train stage writes it; returns the model."""
    (run_dir / "train").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = backbone.build("ViT-Tiny-16").eval()
    torch.save(backbone.export("ViT-Tiny-16", model.state_dict()), run_dir / "train" / "backbone.pt")
    return model


def eval_cfg(run_dir, data_root, *extra):
    return config.resolve([f"run_dir={run_dir}", "stage=eval", "model=ViT-Tiny-16", f"eval.data_root={data_root}",
                           "eval.datasets=[sop,eurosat]", "eval.workers=0", "eval.batch_size=64",
                           "eval.dims=[32,16]", "eval.probe.max_iter=100", "progress=off", *extra])


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """One finished eval of `run` on digits-as-SOP and digits-as-EuroSAT."""
    tmp = tmp_path_factory.mktemp("evaljob")
    data, run_dir = tmp / "data", tmp / "run"
    x, y = digit_images(270)
    write_sop(data, x[:150], y[:150])
    write_eurosat(data, x, y)
    export_backbone(run_dir)
    cfg = eval_cfg(run_dir, data)
    merged = run.eval_job(config.select(cfg))
    return cfg, run_dir, data, merged


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_results_match_an_independent_computation_from_the_cached_features(done):
    cfg, run_dir, data, merged = done
    saved = read_json(run_dir / "eval" / "results.json")
    assert saved == merged and set(saved) == {"run"}
    sop = saved["run"]["sop"]
    feats = np.load(features_path(run_dir, "run", "sop"))
    assert feats.shape == (150, 64)
    labels = digit_images(150)[1]
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    sims = f @ f.T
    np.fill_diagonal(sims, -np.inf)  # a query is not its own neighbour
    assert sop["R@1"] == pytest.approx(np.mean(labels[sims.argmax(1)] == labels))
    for dim in (64, 32, 16):  # the full dimension and eval.dims, as the official num_feat: cut, not re-normalised
        cut = f[:, :dim]
        dist = ((cut[:, None] - cut[None]) ** 2).sum(-1)
        np.fill_diagonal(dist, np.inf)
        assert sop[f"dim{dim}/R@1"] == pytest.approx(np.mean(labels[dist.argmin(1)] == labels))
        assert f"dim{dim}renorm/R@1" not in sop  # eval.dims_renormalize is off
    assert sop["dim64/R@1"] == pytest.approx(sop["R@1"])

    euro = saved["run"]["eurosat"]
    assert euro["top1"] > 0.3  # 10 classes: chance is 0.1
    ps = probe_sets.load("eurosat", data, seed=int(cfg.seed))
    tr, te = (np.load(features_path(run_dir, "run", f"eurosat.{s}")) for s in ("train", "test"))
    clf = LogisticRegression(C=euro["C"], max_iter=100).fit(tr, ps.train.labels)
    assert euro["top1"] == pytest.approx(np.mean(clf.predict(te) == ps.test.labels))
    official = LogisticRegression(random_state=0, C=0.601, max_iter=100).fit(tr, ps.train.labels)
    assert euro["fixed_c/top1"] == pytest.approx(np.mean(official.predict(te) == ps.test.labels))


def test_tables_plot_and_tensorboard(done):
    cfg, run_dir, data, merged = done
    text = (run_dir / "eval" / "results.md").read_text()
    euro, sop = merged["run"]["eurosat"]["top1"], merged["run"]["sop"]["R@1"]
    assert f"| run | {100 * euro:.1f} | {100 * euro:.1f} |" in text
    assert f"| run | {100 * sop:.1f} | {100 * sop:.1f} |" in text
    assert (run_dir / "eval" / "recall_vs_dim.png").read_bytes()[:4] == b"\x89PNG"
    scalars = read_scalars(str(run_dir / "tensorboard"))
    expected = {f"eval/run/{ds}/{m}": v for ds, ms in merged["run"].items() for m, v in ms.items()}
    assert {tag: vals[-1][1] for tag, vals in scalars.items()} == pytest.approx(expected)


def test_rerun_skips_finished_units(done, capsys):
    cfg, run_dir, data, merged = done
    again = run.eval_job(config.select(cfg))
    assert again == merged
    out = capsys.readouterr().out
    assert "0 of 2 computed (2 already done)" in out and "| run |" in out
    # Nothing recomputed: no scalar logged twice.
    assert all(len(v) == 1 for v in read_scalars(str(run_dir / "tensorboard")).values())


def test_rerun_with_another_config_or_checkpoint_is_refused(done, tmp_path):
    cfg, run_dir, data, _ = done
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with pytest.raises(config.ConfigError, match=r"units/run/eurosat.json was made with a different config "
                                                 r"\(eval.probe.max_iter: 100 there, 50 now\)"):
        run.eval_job(config.select(eval_cfg(copy, data, "eval.probe.max_iter=50")))
    backbone = copy / "train" / "backbone.pt"
    os.utime(backbone, (1, 1))  # as if exported again
    with pytest.raises(config.ConfigError, match=r"eval/units/run and .*eval/features/run was made with"):
        run.eval_job(config.select(eval_cfg(copy, data)))


def test_renormalized_prefixes_are_an_option_scored_beside_the_official_ones(done, tmp_path):
    cfg, run_dir, data, merged = done
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    with pytest.raises(config.ConfigError, match=r"eval.dims_renormalize: False there, True now"):
        run.eval_job(config.select(eval_cfg(copy, data, "eval.dims_renormalize=true")))
    (copy / "eval" / "units" / "run" / "sop.json").unlink()  # score it again from the cached features
    sop = run.eval_job(config.select(eval_cfg(copy, data, "eval.dims_renormalize=true")))["run"]["sop"]
    feats = np.load(features_path(copy, "run", "sop"))
    labels = digit_images(150)[1]
    cut = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    cut = cut[:, :16] / np.linalg.norm(cut[:, :16], axis=1, keepdims=True)
    sims = cut @ cut.T
    np.fill_diagonal(sims, -np.inf)
    assert sop["dim16renorm/R@1"] == pytest.approx(np.mean(labels[sims.argmax(1)] == labels))
    assert sop["dim16/R@1"] == merged["run"]["sop"]["dim16/R@1"]
    assert "| run (re-normalised) |" in (copy / "eval" / "results.md").read_text()


def test_gldv2_scored_on_raw_dot_products_with_the_cosine_variant_beside_it(tmp_path):
    from test_readme_commands import write_gldv2
    data, run_dir = tmp_path / "data", tmp_path / "run"
    write_gldv2(data / "gldv2")
    export_backbone(run_dir)
    cfg = config.resolve([f"run_dir={run_dir}", "stage=eval", "model=ViT-Tiny-16", f"eval.data_root={data}",
                          "eval.datasets=[gldv2]", "eval.workers=0", "eval.dims=[16]", "eval.gldv2_cosine=true",
                          "progress=off"])
    got = run.eval_job(config.select(cfg))["run"]["gldv2"]
    ds = retrieval_sets.read("gldv2", data / "gldv2")
    x = np.load(features_path(run_dir, "run", "gldv2")).astype(np.float64)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for split in ("public", "private"):
        s = ds.splits[split]
        for feats, key in ((x, f"{split}/mAP@100"), (xn, f"{split}-cosine/mAP@100"), (x[:, :16], f"dim16/{split}/mAP@100")):
            aps = []
            for q, rel in zip(s.query, s.relevant):
                order = s.gallery[np.argsort(-(feats[s.gallery] @ feats[q]), kind="stable")][:100]
                hit = np.isin(order, rel)
                aps.append(sum(hit[:j + 1].sum() / (j + 1) for j in range(len(hit)) if hit[j]) / min(len(rel), 100))
            assert got[key] == pytest.approx(np.mean(aps)), key
    text = (run_dir / "eval" / "results.md").read_text()
    assert "| Model | public | private | public (cosine) | private (cosine) |" in text


def test_check_names_what_is_missing(tmp_path):
    data = tmp_path / "data"
    (data / "sop").mkdir(parents=True)
    cfg = lambda *a: eval_cfg(tmp_path / "run", data, *a)  # noqa: E731
    with pytest.raises(FileNotFoundError, match=r"'run': checkpoint .*run/train/backbone.pt does not exist"):
        run.check(cfg())
    run.check(cfg("stage=all", "eval.datasets=[]"))  # stage=all: the train stage will write it
    export_backbone(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"sop: expected .*sop/Ebay_test.txt"):
        run.check(cfg())
    with pytest.raises(FileNotFoundError, match=r"eval.datasets 'eurosat': expected its folder .*data/eurosat"):
        run.check(cfg("eval.datasets=[eurosat]"))
    with pytest.raises(config.ConfigError, match=r"unknown data set 'mnist'"):
        run.check(cfg("eval.datasets=[mnist]"))
    with pytest.raises(config.ConfigError, match=r"entry 'unicom:ViT-B/32': expected run, unicom:NAME@FILE"):
        run.check(cfg("eval.models=[unicom:ViT-B/32]", "eval.datasets=[]"))
    with pytest.raises(config.ConfigError, match=r"unknown Unicom model 'ViT-X'"):
        run.check(cfg("eval.models=[unicom:ViT-X@/w.pt]", "eval.datasets=[]"))
    with pytest.raises(FileNotFoundError, match=r"'ckpt:ViT-Tiny-16@/nowhere/c.pt': checkpoint /nowhere/c.pt"):
        run.check(cfg("eval.models=[ckpt:ViT-Tiny-16@/nowhere/c.pt]", "eval.datasets=[]"))
    with pytest.raises(config.ConfigError, match=r"eval.probe.val_fraction=0(\.0)?:"):
        run.check(cfg("eval.probe.val_fraction=0.0", "eval.datasets=[]"))
    assert run.main([f"run_dir={tmp_path / 'run'}", f"eval.data_root={data}", "eval.datasets=[dtd]"]) == 2


def test_check_names_a_listed_image_that_is_missing_before_submission(tmp_path):
    """A file named in an eval set's list is missing: `submit.py` refuses before anything runs, naming the set,
    the list and the file; its dry run names it in the plan and still prints the sbatch script. Images are
    listed, never decoded."""
    data = tmp_path / "data"
    x, y = digit_images(40)
    write_sop(data, x, y)
    export_backbone(tmp_path / "run")
    (data / "sop" / "digit_final" / "7.JPG").write_bytes(b"not an image")  # decoding is the job's part
    run.check(eval_cfg(tmp_path / "run", data, "eval.datasets=[sop]"))
    (data / "sop" / "digit_final" / "12.JPG").unlink()
    with pytest.raises(FileNotFoundError) as err:
        run.check(eval_cfg(tmp_path / "run", data, "eval.datasets=[sop]"))
    assert str(err.value) == (f"eval set 'sop': 1 of the 40 images named in {data / 'sop' / 'Ebay_test.txt'} "
                              f"are missing: {data / 'sop' / 'digit_final' / '12.JPG'}")
    argv = [sys.executable, "slurm/submit.py", "stage=eval", f"run_dir={tmp_path / 'run'}", "model=ViT-Tiny-16",
            f"eval.data_root={data}", "eval.datasets=[sop]"]
    res = subprocess.run([*argv, "launcher=local"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 2 and not (tmp_path / "run" / "eval").exists(), res.stdout + res.stderr
    assert f"{data / 'sop' / 'digit_final' / '12.JPG'}" in res.stderr and "eval set 'sop'" in res.stderr
    res = subprocess.run([*argv, "launcher=slurm", "dry_run=true"], capture_output=True, text=True, timeout=300,
                         cwd=REPO)
    assert res.returncode == 0 and "#SBATCH" in res.stdout, res.stdout + res.stderr
    assert f"missing (eval; a real submission stops here): eval set 'sop': 1 of the 40 images" in res.stdout


def test_check_finds_a_deleted_eurosat_image(tmp_path):
    """A deleted image of a class-folder set would silently shrink it: EuroSAT numbers each class's
    files 1..N, so a gap names the very file."""
    data = tmp_path / "data"
    x, y = digit_images(200)
    write_eurosat(data, x, y)
    export_backbone(tmp_path / "run")
    cfg = eval_cfg(tmp_path / "run", data, "eval.datasets=[eurosat]")
    run.check(cfg)
    gone = data / "eurosat" / "2750" / "digit3" / "digit3_5.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError, match=rf"eval set 'eurosat': 1 image\(s\) missing \(.*numbers its "
                                                rf"files CLASS_1.jpg to CLASS_N.jpg.*\): {gone}$"):
        run.check(cfg)


def test_progress_lines_name_model_data_set_and_images(tmp_path, capsys):
    data = tmp_path / "data"
    x, y = digit_images(30)
    write_sop(data, x, y)
    export_backbone(tmp_path / "run")
    run.eval_job(config.select(eval_cfg(tmp_path / "run", data, "eval.datasets=[sop]", "progress=lines")))
    err = capsys.readouterr().err
    assert "[eval run on sop, rank 0 of 1] 30/30 images, " in err and " images/s, " in err


def test_demo_sets_replace_an_older_eurosat_layout(tmp_path):
    """Demo data written before EuroSAT files were numbered per class is rewritten, not reported as gaps."""
    from evaluation import demo_sets
    old = tmp_path / "eurosat" / "2750" / "digit0" / "digit0_0.jpg"  # numbered by row across classes
    x, _ = digit_images(1)
    demo_sets.save_image(old, x[0])
    demo_sets.main(["--out", str(tmp_path), "--retrieval", "20"])
    assert not old.exists()
    probe_sets.check_images(probe_sets.load("eurosat", tmp_path), tmp_path)
    assert len(probe_sets.load("eurosat", tmp_path).train.base) == len(digit_images()[0])


def test_model_entries_give_row_labels_and_load_arguments(tmp_path):
    assert run.parse_model("run", tmp_path, "ViT-B-16") == run.ModelSpec(
        "run", "ViT-B-16", str(tmp_path / "train" / "backbone.pt"), True)
    assert run.parse_model("unicom:ViT-B/32@/w/FP16-ViT-B-32.pt", tmp_path, "x") == run.ModelSpec(
        "unicom:ViT-B/32", "unicom:ViT-B/32", "/w/FP16-ViT-B-32.pt", True)
    assert run.parse_model("openclip:ViT-B-32@laion2b_s34b_b79k", tmp_path, "x") == run.ModelSpec(
        "openclip:ViT-B-32@laion2b_s34b_b79k", "openclip:ViT-B-32", "laion2b_s34b_b79k", False)
    assert run.parse_model("ckpt:ViT-B-16@/ck/step_9.pt", tmp_path, "x").label == "ckpt:ViT-B-16@step_9"


@pytest.mark.parametrize("written_by", ["train stage", "release format"])
def test_run_entry_loads_rundir_backbone_under_the_runs_model_name(tmp_path, monkeypatch, written_by):
    """`run` is unicom_ds.load(cfg.model, RUN/train/backbone.pt): the train stage's export, and a
    plain release-format state dict of the Unicom architecture (which needs the model's name)."""
    from unicom_ds import unicom_vit
    from unicom_ds.loading import load
    if written_by == "train stage":
        name, saved = "ViT-Tiny-16", export_backbone(tmp_path)
    else:
        name = "ViT-Tiny-8"
        monkeypatch.setitem(unicom_vit.CONFIGS, name, dict(image_size=64, patch_size=8, width=32, depth=1,
                                                            heads=2, embed_dim=48))
        torch.manual_seed(0)
        saved = unicom_vit.build(name)
        (tmp_path / "train").mkdir()
        torch.save(saved.state_dict(), tmp_path / "train" / "backbone.pt")
    spec = run.parse_model("run", tmp_path, name)
    model, _ = load(spec.name, spec.checkpoint)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), saved(images))


def test_task_rank_and_world_come_from_submitit(monkeypatch):
    for var in ("SUBMITIT_EXECUTOR", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    assert run.task_rank_world() == (0, 1)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert run.task_rank_world() == (3, 8)


TASK = """
import sys, torch
torch.set_num_threads(1)
from unicom_ds import config
from evaluation import run
cfg = config.resolve(sys.argv[1:])
print("RESULT", run.eval_job(config.select(cfg)) is not None)
"""


@pytest.mark.slow
def test_two_slurm_tasks_split_extraction_and_rank_0_writes(done, tmp_path):
    """Two real processes with the environment a 2-task submitit SLURM job gives them (gloo group)."""
    cfg, run_dir, data, merged = done
    run2 = tmp_path / "run"
    (run2 / "train").mkdir(parents=True)
    shutil.copy2(run_dir / "train" / "backbone.pt", run2 / "train" / "backbone.pt")
    args = [f"run_dir={run2}", "stage=eval", "model=ViT-Tiny-16", f"eval.data_root={data}", "eval.datasets=[sop,eurosat]",
            "eval.workers=0", "eval.batch_size=64", "eval.dims=[32,16]", "eval.probe.max_iter=100",
            "progress=off"]
    procs = []
    for rank in range(2):
        env = {**os.environ, "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
               "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_JOB_NUM_NODES": "1",
               "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "localhost", "MASTER_ADDR": "127.0.0.1"}
        procs.append(subprocess.Popen([sys.executable, "-c", TASK, *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "RESULT True" in outs[0] and "RESULT False" in outs[1]
    assert "2 task(s)" in outs[0]
    for key in ("sop", "eurosat.train", "eurosat.test"):
        np.testing.assert_allclose(np.load(features_path(run2, "run", key)),
                                   np.load(features_path(run_dir, "run", key)), atol=1e-4)
    assert read_json(run2 / "eval" / "results.json")["run"]["sop"]["R@1"] == merged["run"]["sop"]["R@1"]
