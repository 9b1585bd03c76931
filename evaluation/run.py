"""The eval stage: `eval_job(cfg)` (what `slurm/submit.py stage=eval` runs), `check(cfg)` (its precheck).

`python -m evaluation.run key=value ...` runs it here in one process.

Every model of `eval.models` is evaluated on every set of `eval.datasets`, each found in
`<eval.data_root>/<name>` (folder names: `evaluation.retrieval_sets.READERS` and
`evaluation.probe_sets.SETS`). Under SLURM the job has one task per GPU: feature extraction is
split over the tasks (a torch.distributed gloo group, used only for barriers), then rank 0 scores
and writes. Each (model, data set) result is kept in RUN/eval/units/ (written last, with the config
it was made with), so a rerun skips finished units and refuses to mix configs; a model whose
checkpoint file changed since its first evaluation is refused too.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from unicom_ds import config as config_mod
from unicom_ds.atomic import read_json, write_json_atomic

from evaluation import probe_sets, retrieval_sets

KINDS = ("run", "unicom", "openclip", "ckpt", "mlcd")
# The config keys a unit's numbers depend on (besides the model file): a rerun must match them.
UNIT_KEYS = {"retrieval": ("eval.dims", "eval.dims_renormalize", "eval.gldv2_cosine"),
             "probe": ("eval.probe.max_iter", "eval.probe.val_fraction", "eval.probe.fixed_c", "seed")}


@dataclass(frozen=True)
class ModelSpec:
    label: str                 # row name in results.json / the tables / the feature cache
    name: str                  # what unicom_ds.load takes
    checkpoint: str | None     # a file, an open_clip tag, an MLCD folder (mlcd:FOLDER), or None
    is_file: bool


def parse_model(entry: str, run_dir: str | os.PathLike, run_model: str) -> ModelSpec:
    """An `eval.models` entry: run | unicom:NAME@FILE | openclip:NAME@TAG_OR_FILE | ckpt:NAME@FILE | mlcd:FOLDER.
    `run` is RUN/train/backbone.pt under the run's model name `run_model` (cfg.model): `load` tells a
    release-format Unicom export from an open_clip one by what the file holds, and needs the name
    for the former. `mlcd:FOLDER` is a folder in transformers' MLCDVisionModel format (its config.json
    names the architecture), labelled `mlcd:<folder name>`."""
    if entry == "run":
        return ModelSpec("run", run_model, str(Path(run_dir) / "train" / "backbone.pt"), True)
    kind, _, rest = entry.partition(":")
    if kind == "mlcd" and rest:
        return ModelSpec(f"mlcd:{Path(rest).name}", "mlcd", rest, False)
    name, _, source = rest.partition("@")
    if kind not in KINDS[1:] or not name or not source:
        raise config_mod.ConfigError(
            f"eval.models entry '{entry}': expected run, unicom:NAME@FILE, openclip:NAME@TAG_OR_FILE, "
            "ckpt:NAME@FILE or mlcd:FOLDER")
    is_file = kind != "openclip" or Path(source).suffix != "" or os.sep in source
    if kind == "unicom":
        return ModelSpec(f"unicom:{name}", f"unicom:{name}", source, True)
    shown = Path(source).stem if is_file else source
    return ModelSpec(f"{kind}:{name}@{shown}", f"{kind}:{name}", source, is_file)


def dataset_kind(name: str) -> str:
    if name in retrieval_sets.READERS:
        return "retrieval"
    if name in probe_sets.SETS:
        return "probe"
    raise config_mod.ConfigError(
        f"eval.datasets: unknown data set '{name}'; retrieval: {', '.join(retrieval_sets.READERS)}; "
        f"linear probe: {', '.join(probe_sets.SETS)}")


def check(cfg: Any) -> None:
    """Everything that can fail before any work: model entries and files, data set folders, list files
    and the images they name (listed, not decoded)."""
    cfg = config_mod.as_config(cfg)
    fraction = float(cfg.eval.probe.val_fraction)
    if not 0.0 < fraction < 1.0:
        raise config_mod.ConfigError(f"eval.probe.val_fraction={fraction}: must be in (0, 1)")
    for entry in cfg.eval.models:
        spec = parse_model(str(entry), cfg.run_dir, str(cfg.model))
        _check_model_name(spec)
        # With stage=all the train stage has not written RUN/train/backbone.pt yet.
        if spec.is_file and not Path(spec.checkpoint).is_file() and not (entry == "run" and cfg.stage == "all"):
            raise FileNotFoundError(f"eval.models '{entry}': checkpoint {spec.checkpoint} does not exist")
        if spec.name == "mlcd":
            check_mlcd_folder(f"eval.models '{entry}'", spec.checkpoint)
    for name in cfg.eval.datasets:
        kind = dataset_kind(str(name))
        root = Path(str(cfg.eval.data_root)) / str(name)
        if not root.is_dir():
            raise FileNotFoundError(f"eval.datasets '{name}': expected its folder {root} "
                                    f"(eval.data_root={cfg.eval.data_root})")
        # Every image a set's lists name (or its release holds) must be there: a set scored on
        # fewer images would give numbers that look valid.
        if kind == "probe":
            probe = probe_sets.load(str(name), str(cfg.eval.data_root), seed=int(cfg.seed))
            probe_sets.check_images(probe, str(cfg.eval.data_root))
        else:
            retrieval_sets.check_images(retrieval_sets.read(str(name), root))


def _check_model_name(spec: ModelSpec) -> None:
    kind, _, name = spec.name.partition(":")
    if kind == "unicom":
        from unicom_ds import unicom_vit
        if unicom_vit.canonical_name(name) not in unicom_vit.CONFIGS:
            raise config_mod.ConfigError(f"eval.models: unknown Unicom model '{name}'; "
                                         f"known: {', '.join(unicom_vit.CONFIGS)}")
    elif kind in ("openclip", "ckpt"):
        from unicom_ds.model_configs import known_models
        if name not in known_models():
            raise config_mod.ConfigError(f"eval.models: '{name}' is not an open_clip model name")


def check_mlcd_folder(what: str, folder: str) -> None:
    """An MLCD folder's config.json is readable and of a format `load` reads, and its weights are there (not
    read here)."""
    from unicom_ds.loading import mlcd_folder
    try:
        mlcd_folder(folder)
    except (OSError, ValueError) as e:
        raise type(e)(f"{what}: {e}") from None


def model_title(spec: ModelSpec) -> str | None:
    """How results tables name `spec`'s model where its label does not say what it is: an MLCD model by family,
    size and format ("MLCD ViT-L/14-336 (CLIP format)", "MLCD ViT-bigG/14-448 (RoPE2D)"; "MLCD ViT-B/32-224
    (trained here)" for a train-stage export); None for the others, named by their labels."""
    from unicom_ds import mlcd_vit
    if spec.name == "mlcd":
        from unicom_ds.loading import mlcd_folder_title
        return mlcd_folder_title(spec.checkpoint)
    arch = spec.name.removeprefix("ckpt:")
    return mlcd_vit.title(mlcd_vit.config(arch), "trained here") if arch in mlcd_vit.CONFIGS else None


def job_model(entry: str, key: str, cfg: Any) -> ModelSpec:
    """The backbone of a job that trains or rebuilds it (detect.model, finetune.init, quantize.model: `key`),
    an eval.models entry, MLCD models included; errors name `key`. An MLCD folder must be there with a
    config.json that `load` reads and its weight files (not read). A weights file that is there is read
    (tensors and plain values only, mmap: no memory), so a planted or damaged one is refused at submission;
    a missing one is its caller's to report."""
    try:
        spec = parse_model(entry, cfg.run_dir, str(cfg.model))
    except config_mod.ConfigError as e:
        raise config_mod.ConfigError(str(e).replace("eval.models entry", key)) from None
    if spec.name == "mlcd":
        check_mlcd_folder(f"{key}={entry}", spec.checkpoint)
    elif spec.is_file and Path(spec.checkpoint).is_file():
        from unicom_ds.loading import read_weights
        shown = f"{key}={entry}" if entry.endswith(spec.checkpoint) else f"{key}={entry} ({spec.checkpoint})"
        read_weights(spec.checkpoint, shown)
    return spec


def task_rank_world() -> tuple[int, int]:
    """(global rank, number of tasks) of this task in a submitit SLURM job; (0, 1) elsewhere."""
    import submitit
    try:
        env = submitit.JobEnvironment()
    except RuntimeError:  # not inside a submitit job
        return 0, 1
    return env.global_rank, env.num_tasks


def _join_tasks(world: int) -> None:
    import torch.distributed as dist
    if world > 1 and not dist.is_initialized():
        from submitit.helpers import TorchDistributedEnvironment
        # One GPU per task; gloo suffices since the group only carries barriers.
        TorchDistributedEnvironment().export(set_cuda_visible_devices=True, overwrite=True)
        dist.init_process_group("gloo")


def _checkpoint_identity(entry: str, spec: ModelSpec) -> dict:
    # The entry, not the resolved path: a run directory that is moved or copied stays valid.
    if spec.name == "mlcd":  # every file the model is read from: config.json and the weight file(s)
        from unicom_ds.state_dicts import CONFIG_FILE, weight_files
        files = [Path(spec.checkpoint) / CONFIG_FILE, *weight_files(spec.checkpoint)]
        stats = [p.stat() for p in files]
        return {"model": entry, "bytes": sum(st.st_size for st in stats), "mtime": max(int(st.st_mtime) for st in stats)}
    if not spec.is_file:
        return {"model": entry}
    st = Path(spec.checkpoint).stat()
    return {"model": entry, "bytes": st.st_size, "mtime": int(st.st_mtime)}


def unit_path(run_dir, label: str, dataset: str) -> Path:
    """RUN/eval/units/MODEL/DATASET.json: one finished (model, data set) result."""
    from evaluation.features import features_path
    cache = features_path(run_dir, label, dataset)  # the same file-name-safe model and set names
    return Path(run_dir) / "eval" / "units" / cache.parent.name / f"{cache.stem}.json"


def check_model_files(run_dir, entry: str, spec: ModelSpec) -> None:
    """Refuse to reuse a model's cached features and results once its checkpoint file has changed
    (e.g. RUN/train/backbone.pt re-exported); the first evaluation records the file."""
    from evaluation.features import features_path
    record = unit_path(run_dir, spec.label, "model")
    current = _checkpoint_identity(entry, spec)
    if record.is_file():
        where = f"{record.parent} and {features_path(run_dir, spec.label, 'model').parent}"
        config_mod.check_same(read_json(record), current, where)
    else:
        write_json_atomic(record, current)


def _finished(path: Path, made_with: dict) -> dict | None:
    """The metrics of a finished unit, None if not done; a unit made with another config is refused."""
    if not path.is_file():
        return None
    unit = read_json(path)
    config_mod.check_same(unit["made_with"], made_with, path)
    return unit["metrics"]


class Evaluator:
    """One task's share of the eval job; rank 0 also scores."""

    def __init__(self, cfg, rank: int, world: int, models: list[tuple[str, ModelSpec]] | None = None,
                 preprocess: dict[str, Callable] | None = None):
        """`models`: (entry, spec) pairs to evaluate instead of eval.models (fine-tuning names its own);
        `preprocess`: {model label: image transform} in place of the one `load` returns."""
        self.cfg, self.rank, self.world = cfg, rank, world
        self.preprocess = preprocess or {}
        self.models = models if models is not None else [
            (str(entry), parse_model(str(entry), cfg.run_dir, str(cfg.model))) for entry in cfg.eval.models]
        self.run_dir = Path(str(cfg.run_dir))
        self.data_root = Path(str(cfg.eval.data_root))
        self.mode = str(cfg.progress)

    def features(self, label: str, key: str, model, dataset):
        from evaluation.features import cached_extract, features_path
        e = self.cfg.eval
        return cached_extract(features_path(self.run_dir, label, key), model, dataset, int(e.batch_size),
                              int(e.workers), str(self.cfg.device), self.rank, self.world, self.mode,
                              desc=f"eval {label} on {key.replace('.', ' ')}")

    def retrieval(self, label: str, name: str, model, preprocess) -> dict | None:
        from evaluation import metrics
        from evaluation.features import ImageFiles
        from evaluation.results import cosine_key, dim_key
        ds = retrieval_sets.read(name, self.data_root / name)
        feats = self.features(label, name, model, ImageFiles(ds.paths, preprocess))
        if self.rank != 0:
            return None
        e, device = self.cfg.eval, str(self.cfg.device)
        out = metrics.evaluate(feats, ds, device)
        if bool(e.gldv2_cosine) and any(s.relevant is not None for s in ds.splits.values()):
            out.update({cosine_key(k): v for k, v in metrics.evaluate(feats, ds, device, cosine=True).items()})
        dims = sorted({int(d) for d in e.dims} | {feats.shape[1]}, reverse=True)
        for renormalize in (False, True) if bool(e.dims_renormalize) else (False,):
            for dim, values in metrics.evaluate_dims(feats, ds, dims, device, renormalize).items():
                out.update({dim_key(dim, k, renormalize): v for k, v in values.items()})
        return out

    def probe(self, label: str, name: str, model, preprocess) -> dict | None:
        from evaluation.linear_probe import linear_probe
        ps = probe_sets.load(name, self.data_root, preprocess, seed=int(self.cfg.seed))
        parts = {s: getattr(ps, s) for s in ("train", "val", "test") if getattr(ps, s) is not None}
        feats = {s: self.features(label, f"{name}.{s}", model, split) for s, split in parts.items()}
        if self.rank != 0:
            return None
        p = self.cfg.eval.probe
        val = parts.get("val")
        return linear_probe(feats["train"], parts["train"].labels, feats["test"], parts["test"].labels,
                            feats.get("val"), None if val is None else val.labels, metric=ps.metric,
                            max_iter=int(p.max_iter), val_fraction=float(p.val_fraction), seed=int(self.cfg.seed),
                            fixed_c=None if p.fixed_c is None else float(p.fixed_c))

    def run(self) -> tuple[dict, dict]:
        """(all units' metrics, the units computed now), each {model: {dataset: metrics}} on rank 0
        and {} elsewhere."""
        from unicom_ds.loading import load
        found: dict = {}
        computed: dict = {}
        for entry, spec in self.models:
            if self.rank == 0:
                check_model_files(self.run_dir, entry, spec)
            loaded = None
            for name in self.cfg.eval.datasets:
                name = str(name)
                path = unit_path(self.run_dir, spec.label, name)
                kind = dataset_kind(name)
                settings = config_mod.select(self.cfg, UNIT_KEYS[kind])
                metrics = _finished(path, settings)
                if metrics is None:
                    if loaded is None:  # load a model only when one of its units is still to do
                        model, preprocess = load(spec.name, spec.checkpoint, device="cpu")
                        loaded = model, self.preprocess.get(spec.label, preprocess)
                    score = self.retrieval if kind == "retrieval" else self.probe
                    metrics = score(spec.label, name, *loaded)
                    if self.rank == 0:
                        write_json_atomic(path, {"made_with": settings, "metrics": metrics})
                        computed.setdefault(spec.label, {})[name] = metrics
                if self.rank == 0:
                    found.setdefault(spec.label, {})[name] = metrics
        return found, computed


def eval_job(cfg: Any) -> dict | None:
    """Evaluate `eval.models` on `eval.datasets`; rank 0 writes RUN/eval and returns all results."""
    from evaluation import results

    start = time.monotonic()
    cfg = config_mod.as_config(cfg)
    check(cfg)
    rank, world = task_rank_world()
    _join_tasks(world)
    evaluator = Evaluator(cfg, rank, world)
    found, computed = evaluator.run()
    if rank != 0:
        return None
    titles = {spec.label: title for _, spec in evaluator.models if (title := model_title(spec))}
    merged, text = results.write_all(cfg.run_dir, found, computed, titles)
    out = Path(str(cfg.run_dir)) / "eval"
    units = len(cfg.eval.models) * len(cfg.eval.datasets)
    computed = sum(len(sets) for sets in computed.values())
    print(text, flush=True)
    print(f"eval: {len(cfg.eval.models)} model(s) x {len(cfg.eval.datasets)} data set(s), {computed} of "
          f"{units} computed ({units - computed} already done), {world} task(s), "
          f"{time.monotonic() - start:.0f}s; results in {out}/results.json, tables in {out}/results.md, "
          f"plot {out}/recall_vs_dim.png, TensorBoard {Path(str(cfg.run_dir)) / 'tensorboard' / 'eval'}",
          flush=True)
    return merged


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config_mod.resolve(["stage=eval", *argv])
        check(cfg)
        config_mod.save(cfg)
    except (config_mod.ConfigError, ValueError, LookupError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    eval_job(config_mod.select(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
