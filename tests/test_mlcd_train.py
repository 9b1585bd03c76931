"""loss.kind=mlcd through the train stage (issue 25, items 3 and 4): the data path's [B, l] labels from
RUN/labels/S.topl.npy joined by key, the refusal of a run without them, and a real 2-rank `deepspeed`
launch (gloo, CPU) that trains MLCD's loss on MLCD's RoPE2D ViT (model=MLCD-ViT-Tiny-16), logs it,
checkpoints, resumes, and exports a backbone that transformers' MLCDVisionModel reads."""
import math
import sys

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.test_train_deepspeed import REPO, launch
from tests.train_fixtures import ds_config, make_run
from unicom_ds import config, shards, tblog, train, train_data, train_plan
from unicom_ds.checkpoint import read_meta
from unicom_ds.continuation import LabelSource, label_source

torch.set_num_threads(1)
SIZE = 32
L = 3


def add_topl(run, k: int, unique: bool = False) -> dict:
    """RUN/labels/S.topl.npy ([n, 3], -1 pads the last column of every 4th row) beside each S.npy.
    Row of the g-th labelled key: (c, c+1, c+3) mod k from its class c, or (3g, 3g+1, 3g+2) with
    `unique` (every row then names its key). Returns {key: row without pads}."""
    rows, g = {}, 0
    for labels in sorted((run / "labels").glob("*[0-9].npy")):
        keys = (run / "embed" / f"{labels.stem}.keys.txt").read_text().splitlines()
        table = []
        for key, c in zip(keys, np.load(labels).tolist()):
            row = [3 * g, 3 * g + 1, 3 * g + 2] if unique else [c, (c + 1) % k, (c + 3) % k]
            if g % 4 == 1:
                row[-1] = -1
            table.append(row)
            rows[key] = tuple(row)
            g += 1
        np.save(labels.with_name(f"{labels.stem}.topl.npy"), np.array(table, np.int64))
    return rows


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = make_run(tmp_path_factory.mktemp("mlcd_data"), [5, 9], k=40, unlabelled_every=4)
    return {**out, "rows": add_topl(out["run"], 40, unique=True)}


def test_join_gives_each_key_its_topl_row(data):
    run = data["run"]
    source = LabelSource(run, run / "embed", multi=True)
    join = train_data.LabelJoin(source, train_data.train_transform(SIZE))
    samples = list(wds.DataPipeline(wds.SimpleShardList(shards.expand(data["shards"])), wds.tarfile_to_samples()))
    seen = 0
    for s in samples:
        out = join.prepare(s)
        key = s["__key__"]
        if key not in data["labels"]:
            assert out == "no_label"
            continue
        # Independently of the loader: the key's line in keys.txt numbers its row of S.topl.npy.
        stem = key[:5]
        index = (run / "embed" / f"{stem}.keys.txt").read_text().splitlines().index(key)
        expected = tuple(np.load(run / "labels" / f"{stem}.topl.npy")[index].tolist())
        assert out[1] == expected == data["rows"][key]
        seen += 1
    assert seen == len(data["labels"]) == 11


def test_batches_carry_l_labels_for_mlcd_and_one_for_unicom(data):
    run = data["run"]
    multi = LabelSource(run, run / "embed", multi=True)
    checked = train_data.check_labels(multi, data["shards"], 40, progress_mode="off")
    assert checked.rows == 11
    batches = list(train_data.epoch_batches(checked.urls, multi, SIZE, 4, 3, seed=0, rank=0))
    rows = set(data["rows"].values())
    for images, labels, _ in batches:
        assert images.shape == (4, 3, SIZE, SIZE) and labels.shape == (4, L) and labels.dtype == torch.long
        assert all(tuple(r) in rows for r in labels.tolist())  # each row is one key's whole S.topl.npy row
    assert any(-1 in r for _, labels, _ in batches for r in labels.tolist())  # pads pass through
    single = LabelSource(run, run / "embed")
    _, labels, _ = next(iter(train_data.epoch_batches(checked.urls, single, SIZE, 4, 1, seed=0, rank=0)))
    assert labels.shape == (4,)
    assert set(labels.tolist()) <= set(data["labels"].values())


def resolved(run, shards_pattern, *extra):
    return config.resolve([f"run_dir={run}", f"data.shards={shards_pattern}", "model=ViT-Tiny-16", "device=cpu",
                           *extra])


def test_mlcd_without_topl_labels_is_refused_before_launch(tmp_path):
    out = make_run(tmp_path / "a", [4, 3], k=5)
    run, labels = out["run"], out["run"] / "labels"
    cfg = resolved(run, out["shards"], "stage=train", "loss.kind=mlcd")
    assert label_source(cfg).multi
    for check in (lambda: train_plan.check_inputs(cfg, labels_expected=True),
                  lambda: train_plan.precheck(cfg, 2, "2 ranks", labels_expected=True)):
        with pytest.raises(config.ConfigError, match=r"assign\.top_l") as e:
            check()
        assert str(labels / "00000.topl.npy") in str(e.value) and str(labels) in str(e.value)
    # One shard with top-l labels, one without: still refused, by the check and by the job's label check.
    add_topl(run, 5)
    (labels / "00001.topl.npy").unlink()
    with pytest.raises(config.ConfigError, match=r"00001\.topl\.npy is missing.*assign\.top_l"):
        train_plan.check_inputs(cfg, labels_expected=True)
    with pytest.raises(train_data.LabelError, match=r"00001\.topl\.npy is missing.*assign\.top_l"):
        train_data.check_labels(label_source(cfg), out["shards"], 5, progress_mode="off")
    train_plan.check_inputs(resolved(run, out["shards"], "stage=train"), labels_expected=True)  # unicom: S.npy
    # stage=all before the cluster stage: the config must assign top-l labels.
    fresh = resolved(tmp_path / "b", out["shards"], "stage=all", "loss.kind=mlcd")
    with pytest.raises(config.ConfigError, match=r"loss\.kind=mlcd with assign\.top_l=1.*S\.topl\.npy"):
        train_plan.check_inputs(fresh, labels_expected=False)
    train_plan.check_inputs(resolved(tmp_path / "b", out["shards"], "stage=all", "loss.kind=mlcd",
                                     "assign.top_l=8"), labels_expected=False)
    with pytest.raises(config.ConfigError, match=r"loss\.kind"):
        resolved(run, out["shards"], "loss.kind=arcface")


def test_an_mlcd_continuation_trains_on_the_base_runs_topl_labels(tmp_path):
    """train.continue_from may change loss.kind (the prototypes are the same matrix), and a continuation trains
    on its base run's labels: an mlcd continuation of a run assigned top-1 only is refused before launch,
    naming the base run's missing S.topl.npy, and goes ahead once the base run has them."""
    import json

    out = make_run(tmp_path / "base", [4, 3], k=5)
    base = out["run"]
    config.save(resolved(base, out["shards"], "stage=train"))
    (base / "train" / "ckpt" / "step_1").mkdir(parents=True)
    (base / "train" / "ckpt" / "step_1" / "meta.json").write_text(json.dumps({"model": "ViT-Tiny-16", "step": 1}))
    (base / "train" / "backbone.pt").write_bytes(b"")
    (base / "train" / "export.json").write_text(json.dumps({"model": "ViT-Tiny-16", "checkpoint": "step_1",
                                                            "step": 1}))
    cfg = resolved(tmp_path / "next", out["shards"], "stage=train", "loss.kind=mlcd", f"train.continue_from={base}")
    assert label_source(cfg).run == base
    with pytest.raises(config.ConfigError, match=r"assign\.top_l") as e:
        train_plan.check_inputs(cfg, labels_expected=True)
    assert str(base / "labels" / "00000.topl.npy") in str(e.value)
    add_topl(base, 5)
    train_plan.check_inputs(cfg, labels_expected=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlcd_train")
    data = make_run(root, [13, 9], k=10, unlabelled_every=5)
    add_topl(data["run"], 10)
    ds = ds_config(root / "ds.json")
    run = data["run"]
    first = config.resolve([f"run_dir={run}", f"data.shards={data['shards']}", "model=MLCD-ViT-Tiny-16", "stage=train",
                            "device=cpu", f"train.deepspeed_config={ds}", "train.epochs=2", "train.steps_per_epoch=2",
                            "train.max_steps=2", "train.ckpt_every_steps=1", "train.log_every=1", "train.workers=0",
                            "train.local_processes=2", "loss.r1=0.5", "loss.kind=mlcd"])
    logs = [launch(train.local_command(first), root / "run1.log")]
    resume = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", "2",
              "--master_port", str(train.free_port()), str(REPO / "unicom_ds/train.py"), "--deepspeed_config",
              str(ds), f"run_dir={run}", "train.max_steps=3"]
    logs.append(launch(resume, root / "run2.log"))
    return {"run": run, "shards": data["shards"], "logs": logs}


@pytest.mark.slow
def test_two_ranks_train_mlcd_log_finite_loss_and_resume(trained):
    run, (first, second) = trained["run"], trained["logs"]
    ckpt = run / "train" / "ckpt"
    assert "MLCD-ViT-Tiny-16 on 2 rank(s)" in first and "k=10, mlcd loss" in first and "steps 0 -> 2" in first
    assert f"resumed from {ckpt / 'step_2'} at step 2" in second and "steps 2 -> 3" in second
    meta = read_meta(ckpt / "step_3")
    assert (meta["loss_kind"], meta["step"], meta["num_classes"], meta["world_size"]) == ("mlcd", 3, 10, 2)
    assert "kind: mlcd" in (run / "config.yaml").read_text()  # the resume read the run's loss.kind
    scalars = tblog.read_scalars(str(run / "tensorboard" / "train"))
    assert sorted(s for s, _ in scalars["train/loss"]) == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for _, v in scalars["train/loss"])
    assert all(v == 0 for _, v in scalars["train/skipped_steps"])
    # MLCD's two terms are logged beside the loss they sum to.
    for (step, loss), (_, negative), (_, positive) in zip(scalars["train/loss"], scalars["train/loss_negative"],
                                                          scalars["train/loss_positive"]):
        assert negative > 0 and positive > 0 and negative + positive == pytest.approx(loss, rel=1e-5), step
    assert (run / "train" / "backbone.pt").is_file()


@pytest.mark.slow
def test_the_trained_mlcd_vit_exports_to_transformers_with_the_same_features(trained, tmp_path):
    """RUN/train/backbone.pt of model=MLCD-ViT-Tiny-16 loads by name (unicom_ds.load, as the eval stage reads a
    run), the command-line export turns it into an MLCDVisionModel folder, and transformers computes the same
    features from it; the jobs that rebuild a backbone take the run (tests/test_mlcd_jobs.py)."""
    from types import SimpleNamespace

    from transformers import MLCDVisionModel

    import unicom_ds
    from evaluation.run import job_model
    from unicom_ds import mlcd_vit

    path = trained["run"] / "train" / "backbone.pt"
    export = torch.load(path, map_location="cpu", weights_only=True)
    assert (export["model"], export["embed_dim"]) == ("MLCD-ViT-Tiny-16", 64)
    ours, _ = unicom_ds.load("MLCD-ViT-Tiny-16", checkpoint=path)
    untrained = mlcd_vit.build("MLCD-ViT-Tiny-16")
    assert not torch.equal(ours.conv1.weight, untrained.conv1.weight)
    mlcd_vit.main(["export", "MLCD-ViT-Tiny-16", str(path), str(tmp_path / "hf")])
    hf = MLCDVisionModel.from_pretrained(str(tmp_path / "hf")).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).pooler_output, ours(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match=r"holds a 'MLCD-ViT-Tiny-16' backbone, not 'MLCD-ViT-B-32'"):
        mlcd_vit.main(["export", "MLCD-ViT-B-32", str(path), str(tmp_path / "other")])
    assert job_model("run", "detect.model", SimpleNamespace(run_dir=trained["run"], model="MLCD-ViT-Tiny-16")).name \
        == "MLCD-ViT-Tiny-16"


def test_mlcd_vit_trains_without_decay_on_its_class_token_and_rotary_angles():
    from unicom_ds import backbone

    model = backbone.build("MLCD-ViT-Tiny-16")
    assert model.training and backbone.embed_dim("MLCD-ViT-Tiny-16") == 64
    decay, no_decay = backbone.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {"class_embedding", "class_pos_emb", "ln_post.weight", "conv1.weight"} - {names[id(p)] for p in
                                                                                      no_decay["params"]} == \
        {"conv1.weight"}
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay["params"]) and \
        "class_pos_emb" not in {names[id(p)] for p in decay["params"]}
    # train.grad_checkpointing: the same features and gradients through torch.utils.checkpoint.
    checkpointed = backbone.build("MLCD-ViT-Tiny-16", grad_checkpointing=True)
    checkpointed.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a, b = model(x), checkpointed(x)
    torch.testing.assert_close(a, b)
    a.square().sum().backward()
    b.square().sum().backward()
    torch.testing.assert_close(model.conv1.weight.grad, checkpointed.conv1.weight.grad)


@pytest.mark.slow
def test_a_rerun_with_the_other_loss_kind_is_refused(trained):
    mlcd_vit = "model=MLCD-ViT-Tiny-16"
    cfg = resolved(trained["run"], trained["shards"], "stage=train", "loss.kind=unicom", mlcd_vit)
    with pytest.raises(config.ConfigError, match=r"loss_kind: 'mlcd' there, 'unicom' now"):
        train_plan.check_inputs(cfg, labels_expected=True)
    train_plan.check_inputs(resolved(trained["run"], trained["shards"], "stage=train", "loss.kind=mlcd", mlcd_vit),
                            labels_expected=True)


def test_checkpoints_from_before_loss_kind_resume_as_unicom():
    from unicom_ds import checkpoint, objectives

    assert checkpoint.identity({"model": "ViT-B-16", "num_classes": 5}, ("model", "num_classes", "loss_kind")) == \
        {"model": "ViT-B-16", "num_classes": 5, "loss_kind": "unicom"}
    assert objectives.prototype_layer("mlcd").__name__ == "MLCDPrototypes"
    assert objectives.prototype_layer("unicom").__name__ == "ShardedPrototypes"
    with pytest.raises(config.ConfigError, match=r"loss.kind=arcface: expected one of unicom, mlcd"):
        objectives.prototype_layer("arcface")
