"""Assign stage: the nearest centroid of every embedded row -> RUN/labels/S.npy, then class-size statistics.

Labels are only valid with the centroids that made them: RUN/labels/centroids.json records the
centroids' fingerprint before any label is written, and a task meeting other centroids refuses to go on.
A shard's labels are also only valid for the rows they label: a labels file whose length is not the
shard's row count (the shard was embedded again, e.g. with embed.redo_damaged) is labelled again.
Every label written is a real class: faiss answers -1 only for a non-finite query, and a non-finite
row stops the task before its shard is written, naming the file (features.NonFiniteFeatures).
The search runs on faiss's GPU index where faiss sees a GPU; where it does not (a faiss-cpu build) but
torch sees a CUDA GPU, as blocked matrix products there (cluster_job/nearest.py); else on the CPU.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import faiss
import numpy as np
import torch

from cluster_job import features
from cluster_job.kmeans import kmeans_dir, label_rows, search_index, use_gpu
from cluster_job.nearest import TorchFlatIP
from unicom_ds import tblog
from unicom_ds.atomic import read_json, save_npy_atomic, write_json_atomic
from unicom_ds.config import ConfigError, as_config
from unicom_ds.progress import progress


def labels_dir(run_dir: str) -> Path:
    return Path(run_dir) / "labels"


def fingerprint(run_dir: str) -> dict:
    """What identifies the centroids: their sha256 plus the k-means config that made them."""
    path = kmeans_dir(run_dir) / "centroids.npy"
    summary = read_json(kmeans_dir(run_dir) / "summary.json")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"centroids_sha256": digest, "k": summary["k"], "mode": summary["mode"], "config": summary["config"]}


def check_labels(cfg, fp: dict) -> bool:
    """True when RUN/labels is claimed by these centroids, False when unclaimed; refuses other centroids'."""
    path = labels_dir(cfg.run_dir) / "centroids.json"
    if not path.is_file():
        return False
    recorded = read_json(path)
    if recorded["centroids_sha256"] != fp["centroids_sha256"]:
        raise ConfigError(
            f"{labels_dir(cfg.run_dir)} holds labels of other centroids ({path}: k={recorded['k']}, "
            f"sha256 {recorded['centroids_sha256'][:12]}; now k={fp['k']}, sha256 {fp['centroids_sha256'][:12]}); "
            + features.reuse_hint(cfg, recorded["config"], fp["config"])
            + f"; or delete {labels_dir(cfg.run_dir)} to label again here")
    return True


def claim_labels(cfg, fp: dict) -> None:
    """Record the centroids' fingerprint for RUN/labels, or refuse if labels of other centroids are there."""
    if not check_labels(cfg, fp):
        write_json_atomic(labels_dir(cfg.run_dir) / "centroids.json", fp)  # concurrent tasks write the same
        check_labels(cfg, fp)  # another task's claim may have won the rename


def labelled(run_dir: str, stem: str, n: int) -> bool:
    """RUN/labels/S.npy exists and labels exactly the shard's n rows."""
    path = labels_dir(run_dir) / f"{stem}.npy"
    return path.is_file() and np.load(path, mmap_mode="r").shape == (n,)


def torch_gpu(setting) -> bool:
    """Whether `assign.gpu` searches with torch on a CUDA GPU: not off, faiss sees no GPU, torch sees one."""
    return setting not in (False, "false", 0) and not faiss.get_num_gpus() and torch.cuda.is_available()


def centroid_index(centroids: np.ndarray, setting):
    """What searches the centroids for `assign.gpu`: a faiss index, or its top-1 search in torch on CUDA."""
    if torch_gpu(setting):
        return TorchFlatIP(centroids, "cuda")
    return search_index(centroids, use_gpu(setting))


def class_sizes(run_dir: str, stems: list[str], k: int) -> np.ndarray:
    sizes = np.zeros(k, dtype=np.int64)
    for s in stems:
        sizes += np.bincount(np.load(labels_dir(run_dir) / f"{s}.npy", mmap_mode="r"), minlength=k)
    return sizes


def size_stats(sizes: np.ndarray) -> dict:
    """Class-size statistics over the k classes (the paper's Fig. 4 numbers)."""
    used = sizes[sizes > 0]
    stats = {"k": int(len(sizes)), "rows": int(sizes.sum()), "non_empty_classes": int(len(used)),
             "empty_classes": int(len(sizes) - len(used))}
    if len(used):
        stats.update(min_size=int(used.min()), median_size=float(np.median(used)), mean_size=float(used.mean()),
                     max_size=int(used.max()), p99_size=float(np.percentile(used, 99)))
    return stats


def write_summary(cfg, stems: list[str], records: list[dict], fp: dict) -> dict:
    """labels/summary.json + class_sizes.png + TensorBoard, from all shards' labels; the damage and the
    skipped rows recorded by the embed stage come along ("damaged_shards", "rows_skipped")."""
    from cluster_job import cluster_samples

    out = labels_dir(cfg.run_dir)
    sizes = class_sizes(cfg.run_dir, stems, int(fp["k"]))
    skipped: dict[str, int] = {}
    for r in records:
        for reason, count in r.get("skipped", {}).items():
            skipped[reason] = skipped.get(reason, 0) + int(count)
    damaged = features.damaged_shards(stems, records)
    summary = {**size_stats(sizes), "shards": len(stems), "centroids_sha256": fp["centroids_sha256"],
               "mode": fp["mode"], "damaged_shards": damaged, "rows_skipped": dict(sorted(skipped.items()))}
    cluster_samples.plot_class_sizes(sizes, out / "class_sizes.png", len(sizes))
    with tblog.writer(cfg.run_dir, "cluster") as tb:
        for key in ("non_empty_classes", "empty_classes", "min_size", "median_size", "max_size", "mean_size"):
            if key in summary:
                tb.add_scalar(f"labels/{key}", summary[key], 0)
        tb.add_scalar("labels/damaged_shards", len(damaged), 0)
        tb.add_histogram("labels/class_sizes", sizes[sizes > 0], 0)
    cluster_samples.tensorboard_grids(cfg)
    write_json_atomic(out / "summary.json", summary)
    return summary


def assign_shards(cfg, stems: list[str]) -> dict | None:
    """Job function: label the given embedded shards; the task that finds every shard labelled
    afterwards writes the summary (returned then, else None)."""
    cfg = as_config(cfg)
    run_dir, src = cfg.run_dir, features.source_run(cfg)
    if not (kmeans_dir(run_dir) / "summary.json").is_file():
        raise FileNotFoundError(f"assign: {kmeans_dir(run_dir)}/summary.json missing; run stage=kmeans first")
    fp = fingerprint(run_dir)
    claim_labels(cfg, fp)
    embedded = features.embedded_stems(src)
    unknown = sorted(set(stems) - set(embedded))
    if unknown:
        raise FileNotFoundError(f"assign: shard {unknown[0]} has no {features.done_path(src, unknown[0])}")
    rows = dict(zip(stems, features.row_counts(src, stems).tolist()))
    todo = [s for s in stems if not labelled(run_dir, s, rows[s])]
    print(f"assign: {len(stems) - len(todo)} of {len(stems)} shards already labelled", file=sys.stderr, flush=True)
    if todo:
        index = centroid_index(np.load(kmeans_dir(run_dir) / "centroids.npy"), cfg.assign.gpu)
        for s in progress(todo, total=len(todo), desc="assign", mode=cfg.progress, unit="shard",
                          rows=lambda s: rows[s]):
            labels = label_rows(index, features.iter_batches(src, s, fp["mode"], cfg.assign.batch_size))
            save_npy_atomic(labels_dir(run_dir) / f"{s}.npy", labels)
    print(f"assign: {len(todo)} shards, {sum(rows[s] for s in todo):,} rows labelled -> {labels_dir(run_dir)}",
          file=sys.stderr, flush=True)
    # Cheap test first (every task makes it); the full one reads every done.json and labels header.
    if all((labels_dir(run_dir) / f"{s}.npy").is_file() for s in embedded):
        records = features.done_records(src, embedded)
        if not all(labelled(run_dir, s, int(r["n"])) for s, r in zip(embedded, records)):
            return None  # a shard embedded again is waiting for its task
        summary = write_summary(cfg, embedded, records, fp)
        print(f"assign: all {len(embedded)} embedded shards labelled: {summary['rows']:,} rows in "
              f"{summary['non_empty_classes']:,} non-empty classes, sizes {summary['min_size']:,}.."
              f"{summary['max_size']:,} (median {summary['median_size']:,})"
              + (f"; {features.damage_line(summary['damaged_shards'])}" if summary["damaged_shards"] else "")
              + f" -> {labels_dir(run_dir)}/summary.json", file=sys.stderr, flush=True)
        return summary
    return None
