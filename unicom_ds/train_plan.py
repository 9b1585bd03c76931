"""The train stage's plan, checked before anything runs: model, DeepSpeed file, batch arithmetic,
schedule, and the run it starts from. Light (no torch): the launcher runs it before submitting.

The global batch is the recipe (`train_batch_size` in the DeepSpeed file); gradient accumulation
follows from the number of ranks, so one file serves 1 GPU, one node and 128 GPUs alike.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from unicom_ds import continuation
from unicom_ds.config import ConfigError, MissingInput, noting_missing

REPO = Path(__file__).resolve().parents[1]
AUTO = "auto"
# train.deepspeed_config=auto: each paper model's recipe file (the same global batch, a micro batch
# that fits an 80 GB GPU without activation checkpointing; bigG's from its measured activations per sample,
# docs/benchmarks.md); every other model uses zero2.json.
RECIPE_DS = {"ViT-L-14": "ds_configs/zero2_l14.json", "ViT-L-14-336": "ds_configs/zero2_l14_336.json",
             "MLCD-ViT-L-14-336": "ds_configs/zero2_l14_336.json",
             "MLCD-ViT-bigG-14-224": "ds_configs/zero2_bigG_224.json",
             "MLCD-ViT-bigG-14-336": "ds_configs/zero2_bigG_336.json",
             "MLCD-ViT-bigG-14-448": "ds_configs/zero2_bigG_448.json"}
DEFAULT_DS = "ds_configs/zero2.json"
PRECISIONS = ("bf16", "fp32")


def ds_path(cfg: Any, section: str = "train") -> Path:
    """The DeepSpeed file of this run: <section>.deepspeed_config, or the model's recipe file for `auto`."""
    value = str(OmegaConf.select(cfg, section).deepspeed_config)
    if value == AUTO:
        return REPO / RECIPE_DS.get(str(cfg.model), DEFAULT_DS)
    return Path(value)


def deepspeed_config(cfg: Any, world: int, section: str = "train") -> dict:
    """The DeepSpeed config with precision from <section>.precision and accumulation for `world` ranks.

    A section with a `batch_size` key (fine-tuning) sets the global batch itself, split evenly over the
    ranks without accumulation; otherwise the file's train_batch_size is the recipe."""
    sec = OmegaConf.select(cfg, section)
    path = ds_path(cfg, section)
    if not path.is_file():
        raise ConfigError(f"{section}.deepspeed_config={sec.deepspeed_config}: {path} is not a file")
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{section}.deepspeed_config: {path} is not readable JSON ({e})") from None
    if sec.precision not in PRECISIONS:
        raise ConfigError(f"{section}.precision={sec.precision}: expected bf16 or fp32")
    batch = OmegaConf.select(sec, "batch_size")
    if batch is not None:
        if int(batch) % world:
            raise ConfigError(f"{section}.batch_size={batch}: not a multiple of the {world} ranks")
        ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"] = int(batch), int(batch) // world
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu"):
        if not isinstance(ds.get(key), int) or ds[key] < 1:
            raise ConfigError(f"{path}: needs '{key}' as a positive integer (global batch and per-rank micro batch)")
    global_batch, micro = ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"]
    if global_batch % (micro * world):
        fits = [w for w in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if global_batch % (micro * w) == 0]
        raise ConfigError(f"{path}: train_batch_size {global_batch} is not a multiple of "
                          f"train_micro_batch_size_per_gpu {micro} x {world} ranks; with this file the number "
                          f"of ranks must divide {global_batch // micro} (e.g. {', '.join(map(str, fits))})")
    # The global batch is the recipe; accumulation follows the number of ranks (also on a resume).
    ds["gradient_accumulation_steps"] = global_batch // (micro * world)
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": sec.precision == "bf16"}
    ds.pop("fp16", None)
    return ds


def describe(cfg: Any, world: int, ranks: str) -> str:
    """The plan in one paragraph: architecture, batch arithmetic, schedule, starting point."""
    from unicom_ds import backbone

    try:
        model = backbone.description(str(cfg.model))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    ds = deepspeed_config(cfg, world)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    if micro < 2 and backbone.is_release(str(cfg.model)):
        raise ConfigError(f"{ds_path(cfg)}: train_micro_batch_size_per_gpu {micro}: the {cfg.model} head's BatchNorm "
                          "normalises each rank's micro batch, which needs at least 2 samples")
    warmup = float(cfg.train.warmup_epochs)
    start = (f"continues from {cfg.train.continue_from} (its weights and prototypes, a new schedule)"
             if cfg.train.continue_from else "from scratch")
    return (f"train: {model}\n"
            f"  global batch {ds['train_batch_size']} = micro {micro} x {world} ranks ({ranks}) x {accum} accumulation; "
            f"{cfg.train.precision}; {ds_path(cfg)}\n"
            f"  {cfg.train.epochs} epoch(s), lr {float(cfg.train.lr):g} {cfg.train.schedule} after "
            f"{warmup:g} warmup epoch(s); {continuation.loss_kind(cfg)} loss r1={cfg.loss.r1} r2={cfg.loss.r2} "
            f"margin={cfg.loss.margin} ({cfg.loss.margin_grad} gradient) scale={cfg.loss.scale}; {start}")


def precheck(cfg: Any, world: int, ranks: str, labels_expected: bool) -> list[str]:
    """Every train-stage check that needs no job: returns the plan's lines; raises ConfigError naming the key.

    `labels_expected`: the cluster stage's outputs must exist now (stage=train, not stage=all).
    """
    return describe(cfg, world, ranks).splitlines() + noting_missing(cfg, "train",
                                                                     lambda: check_inputs(cfg, labels_expected))


def check_inputs(cfg: Any, labels_expected: bool) -> None:
    """The base run of a continuation, the cluster stage's outputs, the shards, the checkpoint a resume reads."""
    from unicom_ds import shards

    if cfg.train.continue_from:
        base = continuation.finished_run(cfg.train.continue_from)
        continuation.check_compatible(base, str(cfg.model))
    source = continuation.label_source(cfg)
    summary = source.kmeans_summary
    if labels_expected and not summary.is_file():
        raise MissingInput(f"run_dir={cfg.run_dir}: {summary} is missing; run stage=cluster first (or stage=all)")
    # after the run checks: a run without a cluster stage or base is told that first, whatever its shards
    try:
        shards.check_present(shards.expand(str(cfg.data.shards)))
    except FileNotFoundError as e:
        raise MissingInput(str(e)) from None
    kind = continuation.loss_kind(cfg)
    if kind == "mlcd":
        check_topl(cfg, source, labels_expected)
    k = int(json.loads(summary.read_text())["k"]) if summary.is_file() else None
    check_resume(cfg, {"model": str(cfg.model), **({"num_classes": k} if k is not None else {}),
                       "loss_kind": kind})


def check_topl(cfg: Any, source: continuation.LabelSource, labels_expected: bool) -> None:
    """loss.kind=mlcd trains on RUN/labels/S.topl.npy: every assigned shard of data.shards has one, and a
    run whose cluster stage is still to come (stage=all) assigns with assign.top_l > 1."""
    from unicom_ds import shards

    if not labels_expected and not source.kmeans_summary.is_file() and int(cfg.assign.top_l) < 2:
        raise ConfigError(f"loss.kind=mlcd with assign.top_l={cfg.assign.top_l}: MLCD trains on each image's "
                          f"top-l labels, which the assign stage writes to {source.run / 'labels'}/S.topl.npy only "
                          "with assign.top_l > 1; set e.g. assign.top_l=8")
    stems = [shards.stem(url) for url in shards.expand(str(cfg.data.shards))]
    missing = source.without_topl(stems)
    if missing or (labels_expected and not any(source.topl(s).is_file() for s in stems)):
        raise ConfigError(source.missing_topl(missing or stems))


def check_resume(cfg: Any, identity: dict, section: str = "train", out: str = "train") -> None:
    """The refusals of the job's resume, made before anything is written: a checkpoint outside the run
    without <section>.trust_checkpoint, or one of another model or class count (`identity`, as the
    checkpoint's meta.json names them)."""
    from unicom_ds import checkpoint, config

    sec = OmegaConf.select(cfg, section)
    root = Path(str(cfg.run_dir)) / out / "ckpt"
    try:
        path = checkpoint.resolve(root, sec.resume, bool(sec.trust_checkpoint), section)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    if path is not None:
        meta = checkpoint.read_meta(path)
        config.check_same(checkpoint.identity(meta, identity), identity, path,
                          f"{section}.resume={sec.resume} would continue it: train this config in a new run_dir")
