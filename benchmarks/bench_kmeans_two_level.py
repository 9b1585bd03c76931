"""The two-level k-means fit against one level: the objective it gives up, by coarse sample size and iterations.

    python benchmarks/bench_kmeans_two_level.py --n 131072 --k 1024 --d 128 --niter 10 20 --coarse-ppc 64 256

At k = 1M the kmeans job fits two levels (cluster_job/kmeans.py): ~sqrt(k) coarse centroids on a sample of
COARSE_POINTS_PER_CENTROID points each, then each coarse cluster split into sub-clusters in proportion to its
size. A point can then only join a sub-centroid of its own coarse cluster. This fits the same points with one
level (faiss spherical k-means, every centroid), with two levels, and with two levels then `kmeans.refine_iters`
Lloyd iterations over all k centroids (IVF search), in one process, and scores each the same way: the mean
cosine of every point to its nearest centroid of all k (higher is better), plus the seconds (a refined row's
include its two-level fit).

Three data sets of unit rows, --n points in --d dimensions (no CLIP features ship with the tests):
- topics: --k groups inside sqrt(k) topics (a hierarchy the coarse level can follow, as captions' subjects);
- flat: --k groups uniform on the sphere (no hierarchy: the coarse level cuts through groups);
- leaves: --leaves groups (default 4 k) uniform on the sphere: no hierarchy, and more groups than centroids.

--refine-exact adds, for each refinement, the same number of Lloyd iterations from the same two-level start with
every centroid scored (exact search, no stop rule): what the IVF search and the stop rule cost, against what the
start itself costs. Refined rows say how many iterations the stop rule kept ("kept").

    python benchmarks/bench_kmeans_two_level.py --data leaves --n 65536 --k 1024 --d 64 --niter 20 --coarse-ppc 256 \
        --refine 5 20 --refine-exact
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from cluster_job import kmeans


def make(kind: str, n: int, k: int, d: int, noise: float, rng: np.random.Generator, leaves: int = 0) -> np.ndarray:
    def unit(a: np.ndarray) -> np.ndarray:
        return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)

    if kind == "topics":
        topics = unit(rng.standard_normal((int(math.sqrt(k)), d)))
        groups = unit(topics[rng.integers(0, len(topics), k)] + 0.6 * unit(rng.standard_normal((k, d))))
    elif kind == "leaves":
        groups = unit(rng.standard_normal((leaves or 4 * k, d)))
    else:
        groups = unit(rng.standard_normal((k, d)))
    return unit(groups[rng.integers(0, len(groups), n)] + noise * rng.standard_normal((n, d)).astype(np.float32))


def mean_cosine(x: np.ndarray, centroids: np.ndarray) -> float:
    """Every point against its nearest centroid of all k: the one score both fits are judged by."""
    ids = kmeans.nearest(centroids, x)
    return float(np.einsum("ij,ij->i", x, centroids[ids]).mean())


def exact_lloyd(x: np.ndarray, centroids: np.ndarray, iters: int) -> np.ndarray:
    """Lloyd iterations over all k centroids with every centroid scored (the refinement's reference)."""
    c = centroids.copy()
    for _ in range(iters):
        ids = kmeans.nearest(c, x)
        sums = np.zeros_like(c)
        np.add.at(sums, ids, x)
        norms = np.linalg.norm(sums, axis=1, keepdims=True)
        c = np.where(norms > 0, sums / np.maximum(norms, 1e-12), c).astype(np.float32)
    return c


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=131072)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--noise", type=float, default=0.09)  # mean cosine ~0.7 to the group at d = 128
    ap.add_argument("--data", nargs="+", default=["topics", "flat"], choices=["topics", "flat", "leaves"])
    ap.add_argument("--leaves", type=int, default=0, help="leaves: groups on the sphere (default 4 k)")
    ap.add_argument("--niter", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--coarse-ppc", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--refine", type=int, nargs="*", default=[3, 5], help="refinement iterations (kmeans.refine_iters)")
    ap.add_argument("--refine-nprobe", type=int, default=16)
    ap.add_argument("--refine-exact", action="store_true", help="also exact Lloyd from the same start")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = []
    for kind in a.data:
        x = make(kind, a.n, a.k, a.d, a.noise, np.random.default_rng(a.seed), a.leaves)
        for niter in a.niter:
            start = time.perf_counter()
            one = kmeans.spherical_kmeans(x, a.k, niter, a.seed)
            rows = [{"fit": "one level", "seconds": time.perf_counter() - start, "score": mean_cosine(x, one.centroids)}]
            for ppc in a.coarse_ppc:
                kmeans.COARSE_POINTS_PER_CENTROID = ppc  # the job's constant, varied here only
                start = time.perf_counter()
                two, _ = kmeans.two_level_kmeans(x, a.k, niter, a.seed)
                rows.append({"fit": f"two levels, coarse {ppc}/centroid", "seconds": time.perf_counter() - start,
                             "score": mean_cosine(x, two.centroids)})
                for iters in a.refine:
                    begin = time.perf_counter()
                    refined = kmeans.refine(x, two, iters, a.refine_nprobe, a.seed)
                    rows.append({"fit": f"two levels, coarse {ppc}/centroid, refined {iters} x (nprobe "
                                        f"{a.refine_nprobe})", "seconds": time.perf_counter() - start,
                                 "score": mean_cosine(x, refined.centroids), "refine_seconds": time.perf_counter() - begin,
                                 "kept": refined.iterations - two.iterations})
                    if a.refine_exact:
                        begin = time.perf_counter()
                        exact = exact_lloyd(x, two.centroids, iters)
                        rows.append({"fit": f"two levels, coarse {ppc}/centroid, {iters} exact Lloyd iterations",
                                     "score": mean_cosine(x, exact), "refine_seconds": time.perf_counter() - begin})
            for row in rows:
                row = {"data": kind, "niter": niter, **row, "gap": rows[0]["score"] - row["score"],
                       "gap_pct": 100 * (rows[0]["score"] - row["score"]) / rows[0]["score"], "n": a.n, "k": a.k, "d": a.d}
                row.update({key: round(row[key], 1) for key in ("seconds", "refine_seconds") if key in row})
                row.update(score=round(row["score"], 5), gap=round(row["gap"], 5), gap_pct=round(row["gap_pct"], 2))
                print(json.dumps(row), flush=True)
                out.append(row)
    return out


if __name__ == "__main__":
    main()
