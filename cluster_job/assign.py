"""Assign stage: the nearest centroid of every embedded row -> RUN/labels/S.npy, then class-size statistics.

Labels are only valid with the centroids that made them: RUN/labels/centroids.json records the
centroids' fingerprint before any label is written, and a task meeting other centroids refuses to go on.
"""
from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np

from cluster_job import features
from cluster_job.kmeans import kmeans_dir, label_rows, search_index, use_gpu
from unicom_ds.atomic import atomic_path, read_json, save_npy_atomic, write_json_atomic
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


def claim_labels(run_dir: str, fp: dict) -> None:
    """Record the centroids' fingerprint for RUN/labels, or refuse if labels of other centroids are there."""
    path = labels_dir(run_dir) / "centroids.json"
    if not path.is_file():
        write_json_atomic(path, fp)  # concurrent tasks write the same content; the rename is atomic
    recorded = read_json(path)
    if recorded["centroids_sha256"] != fp["centroids_sha256"]:
        raise ConfigError(
            f"{labels_dir(run_dir)} holds labels of other centroids ({path}: k={recorded['k']}, "
            f"sha256 {recorded['centroids_sha256'][:12]}; now k={fp['k']}, sha256 {fp['centroids_sha256'][:12]}); "
            "use a new run_dir or delete the labels folder to relabel")


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


def plot_sizes(sizes: np.ndarray, path: Path) -> None:
    """Histogram of class sizes with log-scale counts, as in the Unicom paper's Fig. 4."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    used = sizes[sizes > 0]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.hist(used, bins=min(50, max(1, int(used.max() - used.min() + 1))) if len(used) else 1, color="#3b6ea8")
    ax.set_yscale("log")
    ax.set_xlabel("images per pseudo class")
    ax.set_ylabel("number of classes (log)")
    ax.set_title(f"{len(used)} non-empty of {len(sizes)} classes, {int(sizes.sum())} images")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def write_summary(cfg, stems: list[str], fp: dict) -> dict:
    """labels/summary.json + class_sizes.png + TensorBoard, from all shards' labels."""
    from cluster_job import cluster_samples
    from unicom_ds import tblog

    out = labels_dir(cfg.run_dir)
    sizes = class_sizes(cfg.run_dir, stems, int(fp["k"]))
    summary = {**size_stats(sizes), "shards": len(stems), "centroids_sha256": fp["centroids_sha256"],
               "mode": fp["mode"]}
    plot_sizes(sizes, out / "class_sizes.png")
    tb = tblog.writer(cfg.run_dir, "cluster")
    for key in ("non_empty_classes", "empty_classes", "min_size", "median_size", "max_size", "mean_size"):
        if key in summary:
            tb.add_scalar(f"labels/{key}", summary[key], 0)
    tb.add_histogram("labels/class_sizes", sizes[sizes > 0], 0)
    tb.close()
    cluster_samples.tensorboard_grids(cfg)
    write_json_atomic(out / "summary.json", summary)
    return summary


def assign_shards(cfg, stems: list[str]) -> dict | None:
    """Job function: label the given embedded shards; the task that finds every shard labelled
    afterwards writes the summary (returned then, else None)."""
    cfg = as_config(cfg)
    run_dir = cfg.run_dir
    if not (kmeans_dir(run_dir) / "summary.json").is_file():
        raise FileNotFoundError(f"assign: {kmeans_dir(run_dir)}/summary.json missing; run stage=kmeans first")
    fp = fingerprint(run_dir)
    claim_labels(run_dir, fp)
    embedded = set(features.embedded_stems(run_dir))
    unknown = [s for s in stems if s not in embedded]
    if unknown:
        raise FileNotFoundError(f"assign: shard {unknown[0]} has no {features.done_path(run_dir, unknown[0])}")
    todo = [s for s in stems if not (labels_dir(run_dir) / f"{s}.npy").is_file()]
    print(f"assign: {len(stems) - len(todo)} of {len(stems)} shards already labelled", file=sys.stderr, flush=True)
    if todo:
        index = search_index(np.load(kmeans_dir(run_dir) / "centroids.npy"), use_gpu(cfg.assign.gpu))
        for s in progress(todo, total=len(todo), desc="assign", mode=cfg.progress):
            start = time.monotonic()
            labels = label_rows(index, features.iter_batches(run_dir, s, fp["mode"], cfg.assign.batch_size))
            save_npy_atomic(labels_dir(run_dir) / f"{s}.npy", labels)
            print(f"assign {s}: {len(labels)} rows in {time.monotonic() - start:.2f}s", file=sys.stderr)
    print(f"assign: {len(todo)} shard(s) labelled -> {labels_dir(run_dir)}", file=sys.stderr, flush=True)
    all_stems = sorted(embedded)
    if all((labels_dir(run_dir) / f"{s}.npy").is_file() for s in all_stems):
        summary = write_summary(cfg, all_stems, fp)
        print(f"assign: all {len(all_stems)} embedded shards labelled: {summary['non_empty_classes']} non-empty "
              f"classes, sizes {summary['min_size']}..{summary['max_size']} (median {summary['median_size']}) "
              f"-> {labels_dir(run_dir)}/summary.json", file=sys.stderr, flush=True)
        return summary
    return None
