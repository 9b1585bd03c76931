"""Assign's IVF search over the centroids against exact search: agreement and speed, side by side.

    python benchmarks/bench_assign_ivf.py --k 4096 16384 65536 --d 512 --n 20000 --nprobe 4 8 16 32 64
    python benchmarks/bench_assign_ivf.py --device cuda --k 1000000 --n 65536 --nprobe 8 32   # the GPU path

Data (--data): `topics`, centroids grouped in topics as k-means leaves them on web data, rows between two centroids
of a topic; `sphere`, centroids uniform on a low-dimensional sphere (--intrinsic) with rows moved from them by
--noise times the centroid spacing: no structure for the lists to follow and many rows at a border, the hard case.
For each k: the IVF lists (nlist ~ 4 sqrt(k),
cluster_job.centroid_ivf) are made once, then exact search (faiss IndexFlatIP, every centroid) and the IVF
search at each nprobe label the same --n rows in the same process; prints, per nprobe, the share of rows whose
nearest centroid equals exact search's, the share of exact top-8 found, and the speed-up over exact search.
"""
from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np

from cluster_job import centroid_ivf
from cluster_job.nearest import TorchFlatIP


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sphere(rng: np.random.Generator, k: int, d: int, n: int, intrinsic: int, noise: float
           ) -> tuple[np.ndarray, np.ndarray]:
    """Centroids uniform on a sphere of `intrinsic` dimensions inside the d-dimensional space; each row a random
    centroid moved, within that sphere, by `noise` times the median distance between neighbouring centroids."""
    basis = np.linalg.qr(rng.standard_normal((d, intrinsic)))[0].T  # [intrinsic, d], orthonormal rows
    inner = unit(rng.standard_normal((k, intrinsic)))
    probe = inner[:1000]
    sims = probe @ inner.T
    sims[np.arange(len(probe)), np.arange(len(probe))] = -1
    spacing = float(np.median(np.sqrt(np.maximum(0, 2 - 2 * sims.max(axis=1)))))
    rows = unit(inner[rng.integers(0, k, n)] + noise * spacing * unit(rng.standard_normal((n, intrinsic))))
    return unit(inner @ basis), unit(rows @ basis)


def topics(rng: np.random.Generator, k: int, d: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids grouped in k / 64 topics (each its topic plus 0.6 x a random unit vector); each row between a
    random centroid and another of its topic (weight uniform in [0, 1/2]) plus 0.3 x a random unit vector."""
    topic = rng.integers(0, max(1, k // 64), k)
    centres = unit(rng.standard_normal((max(1, k // 64), d)))
    centroids = unit(centres[topic] + 0.6 * unit(rng.standard_normal((k, d))))
    a = rng.integers(0, k, n)
    order = np.argsort(topic, kind="stable")  # the centroids of topic t: order[starts[t]:starts[t + 1]]
    starts = np.concatenate([[0], np.cumsum(np.bincount(topic, minlength=len(centres)))])
    lo, hi = starts[topic[a]], starts[topic[a] + 1]
    b = order[lo + (rng.random(n) * (hi - lo)).astype(np.int64)]
    w = rng.uniform(0, 0.5, (n, 1))
    return centroids, unit((1 - w) * centroids[a] + w * centroids[b] + 0.3 * unit(rng.standard_normal((n, d))))


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--l", type=int, default=8, help="top-l compared as a set")
    ap.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--data", choices=("topics", "sphere"), default="topics")
    ap.add_argument("--device", default="cpu", help="cpu: faiss (flat, IVFFlat); cuda: torch (TorchFlatIP, TorchIVF)")
    ap.add_argument("--intrinsic", type=int, default=32, help="sphere: dimension of the sphere the data lies on")
    ap.add_argument("--noise", type=float, default=1.0, help="sphere: rows around their centroid, in spacings")
    a = ap.parse_args(argv)
    results = []
    for k in a.k:
        rng = np.random.default_rng(k)
        centroids, rows = (topics(rng, k, a.d, a.n) if a.data == "topics" else
                           sphere(rng, k, a.d, a.n, a.intrinsic, a.noise))
        if a.device == "cpu":
            flat = faiss.IndexFlatIP(a.d)
            flat.add(centroids)
        else:  # where faiss is a CPU build: the assign stage's torch searches on the GPU
            flat = TorchFlatIP(centroids, a.device)
            flat.search(rows[:256], a.l)  # kernels, allocator
        (_, exact), exact_s = timed(lambda: flat.search(rows, a.l))
        nlist = centroid_ivf.default_nlist(k)
        centres, lists_s = timed(lambda: centroid_ivf.list_centres(centroids, nlist, seed=0))
        for nprobe in a.nprobe:
            index = (centroid_ivf.faiss_ivf(centroids, centres, nprobe) if a.device == "cpu" else
                     centroid_ivf.TorchIVF(centroids, centres, nprobe, a.device))
            index.search(rows[:256], a.l)  # warm-up
            (_, ids), ivf_s = timed(lambda: index.search(rows, a.l))
            found = np.mean([len(set(g) & set(w)) / a.l for g, w in zip(ids.tolist(), exact.tolist())])
            out = {"device": a.device, "k": k, "d": a.d, "n": a.n, "data": a.data if a.data == "topics" else f"sphere{a.intrinsic}x{a.noise:g}", "nlist": nlist, "nprobe": nprobe,
                   "top1_agreement": round(float((ids[:, 0] == exact[:, 0]).mean()), 4),
                   f"top{a.l}_recall": round(float(found), 4),
                   "speedup_over_exact": round(exact_s / ivf_s, 2), "exact_rows_per_s": round(a.n / exact_s),
                   "ivf_rows_per_s": round(a.n / ivf_s), "lists_s": round(lists_s, 1),
                   "threads": faiss.omp_get_max_threads()}
            print(json.dumps(out), flush=True)
            results.append(out)
    return results


if __name__ == "__main__":
    main()
