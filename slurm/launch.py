"""Job planning for `slurm/submit.py`: which jobs a stage makes, their arguments, resources and order.

Pure: no SLURM, no job code imported. `launch_slurm` turns the plan into submitit jobs and
`launch_local` runs it on this machine; both call the very same job functions.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from unicom_ds import config, shards

STEPS = {
    "embed": ("embed",), "kmeans": ("kmeans",), "assign": ("assign",),
    "cluster": ("embed", "kmeans", "assign"),
    "train": ("train",), "eval": ("eval",),
    "report": ("report",),
    "all": ("embed", "kmeans", "assign", "train", "eval", "report"),
    "detect": ("detect",),
    "finetune": ("finetune",),
    "quantize": ("quantize",),
}
# The job function of each step, imported only when a job runs or is submitted: the launcher's
# config checks must work while a stage's code is missing or broken.
TARGETS = {
    "embed": "cluster_job.embed:embed_shards",
    "kmeans": "cluster_job.kmeans:run_kmeans",
    "assign": "cluster_job.assign:assign_shards",
    "train": "unicom_ds.train:TrainJob",
    "train_local": "unicom_ds.train:local_command",   # launcher=local: the `deepspeed ...` argv
    "eval": "evaluation.run:eval_job",
    "report": "evaluation.report:report_job",
    "import": "cluster_job.import_embeddings:import_parts",   # embed.source: replaces embed
    "detect": "evaluation.detection.job:DetectJob",   # a submitit Checkpointable: requeued at the time limit
    "finetune": "evaluation.finetune.job:FinetuneJob",  # the train stage's TrainJob on finetune.*
    "finetune_local": "evaluation.finetune.job:local_command",
    "quantize": "evaluation.quantize.job:QuantizeJob",  # one task, requeued at the time limit (SCQ resumes)
}
# Where each step writes inside the run directory (docs/design.md, "Stage contracts").
OUTPUTS = {"embed": "embed", "kmeans": "kmeans", "assign": "labels", "train": "train", "eval": "eval",
           "report": "report", "detect": "detect", "import": "embed",
           "finetune": "finetune", "quantize": "quantize"}
# The job functions are single-process: more nodes would only run copies of the same task.
SINGLE_NODE = ("embed", "kmeans", "assign", "report", "import", "quantize")
CPU_ONLY = ("report", "import")
# The keys each step's outputs are made with. A stage that does not run the step cannot change them once
# those outputs exist: RUN/config.yaml would record values the outputs were not made with.
MADE_WITH = {"embed": ("clip", "embed", "import"), "import": ("clip", "embed", "import"), "kmeans": ("kmeans",),
             "assign": ("assign",), "train": ("model", "loss", "train")}
RESOURCE_KEYS = ("partition", "account", "qos", "constraint", "nodes", "gpus_per_node",
                 "cpus_per_task", "mem_gb", "time_min", "array_parallelism")


@dataclass(frozen=True)
class Job:
    step: str                 # embed | kmeans | assign | train | eval
    tasks: tuple              # one tuple of extra arguments (after cfg) per array task
    after: str | None         # the step this job waits for (afterok), None for the first
    resources: dict           # resolved slurm.* values for this job

    @property
    def is_array(self) -> bool:
        return self.step in ("embed", "assign", "import")

    @property
    def tasks_per_node(self) -> int:
        # train and eval run one task per GPU (at least one on a GPU-less node).
        if self.step in ("train", "eval", "detect", "finetune"):
            return max(1, int(self.resources["gpus_per_node"] or 0))
        return 1


def target(step: str) -> Callable[..., Any]:
    module, name = TARGETS[step].split(":")
    return getattr(importlib.import_module(module), name)


def resources(cfg: DictConfig, step: str) -> dict:
    """`<stage>.slurm.*` defaults, overridden by every non-null top-level `slurm.*` key."""
    merged = {key: None for key in RESOURCE_KEYS}
    merged.update(dict(cfg[step].slurm))
    merged.update({k: v for k, v in cfg.slurm.items() if k in RESOURCE_KEYS and v is not None})
    if step in SINGLE_NODE:
        merged["nodes"] = 1
    if step in CPU_ONLY:
        merged["gpus_per_node"] = 0
    return merged


def plan(cfg: DictConfig) -> list[Job]:
    """The jobs of `cfg.stage`, in order; each depends on the one before it."""
    paths = shards.expand(cfg.data.shards)
    stems = [shards.stem(p) for p in paths]
    args = {
        "embed": tuple((group,) for group in shards.chunks(paths, cfg.embed.shards_per_task)),
        "assign": tuple((group,) for group in shards.chunks(stems, cfg.assign.shards_per_task)),
    }
    steps = steps_of(cfg)
    if "import" in steps:  # one task per group of source parts: the folder is listed here
        parts = importlib.import_module("cluster_job.import_embeddings").part_names(str(cfg.embed.source))
        args["import"] = tuple((group,) for group in shards.chunks(parts, cfg["import"].parts_per_task))
    jobs, previous = [], None
    for step in steps:
        jobs.append(Job(step, args.get(step, ((),)), previous, resources(cfg, step)))
        previous = step
    return jobs


def precheck(cfg: DictConfig) -> list[str]:
    """The checks that can be made before anything runs; each raises with a message naming the key.
    Returns what the user should see of the plan (the train stage's batch arithmetic and schedule). In a dry
    run a missing input (shards, k-means output, data sets) is a line of the plan instead."""
    steps = steps_of(cfg)
    check_made_with(cfg, steps)
    notes: list[str] = []
    unused = [f"slurm.{key}={cfg.slurm[key]}" for key in ("nodes", "gpus_per_node") if cfg.slurm[key] is not None]
    if cfg.launcher == "local" and unused:  # e.g. launcher=local recorded in RUN/config.yaml by the demo
        notes.append(f"launcher=local: this machine runs the stage and {' and '.join(unused)} is not used; "
                     "pass launcher=slurm to submit it to SLURM")
    if {"embed", "import", "kmeans", "assign"} & set(steps):
        checks = importlib.import_module("cluster_job.checks")
        notes += config.noting_missing(cfg, "cluster", lambda: checks.precheck(cfg, cfg.stage))
    if "train" in steps:
        world, ranks = train_world(cfg)
        notes += importlib.import_module("unicom_ds.train_plan").precheck(
            cfg, world, ranks, labels_expected="assign" not in steps)
    if "eval" in steps:
        notes += config.noting_missing(cfg, "eval", lambda: importlib.import_module("evaluation.run").check(cfg))
    if "detect" in steps:
        module = importlib.import_module("evaluation.detection.job")
        notes += config.noting_missing(cfg, "detect", lambda: module.check(cfg, detect_world(cfg)))
    if "finetune" in steps:
        module = importlib.import_module("evaluation.finetune.job")
        notes += config.noting_missing(cfg, "finetune", lambda: module.check(cfg, *train_world(cfg, "finetune")))
    if "quantize" in steps:
        module = importlib.import_module("evaluation.quantize.job")
        notes += config.noting_missing(cfg, "quantize", lambda: module.check(cfg))
    return notes


def check_made_with(cfg: DictConfig, steps: tuple[str, ...]) -> None:
    """Refuse a key of a step this stage does not run (kmeans.k at stage=train) whose value differs from
    RUN/config.yaml's while that step's outputs exist."""
    saved_path = Path(str(cfg.run_dir)) / "config.yaml"
    if not saved_path.is_file():
        return
    saved = OmegaConf.load(saved_path)
    for step, prefixes in MADE_WITH.items():
        out = output_dir(cfg, step)
        if step in steps or not out.is_dir() or not any(out.iterdir()):
            continue
        for key in config.flat_keys(saved):
            if key.split(".")[0] not in prefixes or ".slurm." in f".{key}.":
                continue
            was, now = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
            if was != now:
                raise config.ConfigError(
                    f"{key}={now}: {out} was made with {key}={was}, and stage={cfg.stage} does not run "
                    f"{step}; drop the key, rerun that stage, or use a new run_dir")


def steps_of(cfg: DictConfig) -> tuple[str, ...]:
    """The steps of `cfg.stage`; detect.with_eval=true adds detect after eval (stage=eval, stage=all); detect,
    finetune and quantize end with the report when RUN/report/index.html exists."""
    steps = STEPS[cfg.stage]
    if cfg.detect.with_eval and "eval" in steps:
        at = steps.index("eval") + 1
        steps = (*steps[:at], "detect", *steps[at:])
    if cfg.stage == "all" and cfg.finetune.datasets:  # stage=all ends with fine-tuning when sets are named,
        steps = (*steps[:-1], "finetune", steps[-1])  # then the report
    # A stage adding results rebuilds the run's report after it, once there is one (stage=all made it).
    if steps[-1] in ("detect", "finetune", "quantize") and (output_dir(cfg, "report") / "index.html").is_file():
        steps = (*steps, "report")
    if cfg.embed.get("source") and not cfg.embed.get("from"):  # imported features replace the embed step
        steps = tuple("import" if s == "embed" else s for s in steps)
    return steps


def detect_world(cfg: DictConfig) -> int:
    """The detect job's ranks: one process here, one task per GPU under SLURM."""
    if cfg.launcher == "local":
        return 1
    job = Job("detect", ((),), None, resources(cfg, "detect"))
    return int(job.resources["nodes"]) * job.tasks_per_node


def train_world(cfg: DictConfig, step: str = "train") -> tuple[int, str]:
    """The number of training ranks of `step` (train, finetune) and how they come about, as the launcher
    will start them."""
    if cfg.launcher == "local":
        if cfg[step].local_processes:
            return int(cfg[step].local_processes), f"{step}.local_processes"
        gpus = 0 if cfg.device == "cpu" else _visible_gpus()
        return max(1, gpus), f"{gpus} local GPU(s)" if gpus else "1 local CPU process"
    job = Job(step, ((),), None, resources(cfg, step))
    nodes = int(job.resources["nodes"])
    return nodes * job.tasks_per_node, f"{nodes} node(s) x {job.tasks_per_node} GPU(s)"


def _visible_gpus() -> int:
    import torch
    return torch.cuda.device_count()


def output_dir(cfg: DictConfig, step: str) -> Path:
    return Path(str(cfg.run_dir)) / OUTPUTS[step]


log_dir = config.log_dir
