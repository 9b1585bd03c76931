"""Approximate nearest centroids: an inverted file over the centroids themselves.

The k centroids are grouped into `nlist` lists by k-means of the centroids (about 4 sqrt(k) lists, the
setting measured best in docs/benchmarks.md); a row scores the `nlist` list centres, then only the centroids
of its `nprobe` best lists, instead of all k. At k = 1M that is about 0.8 % of the centroids per row.

The lists are made once per run (RUN/labels/ivf_lists.npy, the list centres; every task and backend derives
the same membership from them: each centroid belongs to its nearest centre), so every task labels alike.
Backends: faiss's IndexIVFFlat (CPU, or GPU where faiss sees one), and `TorchIVF`, the same search as grouped
matrix products on a torch device (rows sorted by list, one product per list, float32) for a CUDA GPU where
faiss is a CPU build. Both return the top-l centroids of each row, nearest first, with their inner products.
"""
from __future__ import annotations

import math

import faiss
import numpy as np
import torch

COARSE_ITERATIONS = 20
COARSE_POINTS_PER_LIST = 64  # centroids sampled per list to train the list centres (faiss subsamples to it)


def default_nlist(k: int) -> int:
    """About 4 sqrt(k) lists, each holding at least one centroid."""
    return max(1, min(k, round(4 * math.sqrt(k))))


def list_centres(centroids: np.ndarray, nlist: int, seed: int, gpu: int = 0) -> np.ndarray:
    """float32 [nlist, d]: spherical k-means of the (unit) centroids into nlist groups."""
    if nlist >= len(centroids):
        return np.ascontiguousarray(centroids, np.float32)
    km = faiss.Kmeans(centroids.shape[1], nlist, niter=COARSE_ITERATIONS, seed=seed, spherical=True,
                      max_points_per_centroid=COARSE_POINTS_PER_LIST, gpu=gpu or False, verbose=False)
    km.train(np.ascontiguousarray(centroids, np.float32))
    return np.ascontiguousarray(km.centroids, np.float32)


def faiss_ivf(centroids: np.ndarray, centres: np.ndarray, nprobe: int, gpu: int = 0) -> faiss.Index:
    """faiss IndexIVFFlat (inner product) over the centroids with the given list centres; search(x, l)."""
    d = centroids.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(np.ascontiguousarray(centres, np.float32))
    index = faiss.IndexIVFFlat(quantizer, d, len(centres), faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True  # the centres are the quantizer's: nothing to train
    index.add(np.ascontiguousarray(centroids, np.float32))  # each centroid into its nearest centre's list
    index.nprobe = min(nprobe, len(centres))
    if gpu:
        return faiss.index_cpu_to_all_gpus(index, ngpu=gpu)
    return index


class TorchIVF:
    """The IVF search of `faiss_ivf` as grouped matrix products on a torch device."""

    def __init__(self, centroids: np.ndarray, centres: np.ndarray, nprobe: int, device: torch.device | str):
        self.device = torch.device(device)
        c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(self.device)
        self.centres = torch.from_numpy(np.ascontiguousarray(centres, np.float32)).to(self.device)
        lists = (c @ self.centres.T).argmax(dim=1)  # the list of each centroid, as faiss's add assigns it
        self.ids = torch.argsort(lists, stable=True)
        self.members = c[self.ids]
        self.offsets = torch.cat([lists.new_zeros(1), torch.bincount(lists, minlength=len(centres)).cumsum(0)])
        self.nprobe = min(nprobe, len(centres))

    def search(self, x: np.ndarray, l: int) -> tuple[np.ndarray, np.ndarray]:
        """(inner products, centroid ids), each [n, l], nearest first (-inf / -1 past a row's probed centroids)."""
        q = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
        n = len(q)
        best = torch.full((n, l), -torch.inf, device=self.device)
        best_ids = torch.full((n, l), -1, dtype=torch.long, device=self.device)
        probes = (q @ self.centres.T).topk(self.nprobe, dim=1).indices  # [n, nprobe]
        rows = torch.arange(n, device=self.device).repeat_interleave(self.nprobe)
        lists = probes.reshape(-1)
        order = torch.argsort(lists, stable=True)
        rows, lists = rows[order], lists[order]
        bounds = torch.searchsorted(lists, torch.arange(len(self.centres) + 1, device=self.device)).tolist()
        starts, ends = self.offsets.tolist()[:-1], self.offsets.tolist()[1:]
        for j, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if a == b or starts[j] == ends[j]:
                continue
            r = rows[a:b]  # each row probes a list once: no row twice here
            scores = q[r] @ self.members[starts[j]:ends[j]].T
            top = scores.topk(min(l, scores.shape[1]), dim=1)
            merged_s = torch.cat([best[r], top.values], dim=1)
            merged_i = torch.cat([best_ids[r], self.ids[starts[j] + top.indices]], dim=1)
            keep = merged_s.topk(l, dim=1).indices
            best[r], best_ids[r] = merged_s.gather(1, keep), merged_i.gather(1, keep)
        return best.cpu().numpy(), best_ids.cpu().numpy()
