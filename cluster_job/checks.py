"""Checks the launcher makes before submitting a cluster-stage job; each error names the key at fault.

k against the number of samples, before anything is embedded: counted only where it is cheap, i.e.
from img2dataset's `S_stats.json` ("successes") next to every shard, or, for at most
COUNT_TAR_LIMIT shards, from the tar headers (no image is read). Otherwise the check waits for the
kmeans stage, which counts the embedded rows exactly.
"""
from __future__ import annotations

import difflib
import sys
import tarfile
from pathlib import Path

from cluster_job import features
from cluster_job.kmeans import init_method
from cluster_job.wds_reader import IMAGE_EXTS
from unicom_ds import model_configs
from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, as_config, select
from unicom_ds.shards import existing

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


def count_tar_samples(path: str) -> int:
    """Samples with an image in one tar, from its headers only (members' data is skipped by seeking)."""
    keys = set()
    with tarfile.open(path) as tar:
        for m in tar:
            base, _, ext = Path(m.name).name.partition(".")
            if ext.lower() in IMAGE_EXTS:
                keys.add(str(Path(m.name).parent / base))
    return len(keys)


def count_samples(paths: list[str]) -> int | None:
    """Samples in the input shards when cheap to know (see module docstring), else None."""
    stats = [Path(p).with_name(Path(p).name.split(".")[0] + "_stats.json") for p in paths]
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


def precheck(cfg, stage: str) -> None:
    """Raise ConfigError/FileNotFoundError before submitting `stage` (embed, kmeans, assign, cluster, all)."""
    cfg = as_config(cfg)
    k = int(cfg.kmeans.k)
    if stage in ("kmeans", "cluster", "all"):
        init_method(str(cfg.kmeans.init))
    if stage in ("embed", "cluster", "all"):
        try:
            paths = existing(str(cfg.data.shards))
        except (FileNotFoundError, ValueError) as exn:
            raise ConfigError(str(exn)) from None
        check_model(str(cfg.clip.model), str(cfg.clip.pretrained))
        if stage != "embed":
            n = count_samples(paths)
            if n is None:
                print(f"precheck: {len(paths)} shards without _stats.json: kmeans.k is checked against the "
                      "embedded rows when the kmeans job starts", file=sys.stderr)
            else:
                check_k(k, n, f"samples in data.shards ({len(paths)} shards)")
    if stage == "kmeans":
        stems = features.embedded_stems(cfg.run_dir)
        if not stems:
            raise ConfigError(f"stage=kmeans: no embedded shard in {features.embed_dir(cfg.run_dir)} "
                              "(run stage=embed first, or check run_dir)")
        check_k(k, int(features.row_counts(cfg.run_dir, stems, select(cfg, features.EMBED_KEYS)).sum()),
                f"embedded rows in {features.embed_dir(cfg.run_dir)}")
    if stage == "assign":
        summary = Path(cfg.run_dir) / "kmeans" / "summary.json"
        if not summary.is_file():
            raise ConfigError(f"stage=assign: {summary} missing (run stage=kmeans first, or check run_dir)")
