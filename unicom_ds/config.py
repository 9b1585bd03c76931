"""Configuration: YAML defaults per stage, RUN/config.yaml, then key=value overrides.

Precedence (last wins): slurm/configs/*.yaml < config=FILE < RUN/config.yaml < command line.
The command line is parsed by OmegaConf's dotlist parser; this module only adds the checks
(unknown keys name the closest valid key; types and ranges from `unicom_ds.schema`) and the
run-directory bookkeeping.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf

from unicom_ds import schema
from unicom_ds.atomic import read_json, write_json_atomic, write_text_atomic
from unicom_ds.schema import STAGES, ConfigError, MissingInput, flat_keys  # noqa: F401 (part of this module's API)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "slurm" / "configs"
DEFAULT_FILES = ("common.yaml", "cluster.yaml", "train.yaml", "eval.yaml", "detect.yaml",
                 "finetune.yaml", "quantize.yaml")
# Keys that say how to run, not what to compute: they never make a run's outputs differ.
RUNTIME_KEYS = ("stage", "launcher", "dry_run", "progress", "slurm", "config")
# Keys that hold for one command only: RUN/config.yaml never records them, and a recorded value (older runs
# wrote them) is not read back, so `train.resume=none` once can never switch off a later rerun's checks.
ONE_OFF_KEYS = ("stage", "dry_run", "config", "train.resume", "train.trust_checkpoint", "finetune.resume",
                "finetune.trust_checkpoint", "quantize.scq.resume", "quantize.scq.trust_checkpoint")


def defaults() -> DictConfig:
    return OmegaConf.merge(*(OmegaConf.load(CONFIG_DIR / f) for f in DEFAULT_FILES))


def _check_known(cfg: DictConfig, reference: DictConfig, origin: str) -> None:
    known = set(flat_keys(reference))
    prefixes = {k.rsplit(".", i)[0] for k in known for i in range(1, k.count(".") + 1)}
    for key in flat_keys(cfg):
        if key in known or key in prefixes:
            continue
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.0)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown config key '{key}' (from {origin}){hint}")


def _load(path: Path) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml's parser errors are not ValueErrors; name the file, not a traceback
        raise ConfigError(f"{path}: not a readable YAML config ({' '.join(str(e).split())})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of config keys, found a {type(loaded).__name__}")
    return loaded


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
        file_cfg = _load(path)
        _check_known(file_cfg, ref, str(path))
        layers.append(file_cfg)
    _check_known(cli, ref, "the command line")
    run_dir = cli.get("run_dir") or OmegaConf.merge(*layers).run_dir
    saved = Path(str(run_dir)) / "config.yaml"
    if saved.is_file():
        saved_cfg = _load(saved)
        _check_known(saved_cfg, ref, str(saved))
        layers.append(OmegaConf.create(select(saved_cfg, exclude=ONE_OFF_KEYS)))
    else:
        inherited = _continued_config(OmegaConf.merge(*layers, cli), ref)
        if inherited is not None:
            layers.insert(1, inherited)
    layers.append(cli)
    cfg = OmegaConf.merge(*layers)
    schema.check(cfg, ref)
    return cfg


# A continuation run takes its base run's config except what names the base run itself.
_NOT_INHERITED = ("run_dir", "train.continue_from", "slurm.log_dir", *ONE_OFF_KEYS)


def _continued_config(cfg: DictConfig, ref: DictConfig) -> DictConfig | None:
    """For a new run with train.continue_from=BASE: BASE/config.yaml, the layer just above the defaults
    (so config=FILE, e.g. a continuation recipe, and the command line still override it)."""
    base = OmegaConf.select(cfg, "train.continue_from")
    path = Path(str(base)) / "config.yaml" if base else None
    if path is None or not path.is_file():
        return None  # the train stage's checks say what is missing about BASE
    inherited = OmegaConf.create(select(_load(path), exclude=_NOT_INHERITED))
    _check_known(inherited, ref, str(path))
    return inherited


def noting_missing(cfg: Any, step: str, check: Callable[[], Any]) -> list[str]:
    """Run `check` (returning plan lines or None): in a dry run a missing input becomes a line of the plan,
    so the plan prints without the data; otherwise it raises."""
    try:
        return list(check() or [])
    except (MissingInput, FileNotFoundError) as e:
        if not cfg.dry_run:
            raise
        return [f"missing ({step}; a real submission stops here): {e}"]


def log_dir(cfg: Any) -> Path:
    """Where the jobs' logs go: slurm.log_dir, else RUN/logs."""
    return Path(str(cfg.slurm.log_dir or Path(str(cfg.run_dir)) / "logs"))


def save(cfg: DictConfig) -> Path:
    """Write the resolved config to RUN/config.yaml (atomically) and return its path. What the file held
    before is kept in the logs (config_undo.json), for `undo_save`."""
    path = Path(str(cfg.run_dir)) / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    content = saved_text(cfg)
    undo = log_dir(cfg) / "config_undo.json"
    undo.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(undo, {"before": path.read_text() if path.is_file() else None, "saved": content})
    write_text_atomic(path, content)
    return path


def saved_text(cfg: Any) -> str:
    """RUN/config.yaml as `save` writes it for cfg: without the one-off keys."""
    return OmegaConf.to_yaml(select(cfg, exclude=ONE_OFF_KEYS))


def undo_save(cfg: Any) -> None:
    """Put RUN/config.yaml back as it was before this command's `save`: its first job refused the command
    after a pass over the data (the import's URL join), on SLURM long after submission, and a refused command
    is never recorded. What a later command saved is left alone."""
    undo, path = log_dir(cfg) / "config_undo.json", Path(str(cfg.run_dir)) / "config.yaml"
    if not undo.is_file():
        return
    record, mine = read_json(undo), saved_text(cfg)
    if record["saved"] != mine:
        return  # the record is a later command's
    if path.is_file() and path.read_text() == mine:
        if record["before"] is None:
            path.unlink()
        else:
            write_text_atomic(path, record["before"])
    undo.unlink()


def select(cfg: Any, keys: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict:
    """A plain-dict copy of cfg restricted to `keys` (dotted, default all) minus `exclude` (dotted)."""
    c = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    plain = OmegaConf.to_container(c, resolve=True)
    if keys is not None:
        plain = {k: OmegaConf.select(c, k) for k in keys}
        plain = {k: OmegaConf.to_container(v) if isinstance(v, (DictConfig, ListConfig)) else v
                 for k, v in plain.items()}
    for k in exclude:
        *parents, leaf = k.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


def as_config(cfg: Any) -> DictConfig:
    """Job functions receive plain dicts (picklable for submitit); turn them back into configs."""
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)


def check_same(recorded: Mapping, current: Mapping, where: os.PathLike | str, way_on: str | None = None) -> None:
    """Refuse to mix outputs: `recorded` is the config subset stored with finished work (`where`).

    `way_on` is the cheapest way forward the caller knows (the cluster stage: a new run that reuses these
    embeddings by reference); without it, a new run_dir."""
    diffs = [f"{k}: {recorded.get(k)!r} there, {current.get(k)!r} now"
             for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]
    if diffs:
        raise ConfigError(
            f"{where} was made with a different config ({'; '.join(diffs)}); "
            + (way_on or "use a new run_dir, or delete that output to redo it"))
