"""Runs that start from another run's files: where a run's labels are, and continuation runs.

A continuation run (`train.continue_from=BASE`, e.g. the compact r2 = 0.5 epoch or the 336-px
epoch) is a new run directory with its own schedule, checkpoints, TensorBoard and export. It starts
from BASE's exported backbone and BASE's prototype blocks, read as plain tensors, and trains on
BASE's pseudo labels. A run's embeddings may live in another run too (`embed.from`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, MissingInput

EXPORT_META = "export.json"  # beside RUN/train/backbone.pt: the checkpoint it was exported from


@dataclass(frozen=True)
class LabelSource:
    run: Path          # the run holding kmeans/summary.json and labels/S.npy
    embed: Path        # the folder holding S.keys.txt (the rows the labels number)
    multi: bool = False  # loss.kind=mlcd: the labels are S.topl.npy ([n, l], -1 pads) instead of S.npy ([n])

    def keys(self, stem: str) -> Path:
        return self.embed / f"{stem}.keys.txt"

    def labels(self, stem: str) -> Path:
        return self.topl(stem) if self.multi else self.top1(stem)

    def top1(self, stem: str) -> Path:
        return self.run / "labels" / f"{stem}.npy"

    def topl(self, stem: str) -> Path:
        return self.run / "labels" / f"{stem}.topl.npy"

    def without_topl(self, stems: list[str]) -> list[str]:
        """The stems assigned (S.npy written) without top-l labels: assign.top_l was 1 for them."""
        return [s for s in stems if self.top1(s).is_file() and not self.topl(s).is_file()]

    def missing_topl(self, stems: list[str]) -> str:
        """The refusal of loss.kind=mlcd for shards without S.topl.npy (`stems`, at least one)."""
        more = f" (and {len(stems) - 1} more shards)" if len(stems) > 1 else ""
        return (f"loss.kind=mlcd trains on each image's top-l labels, but {self.topl(stems[0])} is missing{more}: "
                f"the labels in {self.run / 'labels'} were made with assign.top_l=1 (or not at all); rerun "
                "stage=assign with assign.top_l > 1 (e.g. assign.top_l=8), or train with loss.kind=unicom")

    @property
    def kmeans_summary(self) -> Path:
        return self.run / "kmeans" / "summary.json"


def _saved_config(run: Path) -> Any:
    path = run / "config.yaml"
    if not path.is_file():
        raise MissingInput(f"train.continue_from={run}: {path} is missing (not a run directory)")
    return OmegaConf.load(path)


def embed_source(cfg: Any) -> Path:
    """The folder of a run's S.keys.txt: its own embed/, or embed.from's."""
    cfg = OmegaConf.create(dict(cfg)) if isinstance(cfg, Mapping) and not isinstance(cfg, DictConfig) else cfg
    return Path(str(OmegaConf.select(cfg, "embed.from", default=None) or cfg.run_dir)) / "embed"


def loss_kind(cfg: Any, loss: str = "loss") -> str:
    """<loss>.kind of a config (unicom when the section has none: fine-tuning's finetune.loss)."""
    return str(OmegaConf.select(cfg, f"{loss}.kind", default="unicom") or "unicom")


def label_source(cfg: Any) -> LabelSource:
    """The labels a run trains on: its own, or, for a continuation run without any, its base run's;
    with loss.kind=mlcd, the top-l labels (S.topl.npy) of that run."""
    run, current, seen = Path(str(cfg.run_dir)), cfg, set()
    while not (run / "kmeans" / "summary.json").is_file() and OmegaConf.select(current, "train.continue_from"):
        seen.add(run.resolve())
        run = Path(str(current.train.continue_from))
        if run.resolve() in seen:
            raise ConfigError(f"train.continue_from: {run} continues from itself")
        current = _saved_config(run)
    return LabelSource(run, embed_source(current), multi=loss_kind(cfg) == "mlcd")


@dataclass(frozen=True)
class FinishedRun:
    run: Path
    backbone: Path     # RUN/train/backbone.pt
    checkpoint: Path   # the checkpoint it was exported from (its prototype blocks)
    meta: dict         # RUN/train/export.json


def finished_run(path: str | Path) -> FinishedRun:
    """BASE as a run whose training finished: an export and the checkpoint it came from."""
    run = Path(str(path))
    train = run / "train"
    meta_path = train / EXPORT_META
    if not meta_path.is_file():
        raise MissingInput(f"train.continue_from={path}: {meta_path} is missing; the run has not finished "
                          "training (its final export writes it)")
    meta = read_json(meta_path)
    backbone, ckpt = train / "backbone.pt", train / "ckpt" / meta["checkpoint"]
    for needed in (backbone, ckpt / "meta.json"):
        if not needed.is_file():
            raise MissingInput(f"train.continue_from={path}: {needed} is missing (named by {meta_path})")
    return FinishedRun(run, backbone, ckpt, meta)


def check_compatible(base: FinishedRun, model: str) -> None:
    """The new model must take BASE's weights: the same architecture, at any input size (release models)."""
    from unicom_ds import backbone, unicom_vit

    old = base.meta["model"]
    same = old == model
    if not same and backbone.is_release(old) and backbone.is_release(model):
        strip = ("image_size",)
        same = ({k: v for k, v in unicom_vit.config(old).items() if k not in strip}
                == {k: v for k, v in unicom_vit.config(model).items() if k not in strip})
    if not same:
        raise ConfigError(f"model={model}: train.continue_from={base.run} trained {old}; a continuation keeps the "
                          "architecture (only a Unicom release architecture may change its input size)")
