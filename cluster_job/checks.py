"""Checks the launcher makes before submitting a cluster-stage job; each error names the key at fault.

k against the number of samples, before anything is embedded: counted only where it is cheap, i.e.
from img2dataset's `S_stats.json` ("successes") next to every shard, or, for at most
COUNT_TAR_LIMIT shards, from the tar headers (no image is read). Otherwise the check waits for the
kmeans stage, which counts the embedded rows exactly.

Outputs already in the run directory that another config made (embeddings of another CLIP, k-means
of another k, labels of other centroids) are refused here, before RUN/config.yaml is written, with
the one output that conflicts and the cheapest way on (see features.reuse_hint).
"""
from __future__ import annotations

import difflib
import sys
import tarfile
from pathlib import Path

from cluster_job import assign, features, kmeans
from cluster_job.wds_reader import IMAGE_EXTS, stats_path
from unicom_ds import model_configs
from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, MissingInput, as_config
from unicom_ds.shards import existing, stem

COUNT_TAR_LIMIT = 16


def check_model(model: str, pretrained: str) -> None:
    known = model_configs.known_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=3)
        raise ConfigError(f"clip.model={model}: not an open_clip model"
                          + (f"; did you mean {', '.join(close)}?" if close else ""))
    if pretrained == "random" or Path(pretrained).is_file():
        return
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ConfigError(
            f"clip.pretrained={pretrained}: neither a local file nor an open_clip tag of {model} "
            f"(tags: {', '.join(tags) or 'none'}; or 'random' for a test run)")


def tar_keys(path: str) -> set[str]:
    """The keys of the samples with an image in one tar, from its headers only (members' data is skipped
    by seeking)."""
    keys = set()
    with tarfile.open(path) as tar:
        for m in tar:
            base, _, ext = Path(m.name).name.partition(".")
            if ext.lower() in IMAGE_EXTS:
                keys.add(str(Path(m.name).parent / base))
    return keys


def count_tar_samples(path: str) -> int:
    """Samples with an image in one tar, from its headers only."""
    return len(tar_keys(path))


def count_samples(paths: list[str]) -> int | None:
    """Samples in the input shards when cheap to know (see module docstring), else None."""
    stats = [stats_path(p) for p in paths]
    if all(s.is_file() for s in stats):
        return sum(int(read_json(s)["successes"]) for s in stats)
    if len(paths) <= COUNT_TAR_LIMIT:
        try:
            return sum(count_tar_samples(p) for p in paths)
        except (tarfile.TarError, OSError):  # a damaged tar is the embed stage's to report
            return None
    return None


def check_k(k: int, points: int, what: str) -> None:
    if k > points:
        raise ConfigError(f"kmeans.k={k} is larger than the {points} {what}; lower kmeans.k")


STEPS = {"embed": ("embed",), "kmeans": ("kmeans",), "assign": ("assign",),
         "cluster": ("embed", "kmeans", "assign"), "all": ("embed", "kmeans", "assign")}


def check_embedded(cfg, paths: list[str]) -> None:
    """Shards already embedded in this run must have been made by this CLIP from these files."""
    from cluster_job.embed import finished  # torch and open_clip: only when embed is submitted

    for path in paths:
        finished(cfg, path)


def check_kmeans(cfg) -> bool:
    """True when RUN/kmeans holds this config's result; refuses another config's, and labels without it."""
    if kmeans.check_done(cfg) is not None:
        return True
    claimed = assign.labels_dir(cfg.run_dir) / "centroids.json"
    if claimed.is_file():
        raise ConfigError(
            f"{claimed}: {assign.labels_dir(cfg.run_dir)} holds labels of centroids that are gone "
            f"({kmeans.kmeans_dir(cfg.run_dir)}/summary.json is missing); new centroids would not match them: "
            f"delete {assign.labels_dir(cfg.run_dir)} to label again, or " + features.reuse_hint(cfg))
    return False


def precheck(cfg, stage: str) -> list[str]:
    """Raise ConfigError/FileNotFoundError before submitting `stage` (embed, kmeans, assign, cluster, all);
    returns the plan's notes (assign.nlist / nprobe the search clamps)."""
    cfg = as_config(cfg)
    steps = STEPS.get(stage, ())
    if not steps:
        return []
    k = int(cfg.kmeans.k)
    src = features.source_run(cfg)
    reuse = src != str(cfg.run_dir)
    if "kmeans" in steps:
        kmeans.init_method(str(cfg.kmeans.init))
    if "embed" in steps:
        try:
            paths = existing(str(cfg.data.shards))
        except FileNotFoundError as exn:
            raise MissingInput(str(exn)) from None
        except ValueError as exn:
            raise ConfigError(str(exn)) from None
        check_model(str(cfg.clip.model), str(cfg.clip.pretrained))
        if reuse:
            features.check_reuse(cfg, [stem(p) for p in paths])
        elif cfg.embed.get("source"):  # the import replaces the embed step (slurm.launch.plan)
            from cluster_job import import_embeddings

            import_embeddings.check_source(cfg)
        else:
            check_embedded(cfg, paths)
        if "kmeans" in steps and not reuse:
            n = count_samples(paths)
            if n is None:
                print(f"precheck: {len(paths)} shards without _stats.json: kmeans.k is checked against the "
                      "embedded rows when the kmeans job starts", file=sys.stderr)
            else:
                check_k(k, n, f"samples in data.shards ({len(paths)} shards)")
    if stage == "kmeans" or ("kmeans" in steps and reuse):
        if reuse and "embed" not in steps:
            features.check_reuse(cfg, [])
        stems = features.embedded_stems(src)
        if not stems:
            raise MissingInput(f"stage=kmeans: no embedded shard in {features.embed_dir(src)} "
                              "(run stage=embed first, or check run_dir)")
        check_k(k, int(features.row_counts(src, stems, features.embed_identity(cfg)).sum()),
                f"embedded rows in {features.embed_dir(src)}")
    centroids = check_kmeans(cfg) if "kmeans" in steps else False
    if stage == "assign":
        summary = kmeans.kmeans_dir(cfg.run_dir) / "summary.json"
        if not summary.is_file():
            raise ConfigError(f"stage=assign: {summary} missing (run stage=kmeans first, or check run_dir)")
        centroids = True
    if "assign" not in steps:
        return []
    # The search against k: the recorded k-means' when it is there, else the one this stage will make.
    k = int(read_json(kmeans.kmeans_dir(cfg.run_dir) / "summary.json")["k"]) if centroids else k
    settings = assign.search_settings(cfg, k)
    if centroids:
        assign.check_labels(cfg, assign.fingerprint(cfg.run_dir))
        assign.check_search(cfg, settings)
    return assign.clamped(cfg, settings, k)
