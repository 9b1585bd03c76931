"""Configuration: YAML defaults per stage, RUN/config.yaml, then key=value overrides.

Precedence (last wins): slurm/configs/*.yaml < config=FILE < RUN/config.yaml < command line.
The command line is parsed by OmegaConf's dotlist parser; this module only adds the checks
(unknown keys name the closest valid key) and the run-directory bookkeeping.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from unicom_ds.atomic import write_text_atomic

CONFIG_DIR = Path(__file__).resolve().parents[1] / "slurm" / "configs"
DEFAULT_FILES = ("common.yaml", "cluster.yaml", "train.yaml", "eval.yaml")
STAGES = ("embed", "kmeans", "assign", "cluster", "train", "eval", "report", "all")
# Keys that say how to run, not what to compute: they never make a run's outputs differ.
RUNTIME_KEYS = ("stage", "launcher", "dry_run", "progress", "slurm", "config")


class ConfigError(ValueError):
    """A bad key or value in the configuration; the message names the key."""


def defaults() -> DictConfig:
    return OmegaConf.merge(*(OmegaConf.load(CONFIG_DIR / f) for f in DEFAULT_FILES))


def flat_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every leaf key of cfg in dotted form (`kmeans.k`); dict-valued leaves are recursed."""
    keys = []
    for k, v in cfg.items():
        path = f"{prefix}{k}"
        if isinstance(v, (DictConfig, dict)) and len(v):
            keys.extend(flat_keys(v, path + "."))
        else:
            keys.append(path)
    return keys


def _check_known(cfg: DictConfig, reference: DictConfig, origin: str) -> None:
    known = set(flat_keys(reference))
    prefixes = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for key in flat_keys(cfg):
        if key in known or key in prefixes:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.0)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}' (from {origin}){hint}")


def parse_overrides(argv: Iterable[str]) -> DictConfig:
    argv = list(argv)
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument '{arg}' is not of the form key=value")
    return OmegaConf.from_dotlist(argv)


def resolve(argv: Iterable[str] = (), base: Mapping | None = None) -> DictConfig:
    """The run's configuration from defaults, an optional config=FILE, RUN/config.yaml and argv."""
    ref = defaults() if base is None else OmegaConf.create(dict(base))
    cli = parse_overrides(argv)
    layers = [ref]
    extra = cli.pop("config", None)
    if extra is not None:
        path = Path(str(extra))
        if not path.is_file():
            raise ConfigError(f"config={path}: no such file")
        file_cfg = OmegaConf.load(path)
        _check_known(file_cfg, ref, str(path))
        layers.append(file_cfg)
    _check_known(cli, ref, "the command line")
    run_dir = cli.get("run_dir") or OmegaConf.merge(*layers).run_dir
    saved = Path(str(run_dir)) / "config.yaml"
    if saved.is_file():
        saved_cfg = OmegaConf.load(saved)
        _check_known(saved_cfg, ref, str(saved))
        layers.append(saved_cfg)
    layers.append(cli)
    cfg = OmegaConf.merge(*layers)
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    if cfg.stage not in STAGES:
        raise ConfigError(f"stage={cfg.stage}: expected one of {', '.join(STAGES)}")
    if cfg.launcher not in ("slurm", "local"):
        raise ConfigError(f"launcher={cfg.launcher}: expected 'slurm' or 'local'")
    if cfg.kmeans.mode not in ("joint", "image", "text"):
        raise ConfigError(f"kmeans.mode={cfg.kmeans.mode}: expected joint, image or text")
    if int(cfg.kmeans.k) < 1:
        raise ConfigError(f"kmeans.k={cfg.kmeans.k}: must be >= 1")
    for key in ("r1", "r2"):
        value = float(cfg.loss[key])
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"loss.{key}={value}: must be in (0, 1]")


def save(cfg: DictConfig) -> Path:
    """Write the resolved config to RUN/config.yaml (atomically) and return its path."""
    path = Path(str(cfg.run_dir)) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    content = OmegaConf.to_yaml(select(cfg, exclude=("stage", "dry_run", "config")))
    write_text_atomic(path, content)
    return path


def select(cfg: Any, keys: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict:
    """A plain-dict copy of cfg restricted to `keys` (dotted, default all) minus `exclude`."""
    c = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    plain = OmegaConf.to_container(c, resolve=True)
    if keys is not None:
        plain = {k: OmegaConf.select(c, k) for k in keys}
        plain = {k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
                 for k, v in plain.items()}
    for k in exclude:
        plain.pop(k, None)
    return plain


def as_config(cfg: Any) -> DictConfig:
    """Job functions receive plain dicts (picklable for submitit); turn them back into configs."""
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def check_same(recorded: Mapping, current: Mapping, where: os.PathLike | str) -> None:
    """Refuse to mix outputs: `recorded` is the config subset stored with finished work."""
    diffs = [f"{k}: {recorded.get(k)!r} there, {current.get(k)!r} now"
             for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if diffs:
        raise ConfigError(
            f"{where} was made with a different config ({'; '.join(diffs)}); "
            "use a new run_dir, or delete that output to redo it")
