"""Linear-probe time: CLIP's coarse-to-fine C search + final refit, against a full 97-point sweep.

Features are synthetic class clusters (Gaussian around random unit centres) of a given size, so the
timing reflects the solver on a probe of that shape; the numbers a real set gives depend on its
features' conditioning too.

    python benchmarks/bench_linear_probe.py --train 10000 --test 5000 --dim 512 --classes 100
    python benchmarks/bench_linear_probe.py --sweep      # also time the brute-force 97-C sweep
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from threadpoolctl import threadpool_info

from evaluation.linear_probe import fit, held_out_split, linear_probe, top1


def clusters(n: int, centres: np.ndarray, noise: float, rng) -> tuple[np.ndarray, np.ndarray]:
    classes, dim = centres.shape
    y = rng.integers(0, classes, n)
    return centres[y] + noise * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim), y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=10000)
    ap.add_argument("--test", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--noise", type=float, default=4.0)
    ap.add_argument("--max-iter", type=int, default=1000)
    ap.add_argument("--sweep", action="store_true", help="also time the 97-point brute-force sweep")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    xtr, ytr = clusters(args.train, centres, args.noise, rng)
    xte, yte = clusters(args.test, centres, args.noise, rng)

    start = time.perf_counter()
    result = linear_probe(xtr, ytr, xte, yte, max_iter=args.max_iter)
    probe_s = time.perf_counter() - start
    out = {"shape": vars(args), "cpu_count": os.cpu_count(),
           "blas_threads": sum(i.get("num_threads", 0) for i in threadpool_info()),
           "probe_seconds": round(probe_s, 2), "C": result["C"], "top1": result["top1"]}
    if args.sweep:
        fit_idx, val_idx = held_out_split(ytr, 0.2, 0)
        start = time.perf_counter()
        scores = {e: top1(ytr[val_idx], fit(xtr[fit_idx], ytr[fit_idx], 10.0 ** e, args.max_iter)
                          .predict(xtr[val_idx])) for e in np.arange(-48, 49) / 8}
        out["sweep_97_seconds"] = round(time.perf_counter() - start, 2)
        best = max(scores.values())
        out["sweep_best_log10C"] = float(min(e for e, s in scores.items() if s == best))
        out["search_log10C"] = float(np.log10(result["C"]))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
