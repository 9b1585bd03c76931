"""The quantize stage: `quantize_job(cfg)` codes a backbone's features of each retrieval set of
`quantize.datasets` at every budget of `quantize.bits` with every method of `quantize.methods`, and scores
code search (ADC) next to float search.

    python slurm/submit.py stage=quantize run_dir=RUN quantize.datasets=[sop] quantize.methods=[scq] quantize.bits=[32]

The backbone (`quantize.model`, an eval.models entry) stays frozen: its features of the test split come
from the eval stage's cache (RUN/eval/features/MODEL/SET.npy), those of the train split (or, with
quantize.train_split=test, of the test images themselves, no labels used) are cached next to them, plainly
preprocessed for PQ/OPQ/IVF-PQ and as `quantize.views` augmented views (the train stage's transform) for SCQ.
The method scq_e2e instead trains a copy of the backbone with an SCQ head, end to end on two fresh
augmentations of each train image (the backbone at lr x quantize.scq.backbone_lr_mult), and codes that
copy's features of the test split (the other methods and the float row keep the frozen backbone's).

Writes, per model, set and unit (method, M sub-quantisers x nbits): RUN/quantize/MODEL/SET/UNIT.faiss (the
gallery's codes, `faiss.read_index` loads it; SCQ's is searched with the head's projected queries, the head
in UNIT.pt, scq_e2e's with its backbone) and UNIT.json (its metrics, written last: a rerun skips it, and
refuses one made with other keys).
The metrics go into RUN/eval/results.json as `UNIT/METRIC` (`scq-8x4/mAP@1000`, `float/R@1`), with the code
size (`bytes`) and search time per query (`ms_per_query`); results.md gets the bits x method table.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from unicom_ds import config
from unicom_ds import train as trainer
from unicom_ds.arrays import normalize
from unicom_ds.atomic import atomic_path, read_json, write_json_atomic

from evaluation import retrieval_sets
from evaluation.run import ModelSpec, job_model

METHODS = ("pq", "opq", "ivfpq", "scq", "scq_e2e")
SCQ_METHODS = ("scq", "scq_e2e")  # scq: on the frozen backbone's cached features; scq_e2e: with the backbone
SCQ_SECTION = "quantize.scq"  # the SCQ head's training keys, read by unicom_ds.train's Trainer
TIMED_QUERIES = 1000  # queries timed per unit (ms_per_query) and used for the IVF-PQ nprobe sweep


def model_spec(cfg: Any) -> ModelSpec:
    return job_model(str(cfg.quantize.model), "quantize.model", cfg)


def units(cfg: Any, dim: int | None = None) -> list[tuple[str, int, int]]:
    """(method, bits, nbits) of every unit: each budget of quantize.bits with each sub-quantiser size of
    quantize.nbits that can code it (see `why_not`)."""
    return [(method, bits, nbits) for method, bits, nbits in _combinations(cfg)
            if why_not(method, bits, nbits, dim) is None]


def skipped(cfg: Any, dim: int | None = None) -> list[tuple[str, int, int, str]]:
    """(method, bits, nbits, why) of every combination of quantize.* that `units` leaves out."""
    return [(method, bits, nbits, why) for method, bits, nbits in _combinations(cfg)
            if (why := why_not(method, bits, nbits, dim)) is not None]


def _combinations(cfg: Any) -> list[tuple[str, int, int]]:
    q = cfg.quantize
    return [(str(m), int(b), int(n)) for m in q.methods for b in q.bits for n in q.nbits]


def why_not(method: str, bits: int, nbits: int, dim: int | None) -> str | None:
    """Why `method` cannot code `bits` with 2^nbits-word codebooks on `dim`-d features (None: it can)."""
    if bits % nbits:
        return f"{bits} bits is not a multiple of {nbits}-bit codebooks"
    if method not in SCQ_METHODS and dim is not None and dim % (bits // nbits):
        return f"faiss {method.upper()} needs the {bits // nbits} sub-quantisers to divide the {dim}-d feature"
    return None


def feature_dim(cfg: Any) -> int | None:
    """The embedding width of quantize.model when its name (or an MLCD folder's config.json) says it (None for a
    name this can't tell)."""
    from unicom_ds import backbone
    from unicom_ds.loading import mlcd_folder
    try:
        spec = model_spec(cfg)
        return int(mlcd_folder(spec.checkpoint)[1]["width"]) if spec.name == "mlcd" else \
            backbone.embed_dim(spec.name.removeprefix("unicom:"))
    except (ValueError, LookupError, TypeError):  # an unknown name is the model check's to report
        return None


def unit_name(method: str, bits: int, nbits: int) -> str:
    return f"{method}-{bits // nbits}x{nbits}"


def _train_paths(cfg: Any, name: str, root: Path) -> list[str]:
    if str(cfg.quantize.train_split) == "test":
        return retrieval_sets.read(name, root).paths
    ds = retrieval_sets.read(name, root)
    if ds.train is not None:  # SCQ's protocol sets: the database
        return [ds.paths[i] for i in ds.train]
    if name not in retrieval_sets.TRAIN_READERS:
        raise config.ConfigError(f"quantize.datasets: '{name}' has no train split (sets with one: "
                                 f"{', '.join(retrieval_sets.TRAIN_READERS)}); quantize.train_split=test trains "
                                 "the codes on the test images themselves (no labels used)")
    try:
        return retrieval_sets.read_train(name, root).paths
    except FileNotFoundError as e:
        raise FileNotFoundError(f"quantize.train_split=train: {e}; quantize.train_split=test trains the codes on "
                                "the test images themselves (no labels used)") from None


def check(cfg: Any) -> list[str]:
    """Everything that can fail before the job runs; returns the plan's lines."""
    cfg = config.as_config(cfg)
    q = cfg.quantize
    if not q.datasets:
        raise config.ConfigError("quantize.datasets is empty: name the retrieval sets to code, e.g. "
                                 "quantize.datasets=[sop]")
    dim = feature_dim(cfg)
    unmet = {}
    for method, bits, nbits, why in skipped(cfg, dim):
        if not any(u[:2] == (method, bits) for u in units(cfg, dim)):
            unmet.setdefault((method, bits), []).append(why)
    if unmet:  # a budget never silently disappears from the results
        raise config.ConfigError("\n".join(
            f"quantize.bits: {method} cannot make {bits}-bit codes with quantize.nbits={list(q.nbits)} "
            f"({'; '.join(whys)}); drop {bits} from quantize.bits or {method} from quantize.methods, or add a "
            "codebook size to quantize.nbits" for (method, bits), whys in unmet.items()))
    if "scq" in q.methods and int(q.views) < 2:
        raise config.ConfigError(f"quantize.views={q.views}: SCQ trains on two different views of each image (>= 2)")
    if set(SCQ_METHODS) & set(q.methods):
        from unicom_ds import train_plan
        train_plan.deepspeed_config(cfg, 1, SCQ_SECTION)  # the file, its JSON, the precision
    spec = model_spec(cfg)
    if spec.is_file and not Path(spec.checkpoint).is_file() and not (spec.label == "run" and cfg.stage == "all"):
        raise FileNotFoundError(f"quantize.model={q.model}: checkpoint {spec.checkpoint} does not exist")
    root = Path(str(cfg.eval.data_root))
    tuned = (f" (scq_e2e trains a copy end to end with its head, at lr x {float(q.scq.backbone_lr_mult):g})"
             if "scq_e2e" in q.methods else "")
    lines = [f"quantize: {q.model} frozen{tuned}; {', '.join(map(str, q.methods))} at {', '.join(map(str, q.bits))} bits "
             f"({' or '.join(map(str, q.nbits))}-bit sub-quantisers), codes trained on the {q.train_split} split"]
    lines += [f"  not run: {method} at {bits} bits with {nbits}-bit codebooks ({why})"
              for method, bits, nbits, why in skipped(cfg, dim)]
    for name in map(str, q.datasets):
        if name not in retrieval_sets.READERS:
            raise config.ConfigError(f"quantize.datasets: unknown retrieval set '{name}'; known: "
                                     f"{', '.join(retrieval_sets.READERS)}")
        test = retrieval_sets.read(name, root / name)
        retrieval_sets.check_images(test)
        paths = _train_paths(cfg, name, root / name)
        check_budgets(cfg, name, len(paths), dim)
        check_units(cfg, unit_dir(cfg, spec.label, name), dim)
        # mAP@K at the K it is scored at: at most the images a query ranks (metrics.evaluate_split)
        scored = (f"SCQ's protocol, mAP@{test.map_k}" if test.map_k else
                  f"mAP@{min(int(q.map_k), len(test.paths) - 1)}")
        lines.append(f"  {name}: {len(test.paths)} test images, codes trained on {len(paths)} images; {scored}")
    return lines


def unit_dir(cfg: Any, label: str, name: str) -> Path:
    """RUN/quantize/MODEL/SET: the units of one model on one set."""
    from evaluation.features import features_path
    return Path(str(cfg.run_dir)) / "quantize" / features_path(cfg.run_dir, label, name).parent.name / name


def unit_done(cfg: Any, out: Path, method: str, unit: str) -> dict | None:
    """A finished unit's record (UNIT.json), None while it is not; a unit made with other keys is refused, and so
    are an unfinished SCQ unit's checkpoints (UNIT/made_with.json): a rerun only continues its own work."""
    made_with = _made_with(cfg, method)
    for record in (out / f"{unit}.json", out / unit / "made_with.json"):
        if record.is_file():
            config.check_same(read_json(record)["made_with"], made_with, record)
    marker = out / f"{unit}.json"
    return read_json(marker) if marker.is_file() else None


def check_units(cfg: Any, out: Path, dim: int | None) -> None:
    """The launcher's check that every unit already in `out` was made with this command's keys."""
    for method, bits, nbits in units(cfg, dim):
        unit_done(cfg, out, method, unit_name(method, bits, nbits))


def check_budgets(cfg: Any, name: str, images: int, dim: int | None) -> None:
    """Every unit's codebooks (and IVF-PQ's lists, OPQ's rotation) can be trained on the set's `images` training
    images."""
    opq = ("opq", *(SCQ_METHODS if str(cfg.quantize.scq.init) == "opq" else ()))
    for method, bits, nbits in units(cfg, dim):
        if images < 2 ** nbits:
            raise config.ConfigError(f"quantize.nbits={nbits}: {name} has {images:,} training images for the "
                                     f"{2 ** nbits:,} codewords per sub-space of {unit_name(method, bits, nbits)}; "
                                     f"drop {nbits} from quantize.nbits")
        if method in opq and dim is not None and images < dim:  # faiss' OPQ training aborts the process then
            raise config.ConfigError(f"quantize.methods: {unit_name(method, bits, nbits)} trains OPQ's {dim} x {dim} "
                                     f"rotation, which needs at least {dim} training images; {name} has {images:,}"
                                     + ("; or quantize.scq.init=random" if method in SCQ_METHODS else ""))
    nlist = cfg.quantize.ivf.nlist
    if "ivfpq" in cfg.quantize.methods and nlist is not None and int(nlist) > images:
        raise config.ConfigError(f"quantize.ivf.nlist={nlist}: more lists than the {images:,} training images of "
                                 f"{name}; lower it, or null for the default")


class _Features:
    """The frozen backbone's features, cached through evaluation.features (one process)."""

    def __init__(self, cfg: DictConfig, spec: ModelSpec):
        from unicom_ds.loading import load
        self.cfg, self.spec = cfg, spec
        self.model, self.preprocess = load(spec.name, spec.checkpoint, device="cpu")
        size = getattr(self.model, "image_size", 224)  # the model's input size (open_clip's is a pair)
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    def __call__(self, key: str, paths: list[str], transform=None) -> np.ndarray:
        from evaluation.features import ImageFiles, cached_extract, features_path
        e = self.cfg.eval
        return cached_extract(features_path(self.cfg.run_dir, self.spec.label, key), self.model,
                              ImageFiles(paths, transform or self.preprocess), int(e.batch_size), int(e.workers),
                              str(self.cfg.device), progress_mode=str(self.cfg.progress),
                              desc=f"quantize {self.spec.label} on {key}")

    def pairs(self, method: str, key: str, paths: list[str]):
        """SCQ's training data: the images themselves for scq_e2e, else the cached features of quantize.views
        augmented views (view v drawn with torch seeded by (seed, v): a re-extraction draws the same)."""
        from evaluation.quantize.pairs import ImagePairs, ViewPairs
        from unicom_ds.train_data import train_transform
        if method == "scq_e2e":
            return ImagePairs(paths, train_transform(self.image_size))
        out = []
        for v in range(int(self.cfg.quantize.views)):
            torch.manual_seed(int(self.cfg.seed) * 1000 + v)
            out.append(normalize(self(f"{key}.view{v}", paths, train_transform(self.image_size))))
        return ViewPairs(np.stack(out))

    def fresh_model(self) -> torch.nn.Module:
        """Another copy of the backbone as loaded, for SCQ to train end to end."""
        from unicom_ds.loading import load
        return load(self.spec.name, self.spec.checkpoint, device="cpu")[0]

    def tuned(self, model: torch.nn.Module, paths: list[str], desc: str) -> np.ndarray:
        """Features of `paths` through an end-to-end trained copy of the backbone (not cached: each unit has its own)."""
        from evaluation.features import ImageFiles, extract
        e = self.cfg.eval
        return extract(model, ImageFiles(paths, self.preprocess), int(e.batch_size), int(e.workers),
                       str(self.cfg.device), progress_mode=str(self.cfg.progress), desc=desc)


# quantize.scq keys that steer the training machinery, not the head it trains: a rerun may change them.
SCQ_RUN_KEYS = ("resume", "trust_checkpoint", "log_every", "ckpt_every_steps", "keep_checkpoints", "max_bad_steps",
                "workers")


def _made_with(cfg: DictConfig, method: str) -> dict:
    keys = ["quantize.model", "quantize.train_split", "quantize.map_k", "seed"]
    keys += {"scq": ["quantize.views", "quantize.scq"], "scq_e2e": ["quantize.scq"],
             "ivfpq": ["quantize.ivf"]}.get(method, [])
    made = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, k)) else v for k in keys}
    if "quantize.scq" in made:
        made["quantize.scq"] = {k: v for k, v in made["quantize.scq"].items() if k not in SCQ_RUN_KEYS}
        if method == "scq":  # the backbone stays frozen
            del made["quantize.scq"]["backbone_lr_mult"]
    return made


def _timed(index, queries: np.ndarray, k: int) -> float:
    from evaluation.quantize.baselines import ms_per_query
    return ms_per_query(index, queries[:TIMED_QUERIES], min(k, index.ntotal))


def train_scq(cfg: DictConfig, data, books: int, nbits: int, folder: Path, train: np.ndarray,
              backbone: torch.nn.Module | None = None) -> tuple[torch.nn.Module, dict]:
    """The SCQ head trained through the train stage's Trainer (DeepSpeed on quantize.scq.deepspeed_config,
    checkpoints in FOLDER/ckpt resumed by a rerun, loss terms in TensorBoard), one process; it exports the
    head to FOLDER.pt. `data`: pairs of views (evaluation.quantize.pairs); `train`: the plain features of
    the same images. It starts from OPQ learnt on `train` when quantize.scq.init=opq, else from a random
    MLP. With a `backbone` (images in `data`), the backbone trains too and FOLDER.pt holds it as well.
    Returns (the head, the Trainer's summary)."""
    from evaluation.quantize import baselines, scq

    # A unit's checkpoints belong to the keys they were made with: a rerun with others refuses them.
    record = folder / "made_with.json"
    made_with = _made_with(cfg, "scq" if backbone is None else "scq_e2e")
    if record.is_file():
        config.check_same(read_json(record)["made_with"], made_with, folder)
    else:
        write_json_atomic(record, {"made_with": made_with})
    # One process, as the quantize job runs (launcher=local, or a single SLURM task).
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(trainer.free_port()))
    c = cfg.quantize.scq
    # The contrastive losses want full batches: at most one batch of all the images.
    cfg = OmegaConf.merge(cfg, {"quantize": {"scq": {"batch_size": min(int(c.batch_size), len(train))}}})
    torch.manual_seed(int(cfg.seed))
    if str(c.init) == "opq":
        head = scq.from_opq(baselines.train("opq", train, books * nbits, nbits), float(c.tau_sq))
    else:
        head = scq.SCQHead(train.shape[1], books, 2 ** nbits, int(c.sub_dim), int(c.hidden), float(c.tau_sq))
    objective = scq.Objective(head, cfg.quantize.scq, folder.with_suffix(".pt"), train.shape[1], backbone,
                              str(cfg.quantize.model))
    rel = folder.relative_to(Path(str(cfg.run_dir)))
    summary = trainer.train(cfg, data=data, out=str(rel), section=SCQ_SECTION, objective=objective)
    return scq.Objective.load(objective.path), summary


def run_unit(cfg: DictConfig, method: str, bits: int, nbits: int, test: np.ndarray, train: np.ndarray,
             pairs, feats: _Features, ds, out: Path, log) -> dict:
    """Train one quantiser, code the test set, score it; writes UNIT.faiss (and UNIT.pt for SCQ). `pairs`:
    SCQ's data (evaluation.quantize.pairs); scq_e2e codes its tuned backbone's features."""
    import faiss
    from evaluation import metrics
    from evaluation.quantize import baselines, scq

    q, name = cfg.quantize, unit_name(method, bits, nbits)
    if baselines.few_points(len(train), nbits):
        log(f"{name}: {len(train)} training vectors for 2^{nbits} centroids (faiss suggests >= {39 * 2 ** nbits})")
    start = time.monotonic()
    extra: dict = {}
    if method in SCQ_METHODS:
        e2e = method == "scq_e2e"
        head, _ = train_scq(cfg, pairs, bits // nbits, nbits, out / name, train, feats.fresh_model() if e2e else None)
        if e2e:  # a fresh copy: the engine's may have been cast to bf16
            tuned = scq.Objective.load_backbone(out / f"{name}.pt", feats.fresh_model())
            test = normalize(feats.tuned(tuned, ds.paths, f"{ds.name} through {name}'s backbone"))
        search = scq.searcher(head, str(q.scq.adc))
        queries = scq.embed(head, test)  # the test set is both the gallery (coded) and the queries
        index = scq.to_faiss(head, scq.hard_codes(head, queries))
    else:
        nlist = int(q.ivf.nlist or baselines.default_nlist(len(train))) if method == "ivfpq" else 0
        trained = baselines.train(method, train, bits, nbits, nlist)
        if method == "ivfpq":
            faiss.extract_index_ivf(trained).nprobe = int(q.ivf.nprobe)
        search = baselines.searcher(trained)
        index, queries = baselines.filled(trained, test), test
        if method == "ivfpq":
            _, exact = metrics.knn(test[:TIMED_QUERIES], test, 10, str(cfg.device))
            sweep = baselines.nprobe_sweep(index, test[:TIMED_QUERIES], exact, list(q.ivf.sweep))
            faiss.extract_index_ivf(index).nprobe = int(q.ivf.nprobe)
            extra = {f"nprobe{p}/{k}": v for p, r in sweep.items() for k, v in
                     (("recall@10_vs_float", r["recall"]), ("ms_per_query", r["ms_per_query"]))}
            extra["nlist"] = nlist
    result = metrics.evaluate(test, ds, str(cfg.device), search=search, map_k=ds.map_k or int(q.map_k))
    result.update(extra)
    result["bytes"] = baselines.code_bytes(index)
    result["ms_per_query"] = _timed(index, queries, 100)
    if method in SCQ_METHODS and str(q.scq.adc) == "plain":  # results.md names the ranking its row used
        result["plain_adc"] = 1.0
    with atomic_path(out / f"{name}.faiss") as tmp:
        faiss.write_index(index, str(tmp))
    log(f"{name}: " + ", ".join(shown(k, v) for k, v in result.items() if "/" not in k and k != "plain_adc")
        + f" ({time.monotonic() - start:.0f}s)")
    return result


def shown(key: str, value: float) -> str:
    """A unit's metric as results.md shows it: retrieval scores in percent, bytes, milliseconds."""
    if key == "bytes":
        return f"{int(value):,} bytes"
    if key == "ms_per_query":
        return f"{value:.3g} ms per query"
    if key == "nlist":
        return f"{int(value):,} lists"
    return f"{key} {100 * value:.1f}%"


def quantize_set(cfg: DictConfig, feats: _Features, name: str, log) -> dict:
    """Every unit on set `name`; returns its metrics {UNIT/METRIC: value} (float search included)."""
    import faiss
    from evaluation import metrics

    q = cfg.quantize
    root = Path(str(cfg.eval.data_root)) / name
    ds = retrieval_sets.read(name, root)
    test = normalize(feats(name, ds.paths))
    train_paths = _train_paths(cfg, name, root)
    key = f"{name}.{q.train_split}"
    if str(q.train_split) == "test":
        train = test
    elif ds.train is not None:  # SCQ's protocol sets train on their database, whose features are test's rows
        train = test[ds.train]
    else:
        train = normalize(feats(key, train_paths))
    map_k = ds.map_k or int(q.map_k)  # SCQ's protocol sets are scored at their own K
    pairs: dict = {}
    out = unit_dir(cfg, feats.spec.label, name)
    out.mkdir(parents=True, exist_ok=True)
    found: dict = {}
    flat = faiss.IndexFlatIP(test.shape[1])
    flat.add(test)
    base = metrics.evaluate(test, ds, str(cfg.device), map_k=map_k)
    base.update(bytes=4 * test.shape[1], ms_per_query=_timed(flat, test, 100))
    found.update({f"float/{k}": v for k, v in base.items()})
    for method, bits, nbits, why in skipped(cfg, test.shape[1]):
        log(f"{name}: {method} at {bits} bits with {nbits}-bit codebooks not run: {why}")
    for method, bits, nbits in units(cfg, test.shape[1]):
        unit = unit_name(method, bits, nbits)
        marker, made_with = out / f"{unit}.json", _made_with(cfg, method)
        done = unit_done(cfg, out, method, unit)
        if done is not None:
            result = done["metrics"]
            log(f"{unit}: done before ({marker})")
        else:
            if method in SCQ_METHODS and method not in pairs:
                pairs[method] = feats.pairs(method, f"{key}.aug", train_paths)
            result = run_unit(cfg, method, bits, nbits, test, train, pairs.get(method), feats, ds, out, log)
            write_json_atomic(marker, {"made_with": made_with, "metrics": result})
        found.update({f"{unit}/{k}": v for k, v in result.items()})
    return found


def quantize_job(cfg: Any) -> dict:
    """Every set of quantize.datasets; merges the metrics into RUN/eval (results.json, results.md)."""
    from evaluation import results

    cfg = config.as_config(cfg)
    check(cfg)
    spec = model_spec(cfg)
    feats = _Features(cfg, spec)

    def log(text: str) -> None:
        print(f"[quantize] {text}", flush=True)

    found = {spec.label: {name: quantize_set(cfg, feats, name, log) for name in map(str, cfg.quantize.datasets)}}
    merged, text = results.write_all(cfg.run_dir, found, found)
    print(text, flush=True)
    return merged


class QuantizeJob(trainer.TrainJob):
    """The SLURM job, one task (SCQ trains in one process): requeued at the time limit, the requeued job skips
    the finished units and resumes an unfinished SCQ unit from its last checkpoint (quantize.scq.resume=latest)."""

    section = SCQ_SECTION

    def __call__(self, cfg: dict) -> dict:
        return quantize_job(cfg)
