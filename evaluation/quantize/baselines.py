"""faiss product quantisers at a bit budget: IndexPQ, OPQ + PQ and IVF-PQ, all searched by asymmetric
distance (float query against the gallery's codes), on inner product over L2-normalised features as the
eval stage's exact search (`evaluation.metrics.knn`). faiss does all the quantising; this module only
names the index and times it.

A budget of `bits` per vector with `nbits`-bit sub-quantisers is M = bits / nbits sub-spaces of 2^nbits
centroids each (PQ M x nbits): 32 bits = PQ8x4 or PQ4x8.
"""
from __future__ import annotations

import time

import faiss
import numpy as np

from evaluation.metrics import index_search

METHODS = ("pq", "opq", "ivfpq")


def subquantisers(bits: int, nbits: int) -> int:
    if bits % nbits:
        raise ValueError(f"a {bits}-bit code cannot be split into {nbits}-bit sub-quantisers")
    return bits // nbits


def factory(method: str, dim: int, bits: int, nbits: int, nlist: int = 0) -> str:
    """The faiss index_factory string of `method` at `bits` per vector."""
    m = subquantisers(bits, nbits)
    if dim % m:
        raise ValueError(f"{method} at {bits} bits: {m} sub-quantisers do not divide the feature dimension {dim}")
    pq = f"PQ{m}x{nbits}"
    if method == "pq":
        return pq
    if method == "opq":
        return f"OPQ{m},{pq}"
    if method == "ivfpq":
        if nlist < 1:
            raise ValueError(f"ivfpq needs nlist >= 1, got {nlist}")
        return f"IVF{nlist},{pq}"
    raise ValueError(f"unknown quantiser '{method}'; known: {', '.join(METHODS)}")


def default_nlist(n_train: int) -> int:
    """The usual sqrt rule, kept to lists faiss can train from `n_train` points (39 per list)."""
    return max(1, min(int(4 * np.sqrt(n_train)), n_train // 39))


def train(method: str, train_x: np.ndarray, bits: int, nbits: int, nlist: int = 0) -> faiss.Index:
    """A trained, empty index of `method` (inner product) from the rows of `train_x` (L2-normalised).
    faiss seeds its k-means (and OPQ's rotation) with fixed seeds: the same rows give the same index."""
    x = np.ascontiguousarray(train_x, dtype=np.float32)
    if len(x) < 2 ** nbits:
        raise ValueError(f"{method} {bits} bits: {len(x)} training vectors for {2 ** nbits} centroids per sub-space")
    index = faiss.index_factory(x.shape[1], factory(method, x.shape[1], bits, nbits, nlist), faiss.METRIC_INNER_PRODUCT)
    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
    # Small sets: faiss warns (per k-means call, dozens with OPQ) below 39 points per centroid; the caller
    # reports it once (few_points).
    inner.pq.cp.min_points_per_centroid = 1
    if hasattr(inner, "do_polysemous_training"):  # the factory turns it on for 8-bit PQ: minutes, unused here
        inner.do_polysemous_training = False
    if method == "opq":  # rotate for the code actually stored (OPQ alone would train an M x 8-bit PQ)
        faiss.downcast_VectorTransform(index.chain.at(0)).pq = inner.pq
    index.train(x)
    return index


def few_points(n_train: int, nbits: int) -> bool:
    """Fewer training rows than faiss' rule of thumb (39 per centroid) for 2^nbits centroids."""
    return n_train < 39 * 2 ** nbits


def filled(index: faiss.Index, gallery: np.ndarray) -> faiss.Index:
    """A copy of the trained `index` holding the codes of `gallery`."""
    out = faiss.clone_index(index)
    out.add(np.ascontiguousarray(gallery, dtype=np.float32))
    return out


def code_bytes(index: faiss.Index) -> int:
    """Bytes of one stored vector's code (IVF: the list id is implied by the list, not stored per code)."""
    return int(index.sa_code_size()) if not isinstance(index, faiss.IndexIVF) else int(index.code_size)


def searcher(index: faiss.Index):
    """A `search(queries, gallery, k, device, exclude_self)` (metrics.knn's signature) that codes the
    gallery with the trained `index` and searches it by ADC, for `metrics.evaluate(..., search=...)`."""
    def search(queries, gallery, k, device="auto", exclude_self=False):
        k = min(k, len(gallery) - int(exclude_self))
        return index_search(filled(index, gallery), queries, k, exclude_self)
    return search


def ms_per_query(index: faiss.Index, queries: np.ndarray, k: int, repeat: int = 3) -> float:
    """Best-of-`repeat` wall time of searching all `queries` (one batch), per query, in milliseconds."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        index.search(q, k)
        best = min(best, time.perf_counter() - start)
    return 1000 * best / max(1, len(q))


def neighbour_recall(found: np.ndarray, exact: np.ndarray) -> float:
    """Fraction of the exact top-k neighbours (rows [nq, k]) that `found` [nq, k] retrieves."""
    k = exact.shape[1]
    return float(np.mean([len(set(f[:k]) & set(e)) / k for f, e in zip(found, exact)]))


def nprobe_sweep(index: faiss.Index, queries: np.ndarray, exact: np.ndarray, nprobes) -> dict[int, dict]:
    """IVF-PQ's recall/speed trade-off: per nprobe, the recall of the exact top-k (`exact` [nq, k] rows
    of the flat search) and the search time per query."""
    ivf = faiss.extract_index_ivf(index)
    out = {}
    for p in nprobes:
        ivf.nprobe = int(min(p, ivf.nlist))
        _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), exact.shape[1])
        out[int(p)] = {"recall": neighbour_recall(ids, exact),
                       "ms_per_query": ms_per_query(index, queries, exact.shape[1])}
    return out
