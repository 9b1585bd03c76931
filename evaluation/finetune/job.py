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

from unicom_ds import backbone, config, disk, train, train_plan
from unicom_ds.atomic import read_json, write_json_atomic
from unicom_ds.loading import openclip_architecture

from evaluation import retrieval_sets
from evaluation.results import FT_PREFIX
from evaluation.run import ModelSpec, parse_model

JOB_PY = Path(__file__).resolve()
SECTION, LOSS = "finetune", "finetune.loss"



def init_spec(cfg: Any) -> ModelSpec:
    try:
        return parse_model(str(cfg.finetune.init), cfg.run_dir, str(cfg.model))
    except config.ConfigError as e:
        raise config.ConfigError(f"finetune.init: {e}") from None


def trained_name(spec: ModelSpec, cfg: Any) -> str:
    """The backbone name the Trainer exports under (a name `unicom_ds.backbone` builds)."""
    kind, _, name = spec.name.partition(":")
    if spec.label == "run":
        name = str(cfg.model)
    elif kind == "unicom":
        from unicom_ds.unicom_vit import canonical_name
        name = canonical_name(name)
    elif kind == "ckpt":
        name = name if name.startswith(backbone.OPENCLIP) else backbone.OPENCLIP + name
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
        train_plan.check_resume(cfg, {}, SECTION, f"finetune/{name}")
        lines.append(f"  {name}: {len(split.paths)} train images of {len(set(split.labels.tolist()))} classes "
                     f"from {' and '.join(split.lists)}; evaluated on {', '.join(_eval_names(cfg, name))}")
    f, lc = cfg.finetune, cfg.finetune.loss
    lines.append(f"  {f.epochs} epoch(s), lr {float(f.lr):g} {f.schedule} ({float(f.warmup_epochs):g} warmup "
                 f"epochs), prototypes x{float(f.prototype_lr_mult):g}, weight decay {float(f.weight_decay):g}; "
                 f"loss r1={lc.r1} margin={lc.margin} scale={lc.scale}; augment {f.augment.auto_augment}, "
                 f"jitter {f.augment.color_jitter}, erasing {f.augment.re_prob} ({f.augment.re_mode})")
    return lines


def _record_init(cfg: Any, name: str, init: ModelSpec) -> None:
    """A fine-tuning folder belongs to one init: resuming another model's checkpoints is refused."""
    path = out_dir(cfg, name) / "init.json"
    current = {"finetune.init": str(cfg.finetune.init)}
    if path.is_file():
        config.check_same(read_json(path), current, path.parent)
    elif int(os.environ.get("RANK", 0)) == 0:
        write_json_atomic(path, current)


def finetune_one(cfg: DictConfig, name: str) -> dict:
    """Fine-tune on `name`'s train split (collective over the job's ranks); the Trainer's summary."""
    from evaluation.finetune.data import TrainImages, train_transform
    from unicom_ds.loading import load

    init = init_spec(cfg)
    model = trained_name(init, cfg)
    _record_init(cfg, name, init)
    root = Path(str(cfg.eval.data_root)) / name
    data = TrainImages(retrieval_sets.read_train(name, root),
                       train_transform(cfg.finetune.augment, backbone.image_size(model)))
    return train.train(cfg, data=data, out=f"finetune/{name}", section=SECTION, loss=LOSS,
                       init=lambda: (model, load(init.name, init.checkpoint)[0]))


def evaluate(cfg: DictConfig, name: str) -> dict | None:
    """The init and the model fine-tuned on `name`, on `name` and finetune.eval_datasets; rank 0 merges
    the results into RUN/eval (results.json, results.md with the Tab. 4 table, the dimension plot)."""
    from evaluation import results
    from evaluation.run import Evaluator
    from unicom_ds.dist import rank_world

    rank, world = rank_world()
    init = init_spec(cfg)
    cfg = OmegaConf.merge(cfg, {"eval": {"datasets": _eval_names(cfg, name)}})
    models = [(str(cfg.finetune.init), init), tuned_spec(cfg, init, name)]
    found, computed = Evaluator(cfg, rank, world, models).run()
    if rank != 0:
        return None
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
    with disk.one_line():
        main()
