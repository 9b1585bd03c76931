"""Seeding the two-level fit's sub-problems: AFK-MC2 against random, time and objective.

    python benchmarks/bench_kmeans_seeding.py --n 64000 --k 250 --d 512 --seeds 0 1 2

One sub-problem of the two-level fit at k = 1M has about 1,000 centroids and 256 points each; this is a quarter
of that (--k centroids, --n points: as many points per centroid), unit rows in --k groups plus noise. Each seed
fits it with faiss spherical k-means (20 iterations) seeded by AFK-MC2 and by random points; prints the mean
cosine to the nearest centroid (higher is better) and the seconds, side by side in one process.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cluster_job.kmeans import spherical_kmeans


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64000)
    ap.add_argument("--k", type=int, default=250)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--noise", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    groups = rng.standard_normal((a.k, a.d)).astype(np.float32)
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    x = groups[rng.integers(0, a.k, a.n)] + a.noise * rng.standard_normal((a.n, a.d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    out = []
    for seed in a.seeds:
        for init in ("afkmc2", "random"):
            start = time.perf_counter()
            fit = spherical_kmeans(x, a.k, 20, seed, 1, 0, init)
            row = {"init": init, "seed": seed, "mean_cosine": round(fit.objective / a.n, 5),
                   "seconds": round(time.perf_counter() - start, 2), "n": a.n, "k": a.k, "d": a.d}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


if __name__ == "__main__":
    main()
