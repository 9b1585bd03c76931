"""Assignment's nearest-centroid search: faiss's CPU IndexFlatIP against torch's blocked products.

    python benchmarks/bench_assign.py --device cpu  --k 10000   --d 256 --n 20000
    python benchmarks/bench_assign.py --device cuda --k 1000000 --d 768 --n 65536 --faiss-rows 2048

Unit rows and centroids (random directions), one search of --n rows (the assign stage's batch) by
each: faiss's IndexFlatIP on the CPU (the assign stage's index where faiss is a CPU build) on the
first --faiss-rows rows, and cluster_job.nearest.TorchFlatIP on --device (what the stage uses where
faiss sees no GPU and torch sees a CUDA GPU) on all --n rows. Prints rows/s of each, the ratio, and
whether the labels agree on the first 2,048 rows (the ties-free ones: best two centroids more than
1e-5 apart).
"""
from __future__ import annotations

import argparse
import json
import time

import faiss
import numpy as np
import torch

from cluster_job.nearest import TorchFlatIP, block_sizes, score_budget


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--k", type=int, default=10000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--n", type=int, default=20000, help="rows searched at once (assign.batch_size)")
    ap.add_argument("--faiss-rows", type=int, default=None, help="rows faiss searches (default --n)")
    a = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    centroids, x = unit_rows(rng, a.k, a.d), unit_rows(rng, a.n, a.d)
    m = min(a.n, a.faiss_rows or a.n)

    index = faiss.IndexFlatIP(a.d)
    index.add(centroids)
    start = time.perf_counter()
    _, faiss_ids = index.search(x[:m], 1)
    faiss_s = time.perf_counter() - start
    c = min(m, 2048)
    top2, _ = index.search(x[:c], 2)  # untimed: which rows are ties-free

    device = torch.device(a.device)
    search = TorchFlatIP(centroids, device)
    search.search(x[:256], 1)  # kernels, allocator
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    _, ids = search.search(x, 1)  # returns on the host: synchronised
    torch_s = time.perf_counter() - start

    clear = top2[:, 0] - top2[:, 1] > 1e-5
    same = ids[:c, 0][clear] == faiss_ids[:c, 0][clear]
    out = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "k": a.k, "d": a.d, "n": a.n, "faiss_rows": m, "faiss_threads": faiss.omp_get_max_threads(),
           "torch_threads": torch.get_num_threads(),
           "blocks": block_sizes(a.n, a.k, score_budget(device)),
           "faiss_cpu_rows_per_s": round(m / faiss_s, 1), "torch_rows_per_s": round(a.n / torch_s, 1),
           "torch_over_faiss_cpu": round((a.n / torch_s) / (m / faiss_s), 2),
           "labels_equal_on_ties_free_rows": f"{int(same.sum())}/{int(clear.sum())}"}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    main()
