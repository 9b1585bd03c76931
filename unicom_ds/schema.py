"""The one schema of config keys: type and range checks, before anything runs.

Each key's type comes from its default in slurm/configs/*.yaml (an int default makes an integer key,
a list of strings a list of strings, ...). `RULES` adds what a default cannot say: ranges, fixed
choices, the type of a key whose default is null, and directories that must be writable. A key with
neither a rule nor a non-null default accepts anything. `config.resolve` checks every key with
`check`; `docs/config_reference.py` prints `describe` into the README's key reference.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

STAGES = ("embed", "kmeans", "assign", "cluster", "train", "eval", "report", "all", "detect", "finetune",
          "quantize")
_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "list": "a list such as [a,b]", "dir": "a writable directory", "any": "any value"}
_PLURAL = {"int": "integers", "float": "numbers", "bool": "booleans", "str": "strings", "any": "values"}


class ConfigError(ValueError):
    """A bad key or value in the configuration; the message names the key."""


class MissingInput(ConfigError):
    """An input the stage reads is not there (yet): it stops a submission; a dry run lists it and goes on."""


class _Invalid(ValueError):
    """A value that breaks its rule (the caller adds the key)."""


@dataclass(frozen=True)
class Rule:
    kind: str | None = None           # int | float | bool | str | list | dir | any; None: from the default
    lo: float | None = None           # lower bound (inclusive unless lo_open)
    hi: float | None = None           # upper bound (inclusive)
    lo_open: bool = False
    choices: tuple = ()               # the value must be one of these (then kind is not used)
    items: "Rule | None" = None       # lists: the rule of each item
    nullable: bool | None = None      # None: nullable exactly when the default is null

    def describe(self) -> str:
        """What a valid value looks like, for error messages and the README."""
        if self.choices:
            text = " / ".join(_show(c) for c in self.choices)
        elif self.kind == "list":
            text = "a list such as [a,b]" if self.items is None or self.items.kind == "any" else \
                f"a list of {_PLURAL[self.items.kind]}{self.items._bounds()}"
        else:
            text = _NAMES[self.kind or "any"] + self._bounds()
        return f"null or {text}" if self.nullable and self.kind != "any" else text

    def _bounds(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f" in {'(' if self.lo_open else '['}{_show(self.lo)}, {_show(self.hi)}]"
        if self.lo is not None:
            return f" {'>' if self.lo_open else '>='} {_show(self.lo)}"
        return ""

    def coerce(self, value: Any) -> Any:
        """The value in its key's type, or _Invalid (whose message the caller prefixes with the key)."""
        if value is None and (self.nullable or self.kind == "any"):
            return None
        if self.choices:
            for choice in self.choices:  # `1 == True` in Python: compare types too
                if value == choice and type(value) is type(choice):
                    return choice
            raise _Invalid(f"expected {self.describe()}")
        kind = self.kind or "any"
        if kind == "any":
            return value
        if kind == "list":
            if not isinstance(value, (list, tuple)):
                raise _Invalid(f"expected {self.describe()}")
            if self.items is None:
                return list(value)
            out = []
            for i, item in enumerate(value):
                try:
                    out.append(self.items.coerce(item))
                except _Invalid:
                    raise _Invalid(f"item {i} ({_show(item)}) is not valid: expected {self.describe()}") from None
            return out
        if kind == "dir":
            value = _as_kind("str", value)
            if not value:
                raise _Invalid(f"expected {self.describe()}")
            problem = writable_dir_problem(Path(value))
            if problem:
                raise _Invalid(problem)
            return value
        if kind == "str" and isinstance(value, bool):
            raise _Invalid(f"expected {self.describe()} (YAML reads a bare yes/no/on/off/true/false as a "
                           "boolean: quote it for YAML and the shell, e.g. \"key='no'\")")
        value = _as_kind(kind, value)
        if value is None:
            raise _Invalid(f"expected {self.describe()}")
        if kind in ("int", "float") and not self._in_range(value):
            raise _Invalid(f"expected {self.describe()}")
        return value

    def _in_range(self, x: float) -> bool:
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            return False
        return self.hi is None or x <= self.hi


def _as_kind(kind: str, value: Any) -> Any:
    """value as `kind`, or None when it is not one (a bool is never a number; 1.5 is never an int)."""
    if isinstance(value, bool):
        return value if kind == "bool" else None
    if kind == "int":
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e6 on the command line is a float
            return int(value)
        return None
    if kind == "float":
        return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    if kind == "str":
        # `run_dir=2024` arrives as a number; a bare yes/no/on/off arrives as a bool and is refused above.
        return str(value) if isinstance(value, (str, int, float)) else None
    return None


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def writable_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be used (or created) as an output directory, or None. Creates nothing that stays."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} exists and is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    if existing != path:  # root's access() says yes even for /proc: try it
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".unicom-write-test-", dir=existing))
        except OSError as e:
            return f"cannot create a directory in {existing} ({e.strerror or e})"
    return None


# Everything a default's type cannot say. Keys may be fnmatch patterns (`*slurm.nodes` also matches
# `slurm.nodes`); the first matching entry wins. A rule without `kind` takes the default's type, so
# AT_LEAST_1 on an integer default is an integer >= 1, and POSITIVE on a float default a number > 0.
AT_LEAST_1, NON_NEGATIVE, POSITIVE = Rule(lo=1), Rule(lo=0), Rule(lo=0, lo_open=True)
AUTO_BOOL = Rule(choices=("auto", True, False))
RULES: dict[str, Rule] = {
    "run_dir": Rule("dir"),
    "stage": Rule(choices=STAGES),
    "launcher": Rule(choices=("slurm", "local")),
    "seed": NON_NEGATIVE,
    "device": Rule(choices=("auto", "cpu", "cuda")),
    "progress": Rule(choices=("auto", "bar", "lines", "off", False)),  # YAML reads a bare `off` as false
    "*slurm.partition": Rule("str"), "*slurm.account": Rule("str"), "*slurm.qos": Rule("str"),
    "*slurm.constraint": Rule("str"),
    "*slurm.nodes": Rule("int", lo=1), "*slurm.gpus_per_node": Rule("int", lo=0),
    "*slurm.cpus_per_task": Rule("int", lo=1), "*slurm.mem_gb": Rule("float", lo=0, lo_open=True),
    "*slurm.time_min": Rule("int", lo=1), "slurm.array_parallelism": AT_LEAST_1,
    "slurm.log_dir": Rule("dir"),
    "report.classes": NON_NEGATIVE, "report.per_class": AT_LEAST_1, "report.thumb_size": Rule(lo=8),
    "report.tensorboard_grids": NON_NEGATIVE,
    "embed.batch_size": AT_LEAST_1, "embed.workers": NON_NEGATIVE, "embed.shards_per_task": AT_LEAST_1,
    "embed.from": Rule("str"),
    "embed.source": Rule("str"), "import.parts_per_task": AT_LEAST_1, "import.batch_size": AT_LEAST_1,
    "import.key_column": Rule(choices=("url", "key", "image_path", "auto")), "import.min_join": Rule(lo=0, hi=1),
    "import.bucket_rows": AT_LEAST_1, "import.folders.*": Rule("str"),
    "kmeans.k": AT_LEAST_1, "kmeans.mode": Rule(choices=("joint", "image", "text")), "kmeans.niter": AT_LEAST_1,
    "kmeans.init": Rule(choices=("afkmc2", "kmeans++", "random")),
    "kmeans.max_points_per_centroid": AT_LEAST_1, "kmeans.min_points_per_centroid": NON_NEGATIVE,
    "kmeans.two_level": AUTO_BOOL, "kmeans.seed": NON_NEGATIVE, "kmeans.gpu": AUTO_BOOL,
    "kmeans.refine_iters": NON_NEGATIVE, "kmeans.refine_nprobe": AT_LEAST_1,
    "assign.batch_size": AT_LEAST_1, "assign.shards_per_task": AT_LEAST_1, "assign.gpu": AUTO_BOOL,
    "assign.search": Rule(choices=("auto", "exact", "ivf")), "assign.nlist": Rule("int", lo=1),
    "assign.nprobe": AT_LEAST_1, "assign.top_l": AT_LEAST_1, "assign.check_rows": NON_NEGATIVE,
    "loss.kind": Rule(choices=("unicom", "mlcd")),  # objectives.PROTOTYPE_LAYERS: the layer of each kind
    "loss.r1": Rule(lo=0, hi=1, lo_open=True), "loss.r2": Rule(lo=0, hi=1, lo_open=True), "loss.r3": Rule(lo=0, hi=1),
    "loss.margin": NON_NEGATIVE, "loss.scale": POSITIVE,
    "loss.margin_grad": Rule(choices=("straight_through", "exact")),
    "loss.margin_kind": Rule(choices=("angular", "additive")),  # mlcd.MARGIN_KINDS
    "loss.negatives": Rule(choices=("sampled", "selected")),    # mlcd.NEGATIVES
    "train.epochs": AT_LEAST_1, "train.steps_per_epoch": Rule("int", lo=1), "train.max_steps": Rule("int", lo=1),
    "train.lr": NON_NEGATIVE, "train.schedule": Rule(choices=("cosine", "constant")),
    "train.continue_from": Rule("str"), "train.max_bad_steps": NON_NEGATIVE, "train.loader_timeout_s": POSITIVE,
    "train.weight_decay": NON_NEGATIVE, "train.warmup_epochs": NON_NEGATIVE,
    "train.prototype_lr_mult": NON_NEGATIVE, "train.precision": Rule(choices=("bf16", "fp32")),
    "train.workers": NON_NEGATIVE, "train.local_processes": Rule("int", lo=1),
    "train.ckpt_every_steps": AT_LEAST_1, "train.keep_checkpoints": AT_LEAST_1, "train.log_every": AT_LEAST_1,
    "train.augment.crop_scale_min": Rule(lo=0, hi=1, lo_open=True), "train.augment.hflip": Rule(lo=0, hi=1),
    "eval.batch_size": AT_LEAST_1, "eval.workers": NON_NEGATIVE, "eval.dims": Rule("list", items=Rule("int", lo=1)),
    "eval.probe.max_iter": AT_LEAST_1, "eval.probe.val_fraction": Rule(lo=0, hi=1, lo_open=True),
    "eval.probe.fixed_c": Rule("float", lo=0, lo_open=True, nullable=True),
    "finetune.datasets": Rule("list", items=Rule("str", choices=("cub", "cars", "sop", "inshop", "inat"))),
    "finetune.eval_datasets": Rule("list", items=Rule("str")), "finetune.init": Rule("str"),
    "finetune.batch_size": AT_LEAST_1, "finetune.epochs": AT_LEAST_1, "finetune.steps_per_epoch": Rule("int", lo=1),
    "finetune.max_steps": Rule("int", lo=1), "finetune.lr": NON_NEGATIVE,
    "finetune.schedule": Rule(choices=("onecycle", "cosine", "constant")), "finetune.warmup_epochs": NON_NEGATIVE,
    "finetune.weight_decay": NON_NEGATIVE, "finetune.prototype_lr_mult": NON_NEGATIVE,
    "finetune.precision": Rule(choices=("bf16", "fp32")), "finetune.transform": Rule(choices=("timm", "origin_clip")),
    "finetune.drop_path": Rule(lo=0, hi=1), "finetune.max_bad_steps": NON_NEGATIVE,
    "finetune.loader_timeout_s": POSITIVE, "finetune.workers": NON_NEGATIVE, "finetune.local_processes": Rule("int", lo=1),
    "finetune.ckpt_every_steps": AT_LEAST_1, "finetune.keep_checkpoints": AT_LEAST_1, "finetune.log_every": AT_LEAST_1,
    "finetune.augment.crop_scale_min": Rule(lo=0, hi=1, lo_open=True), "finetune.augment.hflip": Rule(lo=0, hi=1),
    "finetune.augment.auto_augment": Rule("str", nullable=True), "finetune.augment.color_jitter": NON_NEGATIVE,
    "finetune.augment.re_prob": Rule(lo=0, hi=1), "finetune.augment.re_mode": Rule(choices=("pixel", "rand", "const")),
    "finetune.augment.re_count": AT_LEAST_1,
    "finetune.loss.r1": Rule(lo=0, hi=1, lo_open=True), "finetune.loss.r2": Rule(lo=0, hi=1, lo_open=True),
    "finetune.loss.margin": NON_NEGATIVE, "finetune.loss.scale": POSITIVE,
    "finetune.loss.margin_grad": Rule(choices=("straight_through", "exact")),
    "detect.model": Rule("str"), "detect.image_size": Rule(lo=32), "detect.steps": AT_LEAST_1,
    "detect.scale_range": Rule("list", items=Rule("float", lo=0, lo_open=True)),
    "detect.batch_size": AT_LEAST_1, "detect.lr": NON_NEGATIVE, "detect.warmup_steps": NON_NEGATIVE,
    "detect.decay_steps": Rule("list", items=Rule("int", lo=1)), "detect.weight_decay": NON_NEGATIVE,
    "detect.layer_decay": Rule("float", lo=0, hi=1, lo_open=True), "detect.drop_path": Rule("float", lo=0, hi=1),
    "detect.window_size": NON_NEGATIVE, "detect.global_blocks": Rule("list", items=Rule("int", lo=0)),
    "detect.fpn_channels": Rule(lo=8), "detect.rois_per_image": AT_LEAST_1,
    "detect.rpn_pre_nms_topk": Rule("list", items=Rule("int", lo=1)),
    "detect.rpn_post_nms_topk": Rule("list", items=Rule("int", lo=1)),
    "detect.max_bad_steps": NON_NEGATIVE, "detect.workers": NON_NEGATIVE,
    "detect.eval_batch_size": AT_LEAST_1, "detect.ckpt_every_steps": AT_LEAST_1, "detect.log_every": AT_LEAST_1,
    "quantize.datasets": Rule("list", items=Rule("str")), "quantize.model": Rule("str"),
    "quantize.methods": Rule("list", items=Rule("str", choices=("pq", "opq", "ivfpq", "scq", "scq_e2e"))),
    "quantize.bits": Rule("list", items=Rule("int", lo=1)), "quantize.nbits": Rule("list", items=Rule("int", lo=1, hi=16)),
    "quantize.train_split": Rule(choices=("train", "test")), "quantize.views": NON_NEGATIVE, "quantize.map_k": AT_LEAST_1,
    "quantize.ivf.nlist": Rule("int", lo=1), "quantize.ivf.nprobe": AT_LEAST_1,
    "quantize.ivf.sweep": Rule("list", items=Rule("int", lo=1)),
    "quantize.scq.init": Rule(choices=("opq", "random")), "quantize.scq.adc": Rule(choices=("squared", "plain")),
    "quantize.scq.backbone_lr_mult": POSITIVE,
    "quantize.scq.workers": NON_NEGATIVE,
    "quantize.scq.sub_dim": AT_LEAST_1, "quantize.scq.hidden": AT_LEAST_1, "quantize.scq.tau_sq": POSITIVE,
    "quantize.scq.w_*": NON_NEGATIVE, "quantize.scq.top_neighbours": AT_LEAST_1, "quantize.scq.tau_*": POSITIVE,
    "quantize.scq.epochs": AT_LEAST_1, "quantize.scq.batch_size": Rule(lo=2), "quantize.scq.lr": NON_NEGATIVE,
    "quantize.scq.warmup_epochs": NON_NEGATIVE, "quantize.scq.weight_decay": NON_NEGATIVE,
    "quantize.scq.steps_per_epoch": Rule("int", lo=1), "quantize.scq.max_steps": Rule("int", lo=1),
    "quantize.scq.schedule": Rule(choices=("onecycle", "cosine", "constant")),
    "quantize.scq.precision": Rule(choices=("bf16", "fp32")), "quantize.scq.max_bad_steps": NON_NEGATIVE,
    "quantize.scq.ckpt_every_steps": AT_LEAST_1, "quantize.scq.keep_checkpoints": AT_LEAST_1,
    "quantize.scq.log_every": AT_LEAST_1,
}


def derived(default: Any) -> Rule:
    """The rule a default value implies on its own: its type; null accepts anything."""
    if default is None:
        return Rule("any")
    if OmegaConf.is_config(default):
        default = OmegaConf.to_container(default)
    for kind, types in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(default, types):
            return Rule(kind)
    if isinstance(default, list):
        kinds = {derived(v).kind for v in default}
        return Rule("list", items=Rule(kinds.pop()) if len(kinds) == 1 else None)
    return Rule("any")


def rule(key: str, default: Any) -> Rule:
    """The full rule of `key`: its explicit entry completed from its default."""
    base = derived(default)
    explicit = RULES.get(key) or next((r for pattern, r in RULES.items()
                                       if "*" in pattern and fnmatchcase(key, pattern)), None)
    r = base if explicit is None else replace(explicit, kind=explicit.kind or base.kind,
                                               items=explicit.items or base.items)
    if r.nullable is None:
        r = replace(r, nullable=default is None)
    return r


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


def check(cfg: DictConfig, reference: DictConfig) -> None:
    """Check (and normalise in place: 1e6 -> 1000000 for an integer key) every key of `reference`
    in `cfg`; raises ConfigError listing every bad key with its value and what it should be."""
    problems = []
    for key in flat_keys(reference):
        default = OmegaConf.select(reference, key)
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if not isinstance(node, DictConfig):
            bad = next(p for p in _prefixes(parent) if not isinstance(OmegaConf.select(cfg, p), DictConfig))
            problems.append(f"{bad}={_show(OmegaConf.select(cfg, bad))}: expected a mapping of {bad}.* keys")
            continue
        if leaf not in node:
            continue
        value = node[leaf]
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        try:
            fixed = rule(key, default).coerce(plain)
        except _Invalid as e:
            problems.append(f"{key}={_show(plain)}: {e}")
            continue
        if fixed != plain or type(fixed) is not type(plain):
            node[leaf] = fixed
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def _prefixes(dotted: str) -> list[str]:
    parts = dotted.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
