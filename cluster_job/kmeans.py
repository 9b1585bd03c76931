"""K-means stage: spherical faiss k-means on a seeded sample of the embedded shards -> RUN/kmeans/.

TensorBoard (RUN/tensorboard/kmeans): the objective per iteration and the sizes of the classes on the
sample. The sizes cost one more assignment pass (1/niter of the fit); at two levels each sub-problem
assigns only its own members, as in the fit.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import faiss
import numpy as np
import torch

from cluster_job import centroid_ivf, features
from unicom_ds import tblog
from unicom_ds.atomic import read_json, save_npy_atomic, write_json_atomic
from unicom_ds.config import ConfigError, as_config, check_same, select
from unicom_ds.progress import progress

# The config keys whose change makes other centroids; stored in summary.json and compared on a rerun.
KMEANS_KEYS = features.EMBED_KEYS + ("embed.from", "embed.source", "kmeans.k", "kmeans.mode", "kmeans.niter", "kmeans.init", "kmeans.max_points_per_centroid",
                                     "kmeans.min_points_per_centroid", "kmeans.two_level", "kmeans.seed")
REFINE_KEYS = ("kmeans.refine_iters", "kmeans.refine_nprobe")  # part of the identity of two-level fits only
TWO_LEVEL_FROM_K = 65536  # `kmeans.two_level=auto` switches to two levels from this k on
# The ~sqrt(k) sub-problems (about 1,000 at k = 1M) run one after another: seeded with random points, not
# AFK-MC2, which cost ~1.2 s each (20 min at 1M) and fitted no better (benchmarks/bench_kmeans_seeding.py).
SUB_INIT = "random"
COARSE_POINTS_PER_CENTROID = 256  # the two-level fit's coarse sample (faiss's default max_points_per_centroid)
NEAREST_BATCH = 1 << 20  # rows searched (as float32) at once when the sample is float16
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


class Fit(NamedTuple):
    centroids: np.ndarray      # [k, d] float32, unit rows
    objective: float           # faiss's: summed inner product of each point with its centroid (higher is better)
    history: list[float]       # the objective after each iteration (empty when nothing was iterated)
    sizes: np.ndarray          # [k] points of x nearest to each centroid

    @property
    def iterations(self) -> int:
        return len(self.history)


def spherical_kmeans(x: np.ndarray, k: int, niter: int, seed: int, min_ppc: int = 1, gpu: int = 0,
                     init: str = "afkmc2") -> Fit:
    """faiss spherical k-means on rows of x. x is already the capped sample, so faiss must not
    subsample it again."""
    n, d = x.shape
    if k == n:  # every point its own centroid: nothing to fit
        return Fit(np.ascontiguousarray(x, np.float32), float(n), [], np.ones(n, np.int64))
    if k == 1:
        c = features.normalize(x.mean(axis=0, keepdims=True))
        return Fit(c, float((x @ c[0]).sum()), [], np.array([n], np.int64))
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, max_points_per_centroid=max(1, -(-n // k)),
                      min_points_per_centroid=min_ppc, gpu=gpu or False, init_method=init_method(init),
                      verbose=False)
    km.train(np.ascontiguousarray(x, np.float32))
    sizes = np.bincount(nearest(km.centroids, x, gpu), minlength=k)
    return Fit(km.centroids, float(km.obj[-1]), [float(o) for o in km.obj], sizes)


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
                     init: str = "afkmc2") -> tuple[Fit, Fit]:
    """~sqrt(k) coarse clusters (seeded by `init`), then each split into sub-clusters in proportion to its size
    (seeded by SUB_INIT).

    Returns (the k-centroid fit, the coarse fit). The fine fit's objective sums the sub-problems'; its
    history sums them per iteration (a sub-problem solved without iterating adds its objective to each)."""
    kc = max(1, min(int(round(math.sqrt(k))), k))
    # The coarse fit takes a seeded sample of COARSE_POINTS_PER_CENTROID points per coarse centroid (what faiss
    # itself would subsample to), so a float16 x is only converted a sample and a sub-problem at a time.
    picked = np.sort(np.random.default_rng(seed).choice(len(x), min(len(x), kc * COARSE_POINTS_PER_CENTROID),
                                                        replace=False))
    coarse = spherical_kmeans(np.ascontiguousarray(x[picked], np.float32), kc, niter, seed, min_ppc, gpu, init)
    batches = (x[a:a + NEAREST_BATCH] for a in range(0, len(x), NEAREST_BATCH))
    assign = label_rows(search_index(coarse.centroids, gpu), batches)
    sizes = split_sizes(np.bincount(assign, minlength=kc), k)
    order = np.argsort(assign, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=kc))])
    parts = []
    todo = np.flatnonzero(sizes)
    for c in progress(todo, total=len(todo), desc="kmeans sub-clusters", unit="sub-problem",
                      rows=lambda c: int(starts[c + 1] - starts[c])):
        members = np.ascontiguousarray(x[order[starts[c]:starts[c + 1]]], np.float32)
        parts.append(spherical_kmeans(members, int(sizes[c]), niter, seed + 1 + int(c), min_ppc, gpu, SUB_INIT))
    steps = max([p.iterations for p in parts] + [0])
    history = [sum(p.history[i] if i < p.iterations else p.objective for p in parts) for i in range(steps)]
    fine = Fit(np.concatenate([p.centroids for p in parts]), sum(p.objective for p in parts), history,
               np.concatenate([p.sizes for p in parts]))
    return fine, coarse


def refine(x: np.ndarray, fit: Fit, iters: int, nprobe: int, seed: int, gpu: int = 0) -> Fit:
    """Lloyd iterations over all k centroids after the two-level fit. At two levels a point only joins a
    sub-centroid of its coarse cluster, and where the coarse level cuts through groups the fit splits them
    (12-15 % below one level's objective, benchmarks/bench_kmeans_two_level.py); here every point may join
    any centroid, found by the IVF search over the centroids that assign uses. The objective after a mean step
    is the sum of the member sums' norms; an iteration that does not raise it ends the refinement, keeping the
    previous centroids (the search is approximate)."""
    k, d = fit.centroids.shape
    centroids, objective, history, sizes = fit.centroids, fit.objective, list(fit.history), fit.sizes
    for it in range(iters):
        centres = centroid_ivf.list_centres(centroids, centroid_ivf.default_nlist(k), seed + it, gpu)
        index = centroid_ivf.faiss_ivf(centroids, centres, nprobe, gpu)
        sums, counts = torch.zeros(k, d), np.zeros(k, np.int64)
        for a in range(0, len(x), NEAREST_BATCH):
            xb = np.ascontiguousarray(x[a:a + NEAREST_BATCH], np.float32)
            ids = index.search(xb, 1)[1][:, 0]
            if (ids < 0).any():  # every probed list empty: search those rows exactly
                ids[ids < 0] = nearest(centroids, xb[ids < 0], gpu)
            sums.index_add_(0, torch.from_numpy(ids), torch.from_numpy(xb))
            counts += np.bincount(ids, minlength=k)
        norms = sums.norm(dim=1)
        if float(norms.sum()) <= objective:
            break
        objective = float(norms.sum())
        # An emptied centroid keeps its place: it may win points back in the next iteration.
        centroids = np.where(counts[:, None] > 0, (sums / norms.clamp_min(1e-12)[:, None]).numpy(), centroids)
        centroids, sizes = np.ascontiguousarray(centroids, np.float32), counts
        history.append(objective)
    return Fit(centroids, objective, history, sizes)


def plan(cfg, counts: np.ndarray) -> int:
    """Sample size; refuses k > points. Cap: k * max_points_per_centroid, as faiss would subsample."""
    k, total = int(cfg.kmeans.k), int(counts.sum())
    if k > total:
        raise ConfigError(f"kmeans.k={k} is larger than the {total} embedded points in "
                          f"{features.embed_dir(features.source_run(cfg))}; lower kmeans.k or embed more shards")
    return min(total, k * int(cfg.kmeans.max_points_per_centroid))


def identity(cfg) -> dict:
    """The config keys that made these centroids (one-level fits are not refined: their runs keep matching)."""
    two = use_two_level(cfg.kmeans.two_level, int(cfg.kmeans.k))
    return select(cfg, KMEANS_KEYS + (REFINE_KEYS if two else ()))


def check_done(cfg) -> dict | None:
    """The summary of a finished k-means of this config, None when there is none; refuses another config's."""
    path = kmeans_dir(cfg.run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary, wanted = read_json(path), identity(cfg)
    check_same(summary["config"], wanted, path, features.reuse_hint(cfg, summary["config"], wanted)
               + f"; or delete {path.parent} and {Path(str(cfg.run_dir)) / 'labels'} to redo them here")
    return summary


def log_fit(run_dir: str, fit: Fit, coarse: Fit | None) -> None:
    """TensorBoard: the objective after each iteration, and the class sizes on the sample."""
    with tblog.writer(run_dir, "kmeans") as tb:
        for i, obj in enumerate(fit.history, 1):
            tb.add_scalar("kmeans/objective", obj, i)
        for i, obj in enumerate(coarse.history if coarse else [], 1):
            tb.add_scalar("kmeans/coarse_objective", obj, i)
        tb.add_histogram("kmeans/class_sizes", fit.sizes, 0)
        tb.add_scalar("kmeans/empty_classes", int((fit.sizes == 0).sum()), 0)
        tb.add_scalar("kmeans/max_class_size", int(fit.sizes.max()), 0)


def run_kmeans(cfg) -> dict:
    """Job function: centroids of the embedded shards. Skips when the same config already finished."""
    cfg = as_config(cfg)
    out = kmeans_dir(cfg.run_dir)
    summary = check_done(cfg)
    if summary is not None:
        print(f"kmeans: {out}/summary.json exists for this config; skipping", file=sys.stderr)
        return summary
    start = time.monotonic()
    src = features.source_run(cfg)
    stems = features.embedded_stems(src)
    if not stems:
        raise FileNotFoundError(f"kmeans: no embedded shard (no *.done.json) in {features.embed_dir(src)}")
    records = features.done_records(src, stems, features.embed_identity(cfg))
    counts = np.asarray([int(r["n"]) for r in records], dtype=np.int64)
    damaged = features.damaged_shards(stems, records)
    n_sample = plan(cfg, counts)
    k, d, mode = int(cfg.kmeans.k), features.dim(src, stems[0]), str(cfg.kmeans.mode)
    rows = features.sample_rows(counts, n_sample, int(cfg.kmeans.seed))
    gpu = use_gpu(cfg.kmeans.gpu)
    two = use_two_level(cfg.kmeans.two_level, k)
    # Two levels hold the sample in float16 (the stored features are float16; a joint mean rounds to it): at
    # k = 1M x 256 points x d = 512 that is 262 GB instead of 524, inside the job's memory.
    x = features.gather(src, stems, rows, mode, d, np.float16 if two else np.float32)
    print(f"kmeans: k={k:,} on {n_sample:,} of {int(counts.sum()):,} rows of {len(stems):,} shards (d={d}, "
          f"mode={mode}, {'two-level' if two else 'one level'}, {'%d GPU' % gpu if gpu else 'CPU'})"
          + (f"; {features.damage_line(damaged)}" if damaged else ""), file=sys.stderr, flush=True)
    args = (x, k, int(cfg.kmeans.niter), int(cfg.kmeans.seed), int(cfg.kmeans.min_points_per_centroid), gpu,
            str(cfg.kmeans.init))
    fit, coarse = two_level_kmeans(*args) if two else (spherical_kmeans(*args), None)
    fitted = fit  # before refining
    if two and int(cfg.kmeans.refine_iters):
        fit = refine(x, fit, int(cfg.kmeans.refine_iters), int(cfg.kmeans.refine_nprobe), int(cfg.kmeans.seed), gpu)
        print(f"kmeans: {fit.iterations - fitted.iterations} of {cfg.kmeans.refine_iters} refinement iterations over "
              f"all {k:,} centroids raised the mean cosine {fitted.objective / n_sample:.4f} -> "
              f"{fit.objective / n_sample:.4f}", file=sys.stderr, flush=True)
    save_npy_atomic(out / "centroids.npy", np.ascontiguousarray(fit.centroids, np.float32))
    log_fit(cfg.run_dir, fit, coarse)
    summary = {"k": k, "d": d, "mode": mode, "two_level": two, "points_used": int(n_sample),
               "points_embedded": int(counts.sum()), "shards": len(stems), "damaged_shards": damaged,
               "embeddings": str(features.embed_dir(src)), "objective": fit.objective,
               "mean_cosine": fit.objective / n_sample, "iterations": fit.iterations,
               "empty_classes_on_sample": int((fit.sizes == 0).sum()), "gpus": gpu,
               "seconds": round(time.monotonic() - start, 3), "config": identity(cfg)}
    if coarse is not None:
        summary.update(coarse_iterations=coarse.iterations, refined_iterations=fit.iterations - fitted.iterations,
                       mean_cosine_before_refining=fitted.objective / n_sample)
    write_json_atomic(out / "summary.json", summary)  # last: it marks the stage done
    print(f"kmeans: done, objective {fit.objective:,.1f} (mean cosine {summary['mean_cosine']:.4f}) after "
          f"{fit.iterations} iterations, {summary['seconds']:.1f}s -> {out}/centroids.npy", file=sys.stderr, flush=True)
    return summary
