"""Nearest centroid by inner product as blocked matrix products on a torch device.

For machines where torch sees a CUDA GPU but faiss is a CPU build (pip's faiss-cpu): the assign
stage's search (faiss.IndexFlatIP, top 1) as blocks of rows x blocks of centroids with a running
max over the centroid blocks, so that the n x k score matrix never exists (1M centroids x 65,536
rows would be 256 GB). Products are float32 as faiss's (torch does not use TF32 for them unless a
program turns it on; nothing here does).
"""
from __future__ import annotations

import numpy as np
import torch

# Scores held at once, in bytes: a quarter of the free memory on a GPU, at most this much.
MAX_SCORE_BYTES = 2 << 30
CPU_SCORE_BYTES = 256 << 20


def nearest_ip(centroids: torch.Tensor, x: torch.Tensor, block_rows: int,
               block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest inner product, index of its centroid) for each row of `x`, computed `block_rows`
    rows x `block_cols` centroids at a time. A tie keeps the lower index."""
    n, k = x.shape[0], centroids.shape[0]
    scores = torch.empty(n, dtype=x.dtype, device=x.device)
    ids = torch.empty(n, dtype=torch.long, device=x.device)
    for a in range(0, n, block_rows):
        q = x[a:a + block_rows]
        best = torch.full((q.shape[0],), -torch.inf, dtype=x.dtype, device=x.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=x.device)
        for c in range(0, k, block_cols):
            value, index = (q @ centroids[c:c + block_cols].T).max(dim=1)
            better = value > best  # strict: a later block must beat an earlier one
            best = torch.where(better, value, best)
            arg = torch.where(better, index + c, arg)
        scores[a:a + block_rows], ids[a:a + block_rows] = best, arg
    return scores, ids


def top_ip(centroids: torch.Tensor, x: torch.Tensor, l: int, block_rows: int,
           block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `l` largest inner products of each row of `x` and their centroids, nearest first, blocked as
    `nearest_ip` (a running top-l merged over the centroid blocks)."""
    n, k = x.shape[0], centroids.shape[0]
    scores = torch.empty(n, l, dtype=x.dtype, device=x.device)
    ids = torch.empty(n, l, dtype=torch.long, device=x.device)
    for a in range(0, n, block_rows):
        q = x[a:a + block_rows]
        best = torch.full((q.shape[0], l), -torch.inf, dtype=x.dtype, device=x.device)
        arg = torch.full((q.shape[0], l), -1, dtype=torch.long, device=x.device)
        for c in range(0, k, block_cols):
            top = (q @ centroids[c:c + block_cols].T).topk(min(l, min(k - c, block_cols)), dim=1)
            merged_s, merged_i = torch.cat([best, top.values], 1), torch.cat([arg, top.indices + c], 1)
            keep = merged_s.topk(l, dim=1).indices
            best, arg = merged_s.gather(1, keep), merged_i.gather(1, keep)
        scores[a:a + block_rows], ids[a:a + block_rows] = best, arg
    return scores, ids


def block_sizes(n: int, k: int, budget_bytes: int) -> tuple[int, int]:
    """(rows, centroids) per block so that one block's float32 scores fit `budget_bytes`: every
    centroid at once when 1,024 rows of them fit, else centroid blocks for 1,024 rows."""
    cells = max(1, budget_bytes // 4)
    cols = min(k, max(1, cells // min(n, 1024)))
    return max(1, min(n, cells // cols)), cols


def score_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(MAX_SCORE_BYTES, free // 4)
    return CPU_SCORE_BYTES


class TorchFlatIP:
    """faiss.IndexFlatIP's `search` (top 1, or top l) for a fixed set of centroids held on a torch device."""

    def __init__(self, centroids: np.ndarray, device: torch.device | str, budget_bytes: int | None = None):
        self.device = torch.device(device)
        self.centroids = torch.from_numpy(np.ascontiguousarray(centroids, np.float32)).to(self.device)
        self.budget = budget_bytes

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(inner products, centroid ids), each [n, k], nearest first, as faiss's `index.search(x, k)`."""
        q = torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(self.device)
        budget = self.budget if self.budget is not None else score_budget(self.device)
        blocks = block_sizes(len(q), len(self.centroids), budget)
        if k == 1:  # a tie keeps the lower index, as faiss's
            scores, ids = nearest_ip(self.centroids, q, *blocks)
            return scores.cpu().numpy()[:, None], ids.cpu().numpy()[:, None]
        scores, ids = top_ip(self.centroids, q, k, *blocks)
        return scores.cpu().numpy(), ids.cpu().numpy()
