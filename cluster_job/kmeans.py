"""K-means stage: spherical faiss k-means on a seeded sample of the embedded shards -> RUN/kmeans/."""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from cluster_job import features
from unicom_ds.atomic import read_json, save_npy_atomic, write_json_atomic
from unicom_ds.config import ConfigError, as_config, check_same, select
from unicom_ds.progress import progress

# The config keys whose change makes other centroids; stored in summary.json and compared on a rerun.
KMEANS_KEYS = features.EMBED_KEYS + ("kmeans.k", "kmeans.mode", "kmeans.niter", "kmeans.init", "kmeans.max_points_per_centroid",
                                     "kmeans.min_points_per_centroid", "kmeans.two_level", "kmeans.seed")
TWO_LEVEL_FROM_K = 65536  # `kmeans.two_level=auto` switches to two levels from this k on
# Random seeding often leaves two centroids in one group and none in another; k-means++ fixes that but
# is sequential in k; AFK-MC2 approximates it at a cost that stays small for large k.
INITS = {"afkmc2": faiss.ClusteringInitMethod_AFK_MC2, "kmeans++": faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
         "random": faiss.ClusteringInitMethod_RANDOM}


def kmeans_dir(run_dir: str) -> Path:
    return Path(run_dir) / "kmeans"


def use_gpu(setting) -> int:
    """Number of GPUs faiss should use for `kmeans.gpu` / `assign.gpu` (auto: all that faiss sees)."""
    available = faiss.get_num_gpus()
    if setting in (False, "false", 0):
        return 0
    if setting in (True, "true") and not available:
        raise ConfigError("gpu=true but faiss sees no GPU (faiss-cpu build or no CUDA device)")
    return available


def use_two_level(setting, k: int) -> bool:
    if setting == "auto":
        return k >= TWO_LEVEL_FROM_K
    return setting in (True, "true")


def init_method(name: str) -> int:
    if name not in INITS:
        raise ConfigError(f"kmeans.init={name}: expected one of {', '.join(INITS)}")
    return INITS[name]


def spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int, min_ppc: int = 1, gpu: int = 0,
                     init: str = "afkmc2") -> tuple[np.ndarray, float, int]:
    """faiss spherical k-means on rows of x. Returns (centroids, objective, iterations run).

    The objective is faiss's: the sum over points of the inner product with their centroid (higher is
    better). x is already the capped sample, so faiss must not subsample it again.
    """
    n, d = x.shape
    if k == n:  # every point its own centroid: nothing to fit
        return np.ascontiguousarray(x, np.float32), float(n), 0
    if k == 1:
        c = features.normalize(x.mean(axis=0, keepdims=True))
        return c, float((x @ c[0]).sum()), 0
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=max(1, -(-n // k)),
                      min_points_per_centroid=min_ppc, gpu=gpu or False, init_method=init_method(init),
                      verbose=False)
    km.train(np.ascontiguousarray(x, np.float32))
    return km.centroids, float(km.obj[-1]), len(km.obj)


def nearest(centroids: np.ndarray, x: np.ndarray, gpu: int = 0) -> np.ndarray:
    """Index of the nearest centroid of each row (inner product == cosine for normalised rows)."""
    return label_rows(search_index(centroids, gpu), [x])


def label_rows(index: faiss.Index, batches) -> np.ndarray:
    """Nearest-centroid ids of batches of rows, concatenated."""
    parts = [index.search(np.ascontiguousarray(b, np.float32), 1)[1][:, 0] for b in batches]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def search_index(centroids: np.ndarray, gpu: int = 0) -> faiss.Index:
    index = faiss.IndexFlatIP(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=gpu)
    index.add(np.ascontiguousarray(centroids, np.float32))
    return index


def split_sizes(counts: np.ndarray, k: int) -> np.ndarray:
    """Sub-cluster counts per coarse cluster: proportional to its size, >= 1 for a non-empty cluster,
    <= its size, summing exactly to k (largest remainder). Needs sum(counts) >= k >= non-empty clusters."""
    counts = np.asarray(counts, dtype=np.int64)
    nonempty = counts > 0
    if not nonempty.sum() <= k <= counts.sum():
        raise ValueError(f"cannot split {counts.sum()} points in {nonempty.sum()} clusters into k={k}")
    quota = k * counts / counts.sum()
    sizes = np.where(nonempty, np.clip(np.floor(quota), 1, counts), 0).astype(np.int64)
    while (gap := k - int(sizes.sum())) != 0:
        if gap > 0:  # give one more to the clusters furthest below their quota that have room
            room = np.flatnonzero(sizes < counts)
            pick = room[np.argsort(-(quota[room] - sizes[room]), kind="stable")[:gap]]
            sizes[pick] += 1
        else:  # take one from those furthest above their quota that can spare it
            spare = np.flatnonzero(sizes > 1)
            pick = spare[np.argsort(-(sizes[spare] - quota[spare]), kind="stable")[:-gap]]
            sizes[pick] -= 1
    return sizes


def two_level_kmeans(x: np.ndarray, k: int, niter: int, seed: int, min_ppc: int = 1, gpu: int = 0,
                     init: str = "afkmc2") -> tuple[np.ndarray, float, int]:
    """~sqrt(k) coarse clusters, then each split into sub-clusters in proportion to its size.

    Returns (k centroids, summed objective of the sub-problems, total iterations run)."""
    kc = max(1, min(int(round(math.sqrt(k))), k))
    coarse, _, iters = spherical_kmeans(x, kc, niter, seed, min_ppc, gpu, init)
    assign = nearest(coarse, x, gpu)
    sizes = split_sizes(np.bincount(assign, minlength=kc), k)
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=kc))])
    parts, objective = [], 0.0
    for c in progress(np.flatnonzero(sizes), total=int((sizes > 0).sum()), desc="kmeans sub-clusters"):
        members = x[order[starts[c]:starts[c + 1]]]
        cent, obj, it = spherical_kmeans(members, int(sizes[c]), niter, seed + 1 + int(c), min_ppc, gpu, init)
        parts.append(cent)
        objective += obj
        iters += it
    return np.concatenate(parts), objective, iters


def plan(cfg, counts: np.ndarray) -> int:
    """Sample size; refuses k > points. Cap: k * max_points_per_centroid, as faiss would subsample."""
    k, total = int(cfg.kmeans.k), int(counts.sum())
    if k > total:
        raise ConfigError(f"kmeans.k={k} is larger than the {total} embedded points in "
                          f"{features.embed_dir(cfg.run_dir)}; lower kmeans.k or embed more shards")
    return min(total, k * int(cfg.kmeans.max_points_per_centroid))


def run_kmeans(cfg) -> dict:
    """Job function: centroids of the embedded shards. Skips when the same config already finished."""
    cfg = as_config(cfg)
    out = kmeans_dir(cfg.run_dir)
    wanted = select(cfg, KMEANS_KEYS)
    if (out / "summary.json").is_file():
        summary = read_json(out / "summary.json")
        check_same(summary["config"], wanted, out / "summary.json")
        print(f"kmeans: {out}/summary.json exists for this config; skipping", file=sys.stderr)
        return summary
    start = time.monotonic()
    stems = features.embedded_stems(cfg.run_dir)
    if not stems:
        raise FileNotFoundError(f"kmeans: no embedded shard (no *.done.json) in {features.embed_dir(cfg.run_dir)}")
    counts = features.row_counts(cfg.run_dir, stems, select(cfg, features.EMBED_KEYS))
    n_sample = plan(cfg, counts)
    k, d, mode = int(cfg.kmeans.k), features.dim(cfg.run_dir, stems[0]), str(cfg.kmeans.mode)
    rows = features.sample_rows(counts, n_sample, int(cfg.kmeans.seed))
    x = features.gather(cfg.run_dir, stems, rows, mode, d)
    gpu = use_gpu(cfg.kmeans.gpu)
    two = use_two_level(cfg.kmeans.two_level, k)
    fit = two_level_kmeans if two else spherical_kmeans
    print(f"kmeans: k={k} on {n_sample} of {int(counts.sum())} points (d={d}, mode={mode}, "
          f"{'two-level' if two else 'one level'}, {'%d GPU' % gpu if gpu else 'CPU'})", file=sys.stderr, flush=True)
    centroids, objective, iterations = fit(x, k, int(cfg.kmeans.niter), int(cfg.kmeans.seed),
                                           int(cfg.kmeans.min_points_per_centroid), gpu, str(cfg.kmeans.init))
    save_npy_atomic(out / "centroids.npy", np.ascontiguousarray(centroids, np.float32))
    summary = {"k": k, "d": d, "mode": mode, "two_level": two, "points_used": int(n_sample),
               "points_embedded": int(counts.sum()), "shards": len(stems), "objective": objective,
               "mean_cosine": objective / n_sample, "iterations": iterations, "gpus": gpu,
               "seconds": round(time.monotonic() - start, 3), "config": wanted}
    write_json_atomic(out / "summary.json", summary)  # last: it marks the stage done
    print(f"kmeans: done, objective {objective:.1f} after {iterations} iterations, {summary['seconds']:.1f}s "
          f"-> {out}/centroids.npy", file=sys.stderr, flush=True)
    return summary
