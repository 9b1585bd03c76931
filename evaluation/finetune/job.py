"""The finetune stage: `finetune_job(cfg)` fine-tunes `finetune.init` on the train split of every set of
`finetune.datasets`, one after the other, then evaluates the start and the fine-tuned model on that set's
test split (and `finetune.eval_datasets`) with the eval stage's code.

    deepspeed evaluation/finetune/job.py run_dir=RUN finetune.datasets=[cub] [key=value ...]

`python slurm/submit.py stage=finetune ...` runs it (under SLURM `FinetuneJob`, one task per GPU, requeued
at the time limit; with launcher=local through the deepspeed launcher, like the train stage).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":  # as a script, this folder would shadow top-level modules (data, job)
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from unicom_ds import backbone, config, disk, quiet, train, train_plan
from unicom_ds.atomic import read_json, write_json_atomic
from unicom_ds.loading import openclip_architecture

from evaluation import retrieval_sets
from evaluation.results import FT_PREFIX, SELECTED
from evaluation.run import Evaluator, ModelSpec, job_model

JOB_PY = Path(__file__).resolve()
SECTION, LOSS = "finetune", "finetune.loss"



def init_spec(cfg: Any) -> ModelSpec:
    return job_model(str(cfg.finetune.init), "finetune.init", cfg)


def trained_name(spec: ModelSpec, cfg: Any) -> str:
    """The backbone name the Trainer exports under (a name `unicom_ds.backbone` builds)."""
    kind, _, name = spec.name.partition(":")
    if spec.label == "run":
        name = str(cfg.model)
    elif spec.name == "mlcd":  # the folder's architecture by its name, in its format
        from unicom_ds.loading import mlcd_folder
        from unicom_ds.mlcd_vit import title
        module, arch = mlcd_folder(spec.checkpoint)
        name = backbone.folder_name(module, arch) or title(arch, module.FORMAT)
    elif kind == "unicom":
        from unicom_ds.unicom_vit import canonical_name
        name = canonical_name(name)
    elif kind == "ckpt":  # a train-stage export: an MLCD ViT by its name, else an open_clip tower
        mlcd = name in backbone.MODELS and backbone.is_mlcd(name)
        name = name if mlcd or name.startswith(backbone.OPENCLIP) else backbone.OPENCLIP + name
    else:  # the tower the init loads as: OpenAI's weights get QuickGELU, and must be exported under that name
        name = backbone.OPENCLIP + openclip_architecture(name, spec.checkpoint)
    if name not in backbone.MODELS:
        raise config.ConfigError(f"finetune.init={cfg.finetune.init}: '{name}' cannot be fine-tuned and exported; "
                                 f"known architectures: {', '.join(backbone.MODELS)}")
    return name


def out_dir(cfg: Any, name: str) -> Path:
    return Path(str(cfg.run_dir)) / "finetune" / name


def tuned_spec(cfg: Any, init: ModelSpec, name: str) -> tuple[str, ModelSpec]:
    """(entry, spec) of the model fine-tuned on `name`, for the Evaluator."""
    model = trained_name(init, cfg)
    path = out_dir(cfg, name) / "backbone.pt"
    load_name = f"unicom:{model}" if backbone.is_release(model) else f"ckpt:{model}"
    label = f"{FT_PREFIX}{name}:{init.label}"
    return label, ModelSpec(label, load_name, str(path), True)


def _eval_names(cfg: Any, name: str) -> list[str]:
    return list(dict.fromkeys([name, *map(str, cfg.finetune.eval_datasets)]))


def check(cfg: Any, world: int, ranks: str) -> list[str]:
    """Everything that can fail before a job runs; returns the plan's lines."""
    cfg = config.as_config(cfg)
    sets = [str(n) for n in cfg.finetune.datasets]
    if not sets:
        raise config.ConfigError("finetune.datasets is empty: name the sets to fine-tune on "
                                 f"({', '.join(retrieval_sets.TRAIN_READERS)}), e.g. finetune.datasets=[cub]")
    init = init_spec(cfg)
    model = trained_name(init, cfg)
    # With stage=all the train stage has not written RUN/train/backbone.pt yet.
    if init.is_file and not Path(init.checkpoint).is_file() and not (init.label == "run" and cfg.stage == "all"):
        raise FileNotFoundError(f"finetune.init={cfg.finetune.init}: checkpoint {init.checkpoint} does not exist")
    ds = train_plan.deepspeed_config(cfg, world, SECTION)
    root = Path(str(cfg.eval.data_root))
    lines = [f"finetune: {backbone.description(model)} from {cfg.finetune.init}; global batch "
             f"{ds['train_batch_size']} = micro {ds['train_micro_batch_size_per_gpu']} x {world} ranks ({ranks}); "
             f"{cfg.finetune.precision}"]
    for name in sets:
        for test in _eval_names(cfg, name):
            if test not in retrieval_sets.READERS:
                raise config.ConfigError(f"finetune: unknown retrieval set '{test}'; known: "
                                         f"{', '.join(retrieval_sets.READERS)}")
            retrieval_sets.check_images(retrieval_sets.read(test, root / test))
        if name not in retrieval_sets.TRAIN_READERS:
            raise config.ConfigError(f"finetune.datasets: '{name}' has no train split; fine-tuning knows "
                                     f"{', '.join(retrieval_sets.TRAIN_READERS)}")
        split = retrieval_sets.read_train(name, root / name)
        retrieval_sets.check_images(split)
        _check_init(cfg, name)
        train_plan.check_resume(cfg, {}, SECTION, f"finetune/{name}")
        lines.append(f"  {name}: {len(split.paths)} train images of {len(set(split.labels.tolist()))} classes "
                     f"from {' and '.join(split.lists)}; evaluated on {', '.join(_eval_names(cfg, name))}")
    f, lc = cfg.finetune, cfg.finetune.loss
    lines.append(f"  {f.epochs} epoch(s), lr {float(f.lr):g} {f.schedule} ({float(f.warmup_epochs):g} warmup "
                 f"epochs), prototypes x{float(f.prototype_lr_mult):g}, weight decay {float(f.weight_decay):g}; "
                 f"loss r1={lc.r1} margin={lc.margin} scale={lc.scale}")
    beta1 = "beta1 0.95->0.85->0.95" if f.cycle_momentum and f.schedule == "onecycle" else "beta1 0.9"
    drop = f"drop path {float(f.drop_path):g}" if backbone.is_release(model) else "no drop path (a release ViT's only)"
    images = ("origin_clip: resize + centre crop, no augmentation" if f.transform == "origin_clip" else
              f"timm: augment {f.augment.auto_augment}, jitter {f.augment.color_jitter}, erasing {f.augment.re_prob} "
              f"({f.augment.re_mode})")
    test = "each epoch and at the end" if f.eval_every_epoch else "at the end"
    lines.append(f"  {beta1}, {drop}; train images {images}; test split scored {test}")
    return lines


def _check_init(cfg: Any, name: str) -> bool:
    """A fine-tuning folder belongs to one init: resuming another model's checkpoints is refused (also by the
    launcher, before anything runs). True when the folder already records this init."""
    path = out_dir(cfg, name) / "init.json"
    if path.is_file():
        config.check_same(read_json(path), {"finetune.init": str(cfg.finetune.init)}, path.parent)
    return path.is_file()


def _record_init(cfg: Any, name: str) -> None:
    if not _check_init(cfg, name) and int(os.environ.get("RANK", 0)) == 0:
        write_json_atomic(out_dir(cfg, name) / "init.json", {"finetune.init": str(cfg.finetune.init)})


def start_model(cfg: Any, init: ModelSpec) -> tuple[str, Any]:
    """(export name, the init's weights set to train): the release ViTs with finetune.drop_path, as
    they were built to train (open_clip towers and MLCD ViTs have no drop path), and the release head's
    BatchNorm synchronised over the ranks, as retrieval.py converts it."""
    from evaluation.finetune import sync_bn
    from unicom_ds.loading import load
    from unicom_ds.unicom_vit import UnicomViT, set_drop_path
    model = load(init.name, init.checkpoint)[0]
    if isinstance(model, UnicomViT):
        set_drop_path(model, float(cfg.finetune.drop_path))
    return trained_name(init, cfg), sync_bn.convert(model)


def epochs_path(cfg: Any, name: str) -> Path:
    return out_dir(cfg, name) / "epochs.json"


class EpochScores:
    """retrieval.py's test after every epoch: the fine-tuned model as it stands on `name`'s test split,
    scored as the eval stage scores it, {epoch: metrics} in RUN/finetune/<set>/epochs.json (rank 0 writes;
    every rank extracts its rows, nothing is cached)."""

    def __init__(self, cfg: Any, name: str, transform):
        self.cfg, self.name, self.transform = cfg, name, transform

    def __call__(self, model, epoch: int) -> None:
        import copy

        import torch

        from unicom_ds.dist import rank_world
        if next(model.parameters()).dtype != torch.float32:  # a bf16 engine: score an fp32 copy
            model = copy.deepcopy(model).float()
        scores = Uncached(self.cfg, *rank_world(), []).retrieval(f"epoch {epoch}", self.name, model, self.transform)
        if scores is not None:
            path = epochs_path(self.cfg, self.name)
            done = read_json(path) if path.is_file() else {}
            write_json_atomic(path, {**done, str(epoch): scores})


class Uncached(Evaluator):
    """The eval stage's scoring of features extracted now (each epoch's model is another model)."""

    def features(self, label, key, model, dataset):
        import numpy as np
        import torch.distributed as dist

        from evaluation.features import extract
        e = self.cfg.eval
        part = extract(model, dataset, int(e.batch_size), int(e.workers), str(self.cfg.device), self.rank,
                       self.world, self.mode, desc=f"finetune {key} {label} test")
        if self.world == 1:
            return part
        parts = [None] * self.world
        dist.all_gather_object(parts, part)
        return np.concatenate(parts)


def selected_on_test(epochs: dict) -> dict:
    """The official number (retrieval.py's max_score): each metric's best over the epochs, and the epoch
    of the best R@1, as SELECTED/<metric> keys."""
    best = {f"{SELECTED}{k}": max(m[k] for m in epochs.values()) for k in next(iter(epochs.values()))}
    best[f"{SELECTED}epoch"] = int(max(epochs, key=lambda ep: epochs[ep]["R@1"]))
    return best


def finetune_one(cfg: DictConfig, name: str) -> dict:
    """Fine-tune on `name`'s train split (collective over the job's ranks); the Trainer's summary."""
    from evaluation.finetune.data import TrainImages, eval_transform, finetune_transform

    init = init_spec(cfg)
    model = trained_name(init, cfg)
    _record_init(cfg, name)
    root = Path(str(cfg.eval.data_root)) / name
    size = backbone.image_size(model)
    data = TrainImages(retrieval_sets.read_train(name, root), finetune_transform(cfg.finetune, size))
    scores = EpochScores(cfg, name, eval_transform(cfg.finetune, size)) if cfg.finetune.eval_every_epoch else None
    return train.train(cfg, data=data, out=f"finetune/{name}", section=SECTION, loss=LOSS,
                       init=lambda: start_model(cfg, init), epoch_end=scores)


def evaluate(cfg: DictConfig, name: str) -> dict | None:
    """The init and the model fine-tuned on `name`, on `name` and finetune.eval_datasets; rank 0 merges
    the results into RUN/eval (results.json, results.md with the Tab. 4 table, the dimension plot).
    The fine-tuned model's test images go through finetune.transform's eval transform, the init's
    through its own preprocess (retrieval.py --eval); the best epoch's scores join the tuned model's."""
    from evaluation import results
    from evaluation.finetune.data import eval_transform
    from unicom_ds.dist import rank_world

    rank, world = rank_world()
    init = init_spec(cfg)
    cfg = OmegaConf.merge(cfg, {"eval": {"datasets": _eval_names(cfg, name)}})
    label, spec = tuned_spec(cfg, init, name)
    transform = eval_transform(cfg.finetune, backbone.image_size(trained_name(init, cfg)))
    found, computed = Evaluator(cfg, rank, world, [(str(cfg.finetune.init), init), (label, spec)],
                                preprocess={spec.label: transform}).run()
    if rank != 0:
        return None
    path = epochs_path(cfg, name)
    if path.is_file() and cfg.finetune.eval_every_epoch:
        found[spec.label][name].update(selected_on_test(read_json(path)))
    merged, text = results.write_all(cfg.run_dir, found, computed)
    print(text, flush=True)
    return merged


def finetune_job(cfg: Any) -> dict:
    """Every set of finetune.datasets: fine-tune, then evaluate. Returns {set: trainer summary}."""
    cfg = config.as_config(cfg)
    out = {}
    for name in map(str, cfg.finetune.datasets):
        out[name] = finetune_one(cfg, name)
        evaluate(cfg, name)
    return out


class FinetuneJob(train.TrainJob):
    """The SLURM job: the train stage's (one task per GPU, requeued at the time limit) on finetune.*."""

    section = SECTION

    def run(self, cfg: DictConfig) -> dict:
        return finetune_job(cfg)


def local_command(cfg: Any) -> list[str]:
    """launcher=local: this file under the deepspeed launcher, one process per GPU (finetune.local_processes)."""
    return train.local_command(cfg, script=JOB_PY, section=SECTION)


def main(argv: list[str] | None = None) -> dict:
    import argparse
    ap = argparse.ArgumentParser(prog="deepspeed evaluation/finetune/job.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    _, overrides = ap.parse_known_args(argv)
    return finetune_job(config.resolve(["stage=finetune", *overrides]))


if __name__ == "__main__":
    quiet.install()
    with disk.one_line(train.TrainingDiverged):
        main()
