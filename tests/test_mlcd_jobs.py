"""Every MLCD model is a backbone for every job (issue 31, item 2): a train stage's RoPE2D export (`run` of
model=MLCD-ViT-Tiny-16), a RoPE2D MLCDVisionModel folder and a CLIPVisionModel folder, both written by
transformers' save_pretrained at MLCD-ViT-Tiny-16's size, each detected on, fine-tuned and coded (frozen and end
to end), a few steps each, killed after a first checkpoint and resumed. Before them, the pieces on one process:
ViTDet's RoPE2D attention against the model's own blocks, the fine-tuned export names, and the release head's
BatchNorm synchronised over 2 gloo ranks against one rank holding the whole batch."""
from __future__ import annotations

import datetime
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from evaluation import demo_sets
from evaluation.detection import backbone as det_backbone
from evaluation.detection import synthetic
from evaluation.finetune import sync_bn
from unicom_ds import backbone, config, mlcd_vit, unicom_vit
from unicom_ds.loading import load, load_mlcd_folder

torch.set_num_threads(1)

FAMILIES = ("run", "rope2d", "clip")
TINY = "MLCD-ViT-Tiny-16"
# MLCD-ViT-Tiny-16's size in transformers' config names: both folders rebuild under a name fine-tuning exports.
HF_TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, image_size=64,
               patch_size=16)


class Killed(Exception):
    pass


def _perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """family -> the train stage's backbone.pt (run) or the folder transformers wrote (rope2d, clip)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, MLCDVisionConfig, MLCDVisionModel
    root = tmp_path_factory.mktemp("mlcd_models")
    torch.manual_seed(0)
    torch.save(backbone.export(TINY, _perturbed(mlcd_vit.build(TINY)).state_dict()), root / "backbone.pt")
    _perturbed(MLCDVisionModel(MLCDVisionConfig(**HF_TINY)), 2).save_pretrained(str(root / "rope2d"))
    _perturbed(CLIPVisionModel(CLIPVisionConfig(**HF_TINY, hidden_act="quick_gelu")), 3).save_pretrained(
        str(root / "clip"))
    return {"run": root / "backbone.pt", "rope2d": root / "rope2d", "clip": root / "clip"}


def _model(models: dict, family: str, key: str, run: Path) -> list[str]:
    """The keys naming the family's model to a job; `run` gets the run family's RUN/train/backbone.pt."""
    if family != "run":
        return [f"{key}=mlcd:{models[family]}"]
    (run / "train").mkdir(parents=True)
    shutil.copy(models["run"], run / "train" / "backbone.pt")
    return [f"model={TINY}", f"{key}=run"]


def _loaded(models: dict, family: str) -> torch.nn.Module:
    return load(TINY, models["run"])[0] if family == "run" else load_mlcd_folder(models[family])[0]


def _kill_after_save(monkeypatch, owner, name: str, fresh=lambda *args: True) -> None:
    """`owner.name` (a checkpoint save) raises Killed right after a save where `fresh(*its args)`: the job stops
    there, its checkpoint written, as a job killed at that moment."""
    save = getattr(owner, name)

    def save_then_die(*args, **kwargs):
        out = save(*args, **kwargs)
        if fresh(*args):
            raise Killed(name)
        return out
    monkeypatch.setattr(owner, name, save_then_die)


# ---- detection: RoPE2D by absolute position, the CLIP format's table ---------------------------------

def test_token_positions_are_each_tokens_place_in_the_grid_windows_included():
    assert det_backbone.token_positions(2, 3).tolist() == [[[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]]
    windows = det_backbone.token_positions(5, 3, 2)  # padded to 6 x 4: 3 x 2 windows of 2 x 2
    assert windows.shape == (6, 4, 2)
    assert windows[3].tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]  # window (1, 1); column 3 is padding
    grid = det_backbone.window_unpartition(windows, 2, (6, 4), (5, 3))
    assert torch.equal(grid[0].reshape(-1, 2), det_backbone.token_positions(5, 3)[0])


@pytest.mark.parametrize("family", ["rope2d", "clip"])
def test_global_vitdet_blocks_are_the_models_own_blocks_on_the_patch_tokens(models, family):
    """Without windows or relative tables, ViTDet's tokens are the model's pre-norm and blocks run on its patch
    tokens (the class token dropped): RoPE2D at each patch's place in a 7 x 5 grid (the model saw 4 x 4), the CLIP
    format at its own grid (its table unresized)."""
    vit = _loaded(models, family)
    bb = det_backbone.ViTDetBackbone(vit, window_size=0, drop_path=0.0, out_channels=8, rel_pos=False).eval()
    h, w = (7, 5) if family == "rope2d" else (4, 4)
    images = torch.randn(2, 3, 16 * h, 16 * w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = vit.conv1(images).flatten(2).transpose(1, 2)
        if family == "rope2d":
            x, angles = vit.ln_pre(x), mlcd_vit.rope_angles(h, w, 32)
            for block in vit.transformer.resblocks:
                x = block(x, angles)
        else:
            x = vit.transformer(vit.ln_pre(x + vit.positional_embedding[1:]))
        torch.testing.assert_close(bb.tokens(images).reshape(2, h * w, -1), x, atol=1e-4, rtol=1e-4)
    assert (bb.pos_embed is None) == (family == "rope2d") and bb.rope == ((32, 10000.0) if family == "rope2d" else None)


def test_windowed_rope2d_blocks_rotate_by_each_patchs_place_in_the_image(models):
    """Block 0 attends in 2 x 2 windows, each token rotated by its (row, column) in the 4 x 6 grid, block 1 over
    the whole grid: the model's own blocks on each window's tokens with their absolute angles, then on all."""
    vit = _loaded(models, "rope2d")
    bb = det_backbone.ViTDetBackbone(vit, window_size=2, global_blocks=[1], drop_path=0.0, out_channels=8,
                                     rel_pos=False).eval()
    images = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    angles = mlcd_vit.rope_angles(4, 6, 32).view(4, 6, -1)
    blocks = vit.transformer.resblocks
    with torch.no_grad():
        x = vit.ln_pre(vit.conv1(images).permute(0, 2, 3, 1))
        ref = torch.empty_like(x)
        for r in (0, 2):
            for c in (0, 2, 4):
                window = x[:, r:r + 2, c:c + 2].reshape(1, 4, -1)
                ref[:, r:r + 2, c:c + 2] = blocks[0](window, angles[r:r + 2, c:c + 2].reshape(4, -1)).view(1, 2, 2, -1)
        ref = blocks[1](ref.reshape(1, 24, -1), angles.reshape(24, -1)).view(1, 4, 6, -1)
        torch.testing.assert_close(bb.tokens(images), ref, atol=1e-5, rtol=1e-5)
        # Each window's tokens carry their places in the image, not the window's own (0, 0) ... (1, 1).
        torch.testing.assert_close(bb._angles(4, 6, 2, 1, "cpu")[1], angles[0:2, 2:4].reshape(4, -1))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_mlcd_family_gives_vitdets_pyramid_and_rel_pos_tables(models, family):
    vit = _loaded(models, family)
    bb = det_backbone.ViTDetBackbone(vit, window_size=3, global_blocks=[1], drop_path=0.2, out_channels=8,
                                     image_size=96).eval()
    with torch.no_grad():
        feats = bb(torch.randn(2, 3, 96, 128))
    assert [tuple(f.shape) for f in feats.values()] == [(2, 8, 24, 32), (2, 8, 12, 16), (2, 8, 6, 8), (2, 8, 3, 4)]
    assert tuple(bb.blocks[0].attn.rel_pos_h.shape) == (5, 32) and tuple(bb.blocks[1].attn.rel_pos_w.shape) == (11, 32)
    assert det_backbone.vit_depth(vit) == 2
    names = {n for n, _ in bb.named_parameters()}
    assert not {n for n in names if "class" in n} and ("pos_embed" in names) == (family == "clip")


# ---- fine-tuning: export names, the release head's BatchNorm over the ranks ---------------------------

def test_fine_tuning_exports_each_family_under_its_architectures_name(models, tmp_path):
    from evaluation.finetune import job
    for family, name in (("run", TINY), ("rope2d", TINY), ("clip", "MLCD-CLIP-ViT-Tiny-16")):
        run = tmp_path / family
        cfg = config.resolve(["stage=finetune", f"run_dir={run}", "finetune.datasets=[cub]",
                              *_model(models, family, "finetune.init", run)])
        assert job.trained_name(job.init_spec(cfg), cfg) == name, family
        built = backbone.build(name)
        assert built.state_dict().keys() == _loaded(models, family).state_dict().keys()
        assert (backbone.image_size(name), backbone.embed_dim(name)) == (64, 64)
    ckpt = config.resolve(["stage=finetune", f"run_dir={tmp_path / 'c'}", f"finetune.init=ckpt:{TINY}@{models['run']}"])
    assert job.trained_name(job.init_spec(ckpt), ckpt) == TINY
    # Another size has no name to export under: refused before anything runs, naming the key and the model.
    other = tmp_path / "other"
    shutil.copytree(models["clip"], other)
    cfg_json = (other / "config.json").read_text().replace('"image_size": 64', '"image_size": 80')
    (other / "config.json").write_text(cfg_json)
    cfg = config.resolve(["stage=finetune", f"run_dir={tmp_path / 'o'}", "finetune.datasets=[cub]",
                          f"finetune.init=mlcd:{other}"])
    with pytest.raises(config.ConfigError, match=r"finetune.init=mlcd:.*other: 'MLCD ViT-Tiny/16-80 \(CLIP format\)' "
                                                 "cannot be fine-tuned and exported"):
        job.trained_name(job.init_spec(cfg), cfg)


def test_batch_moments_are_the_whole_batchs_on_one_rank():
    x = torch.randn(50, 7, dtype=torch.float64) * 3 + 1000  # large mean: E[x^2] - mean^2 would lose digits
    mean, var, count = sync_bn.batch_moments(x)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(var, x.var(0, unbiased=False))
    assert count == 50


def _release_with_synced_head() -> torch.nn.Module:
    torch.manual_seed(0)
    model = unicom_vit.build_for_training("ViT-Tiny-16")
    unicom_vit.set_drop_path(model, 0.0)
    return sync_bn.convert(model).train()


def _sync_rank(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        result = _sync_step(rank, world)
        try:  # torch's own, on the same ranks
            torch.nn.SyncBatchNorm(4).train()(torch.randn(6, 4))
        except ValueError as e:
            result["torch_syncbn"] = str(e)
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _sync_step(rank: int, world: int) -> dict:
    """One SGD step of the release ViT-Tiny-16 on this rank's share of a batch of 8 (uneven: 3 and 5), the
    gradients summed over the ranks (of a sum of per-image losses; DDP's all-reduce adds only a 1 / world)."""
    model = _release_with_synced_head()
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    rows = slice(0, 8) if world == 1 else (slice(0, 3), slice(3, 8))[rank]
    feats = model(images[rows])
    (feats ** 2).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if world > 1:
                dist.all_reduce(p.grad)
            p -= 0.1 * p.grad
    return {"feats": feats.detach(), "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}


@pytest.mark.slow
def test_release_heads_batchnorm_is_synchronised_over_two_gloo_ranks(tmp_path):
    """retrieval.py's SyncBatchNorm: on 2 gloo ranks (3 + 5 images) the heads' running statistics after a step, the
    features and the updated weights equal one rank's over all 8 images, on both ranks; the release's own
    BatchNorm1dFP32 would keep each rank's. torch's SyncBatchNorm refuses CPU tensors on those ranks."""
    from unicom_ds.train import free_port
    mp.spawn(_sync_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    whole = _sync_step(0, 1)
    stats = [k for k in whole["state"] if k.startswith("feature.") and k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 4
    for r in ranks:
        for k, v in whole["state"].items():
            torch.testing.assert_close(r["state"][k], v, atol=1e-5, rtol=1e-4, msg=k)
        assert "SyncBatchNorm expected input tensor to be on GPU" in r["torch_syncbn"]
    torch.testing.assert_close(torch.cat([ranks[0]["feats"], ranks[1]["feats"]]), whole["feats"], atol=1e-5, rtol=1e-4)
    # Rank 0's own statistics (what the release's BatchNorm kept) are another thing.
    plain = _release_with_synced_head()
    with torch.no_grad():
        plain(torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(2))[:3])
    for k in ("feature.1.running_mean", "feature.3.running_var"):  # feature.3's input has mean 0 on any batch
        assert not torch.allclose(plain.state_dict()[k], whole["state"][k], atol=1e-4), k


def test_start_model_synchronises_the_release_head_and_keeps_its_weights(tmp_path):
    from evaluation.finetune import job
    init = tmp_path / "init.pt"
    torch.manual_seed(0)
    release = unicom_vit.build("ViT-Tiny-16")
    torch.save(release.state_dict(), init)
    cfg = config.resolve(["stage=finetune", f"run_dir={tmp_path / 'run'}", "finetune.datasets=[cub]",
                          f"finetune.init=unicom:ViT-Tiny-16@{init}"])
    _, model = job.start_model(cfg, job.init_spec(cfg))
    assert [type(m).__name__ for m in model.feature] == ["Linear", "SyncBatchNorm1dFP32"] * 2
    assert all(torch.equal(v, release.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():  # eval mode and a single process: the release's BatchNorm
        torch.testing.assert_close(model.eval()(x), release(x))


# ---- the jobs, a few steps each: killed after a first checkpoint, resumed ---------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mlcd_jobs_data")
    x, y = demo_sets.digit_images(150)  # 0-4 train classes (75 images: OPQ wants one per dimension), 5-9 test
    demo_sets.write_cub(root / "eval", x, y, test_from=5)
    return {"coco": synthetic.write(root / "coco", train=4, val=2, size=64, seed=3), "eval": root / "eval"}


@pytest.fixture
def one_process_group(monkeypatch):
    """The one-process rendezvous of an in-process Trainer, out of the environment after the test."""
    from unicom_ds import train
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(train.free_port()))):
        monkeypatch.setenv(key, value)


def _resolve(args: list[str]):
    """The job's config, after the launcher's checks (what slurm/submit.py runs before it submits)."""
    from slurm import launch
    launch.precheck(config.resolve(["launcher=local", *args]))
    return config.resolve(args)


def _changed(start: dict, end: dict) -> list[str]:
    return [k for k, v in start.items() if v.is_floating_point() and not torch.equal(v, end[k])]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_detect_trains_each_mlcd_family_and_resumes(models, data, family, tmp_path, monkeypatch, capsys):
    from evaluation.detection import job
    from evaluation.detection.data import CocoSplit
    run = tmp_path / "run"
    cfg = config.select(_resolve([
        "stage=detect", f"run_dir={run}", f"detect.data_root={data['coco']}", "device=cpu", "progress=off",
        "detect.image_size=64", "detect.window_size=2", "detect.fpn_channels=16", "detect.rois_per_image=16",
        "detect.batch_size=2", "detect.steps=3", "detect.ckpt_every_steps=1", "detect.warmup_steps=1",
        "detect.workers=0", "detect.eval_batch_size=2", *_model(models, family, "detect.model", run)]))
    start = job.Detector(config.as_config(cfg)).build(CocoSplit(data["coco"], "val2017", train=False).num_classes)[0]
    with monkeypatch.context() as m, pytest.raises(Killed):
        _kill_after_save(m, job, "save_checkpoint")
        job.detect(cfg)
    metrics = job.detect(cfg)
    assert re.search(r"resumed from \S+step_1\.pt", capsys.readouterr().out)
    assert {"box/AP", "mask/AP"} <= set(metrics)
    out = job.out_dir(config.as_config(cfg), job.Detector(config.as_config(cfg)).spec.label)
    end = torch.load(out / "ckpt" / "step_3.pt", weights_only=True)["model"]
    assert any(k.startswith("backbone.body.blocks.") for k in _changed(start.state_dict(), end))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_finetune_trains_each_mlcd_family_and_resumes(models, data, family, tmp_path, monkeypatch, one_process_group):
    from evaluation.finetune import job
    from unicom_ds import train
    run = tmp_path / "run"
    cfg = _resolve([
        "stage=finetune", f"run_dir={run}", "device=cpu", "progress=off", "finetune.datasets=[cub]",
        f"eval.data_root={data['eval']}", "finetune.batch_size=16", "finetune.max_steps=3",
        "finetune.ckpt_every_steps=1", "finetune.workers=0", "finetune.transform=origin_clip", "finetune.lr=1e-3",
        "finetune.eval_every_epoch=false", "eval.workers=0", "eval.dims=[32]",
        *_model(models, family, "finetune.init", run)])
    with monkeypatch.context() as m, pytest.raises(Killed):
        _kill_after_save(m, train.Trainer, "save")
        job.finetune_job(cfg)
    summary = job.finetune_job(cfg)["cub"]
    assert (summary["start_step"], summary["steps"]) == (1, 3)
    init = job.init_spec(cfg)
    start = load(init.name, init.checkpoint)[0].state_dict()
    label, tuned = job.tuned_spec(cfg, init, "cub")
    assert _changed(start, load(tuned.name, tuned.checkpoint)[0].state_dict())  # read back as evaluated
    found = json.loads((run / "eval" / "results.json").read_text())
    assert {"R@1", "MAP@R"} <= set(found[label]["cub"]) and "cub" in found[init.label]


@pytest.fixture
def one_faiss_thread():
    """As tests/test_quantize.py: faiss' threads beside torch's in one process (OPQ's training crashes here)."""
    import faiss
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_codes_each_mlcd_family_frozen_and_end_to_end_and_resumes(models, data, family, tmp_path,
                                                                            monkeypatch, capsys, one_process_group,
                                                                            one_faiss_thread):
    """scq on the frozen features, then scq_e2e: launch 1 is killed after scq's first checkpoint, launch 2
    resumes scq and is killed after scq_e2e's first, launch 3 resumes scq_e2e."""
    from evaluation.features import ImageFiles, extract, features_path
    from evaluation.quantize import baselines, job, scq
    from evaluation.retrieval_sets import read
    from unicom_ds import train
    from unicom_ds.arrays import normalize
    run = tmp_path / "run"
    cfg = _resolve([
        "stage=quantize", f"run_dir={run}", "device=cpu", "progress=off", "quantize.datasets=[cub]",
        f"eval.data_root={data['eval']}", "eval.workers=0", "quantize.methods=[scq,scq_e2e]", "quantize.bits=[16]",
        "quantize.nbits=[4]", "quantize.scq.batch_size=16", "quantize.scq.max_steps=2",
        "quantize.scq.ckpt_every_steps=1", "quantize.scq.workers=0", *_model(models, family, "quantize.model", run)])
    for _ in range(2):
        with monkeypatch.context() as m, pytest.raises(Killed):
            _kill_after_save(m, train.Trainer, "save", fresh=lambda trainer: trainer.resumed_from is None)
            job.quantize_job(cfg)
    found = job.quantize_job(cfg)
    log = capsys.readouterr().out
    for unit in ("scq-4x4", "scq_e2e-4x4"):
        assert re.search(rf"resumed from \S+/{unit}/ckpt/step_1 at step 1\b", log), log[-3000:]
    spec = job.model_spec(cfg)
    assert {"scq-4x4/R@1", "scq_e2e-4x4/R@1", "float/R@1"} <= set(found[spec.label]["cub"])
    # scq's head moved off its OPQ start (faiss seeds OPQ: the same rows give the same start).
    out = run / "quantize" / features_path(run, spec.label, "cub").parent.name / "cub"
    opq = baselines.train("opq", normalize(np.load(features_path(run, spec.label, "cub.train"))), 16, 4)
    head = scq.from_opq(opq, float(cfg.quantize.scq.tau_sq))
    assert _changed(head.state_dict(), scq.Objective.load(out / "scq-4x4.pt").state_dict())
    # scq_e2e's copy of the backbone trained, and its features of the test split are not the frozen ones.
    model, preprocess = load(spec.name, spec.checkpoint)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    tuned = scq.Objective.load_backbone(out / "scq_e2e-4x4.pt", model)
    assert _changed(start, tuned.state_dict())
    feats = extract(tuned, ImageFiles(read("cub", data["eval"] / "cub").paths, preprocess), 64, 0, "cpu",
                    progress_mode="off")
    assert not np.allclose(normalize(feats), normalize(np.load(features_path(run, spec.label, "cub"))), atol=1e-4)
