"""Retrieval metrics by exact kNN (faiss), scored as the official Unicom code (deepglint/unicom
`unicom/retrieval.py`) scores them.

- `evaluate(features, dataset, device="auto", dim=None, renormalize=False, cosine=False)` -> {metric: value}
  for an `evaluation.retrieval_sets.RetrievalSet`: `R@K` for the set's customary K and `MAP@R`, or
  `mAP@100` for GLDv2; a split with a name prefixes its metrics (`800/R@1`, `public/mAP@100`).
  Values are fractions in [0, 1]. The protocols, as the official `get_metric` and
  `get_metric_google_landmark`:
  * labelled sets: features L2-normalised, then cut to their first `dim` dimensions (`num_feat`) and
    NOT re-normalised, neighbours by Euclidean distance; `renormalize=True` re-normalises the cut
    features (cosine of the prefix, this project's earlier protocol). At the full dimension both
    rank as cosine similarity.
  * GLDv2: raw dot products of the model's outputs (no normalisation; the first `dim` dimensions);
    `cosine=True` normalises them first.
- `evaluate_dims(features, dataset, dims, renormalize=False)` -> {dim: evaluate(...)} for the paper's
  Fig. 1a; dims larger than the feature are skipped.
- Multi-label sets (labels [n, tags], SCQ's FLICKR25K and NUS-WIDE): a neighbour is relevant when it shares
  any tag with the query (`shared_tag_hits`); R@K and mAP@K, no MAP@R.
- The pieces, usable alone: `normalize`, `truncate`, `knn` (inner product or L2), `index_search`,
  `recall_at_k`, `map_at_r`, `map_at_k` (SCQ's mAP@K), `map_at_100`, `shared_tag_hits`.

Definitions: Recall@K is the fraction of queries with at least one same-class item among their
K nearest gallery items; MAP@R (Musgrave et al. 2020) averages over queries
(1/R) * sum_{i<=R} P(i) rel(i), R being the query's number of same-class gallery items (queries
with R = 0 are left out); GLDv2 mAP@100 averages (1/min(m, 100)) * sum_{i<=100} P(i) rel(i),
m being the query's number of relevant index images. On single-set data each query is removed
from its own gallery. faiss runs on the GPU when `device` allows it and faiss sees one.
"""
from __future__ import annotations

from functools import partial

import faiss
import numpy as np

from unicom_ds.arrays import normalize

GPU_MAX_K = 2048  # faiss' GPU k-selection limit; larger searches run on the CPU
QUERY_CHUNK = 16384  # queries per search call: bounds the [chunk, k] neighbour arrays in memory
_gpu_resources = None


def truncate(x: np.ndarray, dim: int, renormalize: bool = False) -> np.ndarray:
    """Fig. 1a's features: L2-normalised, then the first `dim` dimensions (official `num_feat`: not
    re-normalised, so a prefix keeps its share of the norm); `renormalize` makes each row unit length."""
    x = normalize(np.asarray(x))[:, :dim]
    return normalize(x) if renormalize else x


def use_gpu(device: str, num_gpus: int, k: int) -> bool:
    """faiss on the GPU: asked for (cuda, cuda:N) or allowed (auto), a GPU is visible and k fits its
    limit (a larger k runs on the CPU). cuda without a GPU visible to faiss is an error."""
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device '{device}': expected auto, cpu, cuda or cuda:N")
    if device == "cpu":
        return False
    if num_gpus == 0:
        if device != "auto":
            raise RuntimeError(f"device={device} but faiss sees no GPU (is faiss built with GPU support?)")
        return False
    return k <= GPU_MAX_K


METRICS = ("ip", "l2")


def _index(dim: int, device: str, k: int, metric: str) -> faiss.Index:
    global _gpu_resources
    if metric not in METRICS:
        raise ValueError(f"knn metric '{metric}': expected one of {', '.join(METRICS)}")
    if use_gpu(device, faiss.get_num_gpus(), k):
        if _gpu_resources is None:  # costly to create; one per process
            _gpu_resources = faiss.StandardGpuResources()
        config = faiss.GpuIndexFlatConfig()
        config.device = int(device.split(":")[1]) if ":" in device else 0
        cls = faiss.GpuIndexFlatIP if metric == "ip" else faiss.GpuIndexFlatL2
        return cls(_gpu_resources, dim, config)
    return faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)


def knn(queries: np.ndarray, gallery: np.ndarray, k: int, device: str = "auto",
        exclude_self: bool = False, metric: str = "ip") -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k: (scores [nq, k] float32, gallery rows [nq, k] int64), by inner product (`ip`,
    largest first) or Euclidean distance (`l2`, faiss reports squared distances, smallest first).

    exclude_self: the queries are the gallery's rows 0..nq-1 and row q is removed from query q's
    neighbours (found by identity, so exact duplicates of q are still counted as neighbours).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery, dtype=np.float32)
    k = min(k, len(gallery) - int(exclude_self))
    if k < 1:
        raise ValueError(f"knn: a gallery of {len(gallery)} rows has no neighbours to return")
    index = _index(gallery.shape[1], device, k + int(exclude_self), metric)
    index.add(gallery)
    return index_search(index, queries, k, exclude_self)


def index_search(index: faiss.Index, queries: np.ndarray, k: int,
                 exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of any filled faiss index (flat, PQ, IVF-PQ) in query chunks: (scores [nq, k], rows [nq, k]);
    exclude_self as in knn. Scores are the index's own (similarities, or distances for an L2 index)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    search_k = k + int(exclude_self)
    sims = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, len(queries))
        s, i = index.search(queries[start:stop], search_k)
        if exclude_self:
            s, i = _drop_self(s, i, np.arange(start, stop))
        sims[start:stop], ids[start:stop] = s, i
    return sims, ids


def _drop_self(sims: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # A query is almost always its own first neighbour: drop column 0 (a view, no copy). Other rows
    # (exact duplicates, ties) drop their self-match, or their last column if self was not retrieved.
    out_s, out_i = sims[:, 1:], ids[:, 1:]
    odd = np.flatnonzero(ids[:, 0] != rows)
    if len(odd):
        out_s, out_i = out_s.copy(), out_i.copy()
        keep = ids[odd] != rows[odd, None]
        keep[keep.all(1), -1] = False
        shape = (len(odd), ids.shape[1] - 1)
        out_s[odd] = sims[odd][keep].reshape(shape)
        out_i[odd] = ids[odd][keep].reshape(shape)
    return out_s, out_i


def recall_at_k(hits: np.ndarray, ks) -> dict[int, float]:
    """hits [nq, k] bool: neighbour j of query q has q's class. Fraction with a hit in the first K."""
    first = np.where(hits.any(1), hits.argmax(1), hits.shape[1])
    return {k: float(np.mean(first < k)) for k in ks}


def map_at_r(hits: np.ndarray, r: np.ndarray) -> float:
    """MAP@R from hits [nq, >= max(r)] and each query's number of relevant gallery items r [nq]."""
    r = np.asarray(r)
    keep = r > 0
    hits, r = hits[keep], r[keep]
    if not len(r):
        return float("nan")
    width = int(r.max())
    hits = hits[:, :width].astype(np.float64)
    if hits.shape[1] < width:
        raise ValueError(f"map_at_r: {hits.shape[1]} neighbours given, {width} needed")
    ranks = np.arange(1, width + 1)
    precision = np.cumsum(hits, 1) / ranks
    within = ranks[None, :] <= r[:, None]
    return float(np.mean((precision * hits * within).sum(1) / r))


def map_at_k(hits: np.ndarray, k: int) -> float:
    """mAP@K as SCQ (Wu et al. 2022) and the hashing literature score it: per query, the mean of the
    precision at each relevant position among its top K (none relevant: 0), averaged over all queries.
    hits [nq, >= K] bool, ranked; multi-label sets mark a neighbour relevant when it shares a label."""
    hits = np.asarray(hits)[:, :k].astype(np.float64)
    if hits.shape[1] < k:
        raise ValueError(f"map_at_k: {hits.shape[1]} neighbours given, {k} needed")
    found = hits.sum(1)
    precision = np.cumsum(hits, 1) / np.arange(1, k + 1)
    return float(np.mean(np.where(found > 0, (precision * hits).sum(1) / np.maximum(found, 1), 0.0)))


def map_at_100(ids: np.ndarray, relevant: list[np.ndarray]) -> float:
    """GLDv2 mAP@100 from the ranked gallery rows ids [nq, >=100 or all] and each query's relevant rows."""
    ids = ids[:, :100]
    ranks = np.arange(1, ids.shape[1] + 1)
    total = 0.0
    for row, rel in zip(ids, relevant):
        hit = np.isin(row, rel)
        total += float((np.cumsum(hit) / ranks * hit).sum()) / min(len(rel), 100)
    return total / len(relevant)


def _class_counts(labels: np.ndarray, of: np.ndarray) -> np.ndarray:
    """For each label in `of`, how often it occurs in `labels`."""
    values, counts = np.unique(labels, return_counts=True)
    pos = np.clip(np.searchsorted(values, of), 0, len(values) - 1)
    return np.where(values[pos] == of, counts[pos], 0)


def evaluate_split(features: np.ndarray, labels: np.ndarray, split, ks, device: str = "auto", search=knn,
                   map_k: int | None = None) -> dict[str, float]:
    """Metrics of one `retrieval_sets.Split` from the features of all the set's rows, ready to search.
    `search`: knn's signature, another index behind it (compact codes); `map_k`: also mAP@K (map_at_k)."""
    query = features[split.query]
    if split.relevant is not None:
        _, ids = search(query, features[split.gallery], 100, device)
        # ids are positions in the gallery; relevant rows are rows of the whole set.
        return {"mAP@100": map_at_100(split.gallery[ids], split.relevant)}
    if labels.ndim == 2:  # tags [n, C]: SCQ's multi-label sets
        return _evaluate_multilabel(features, labels, split, ks, device, search, map_k)
    q_labels = labels[split.query]
    width = max(max(ks), map_k or 0)
    if split.gallery is None:
        g_labels = q_labels
        r = _class_counts(q_labels, q_labels) - 1
        map_k = map_k and min(map_k, len(query) - 1)
        _, ids = search(query, query, max(width, int(r.max())), device, exclude_self=True)
    else:
        g_labels = labels[split.gallery]
        r = _class_counts(g_labels, q_labels)
        map_k = map_k and min(map_k, len(split.gallery))
        _, ids = search(query, features[split.gallery], max(width, int(r.max())), device)
    hits = g_labels[ids] == q_labels[:, None]
    out = {f"R@{k}": v for k, v in recall_at_k(hits, ks).items()}
    out["MAP@R"] = map_at_r(hits, r)
    if map_k:
        out[f"mAP@{map_k}"] = map_at_k(hits, map_k)
    return out


def shared_tag_hits(g_tags: np.ndarray, q_tags: np.ndarray) -> np.ndarray:
    """Multi-label relevance as the hashing literature scores it (SCQ's code: query_labels @
    database_labels.T > 0): neighbour j of query q is relevant when they share any tag. g_tags
    [nq, k, C], each query's ranked neighbours' tags, and q_tags [nq, C], 0/1 -> bool [nq, k]."""
    return (np.asarray(g_tags, bool) & np.asarray(q_tags, bool)[:, None, :]).any(-1)


def _evaluate_multilabel(features, tags, split, ks, device, search, map_k) -> dict[str, float]:
    """R@K and mAP@K of a multi-label set (tags [n, C]): a neighbour counts when it shares a tag with the
    query. MAP@R is left out: it needs every query's full count of relevant items."""
    query = features[split.query]
    width = max(max(ks), map_k or 0)
    if split.gallery is None:
        gallery_rows = split.query
        map_k = map_k and min(map_k, len(query) - 1)
        _, ids = search(query, query, width, device, exclude_self=True)
    else:
        gallery_rows = split.gallery
        map_k = map_k and min(map_k, len(gallery_rows))
        _, ids = search(query, features[gallery_rows], width, device)
    g_tags = tags[gallery_rows]
    hits = np.concatenate([shared_tag_hits(g_tags[ids[i:i + 256]], tags[split.query[i:i + 256]])  # [256, k, C]
                           for i in range(0, len(ids), 256)])
    out = {f"R@{k}": v for k, v in recall_at_k(hits, ks).items()}
    if map_k:
        out[f"mAP@{map_k}"] = map_at_k(hits, map_k)
    return out


def evaluate(features: np.ndarray, dataset, device: str = "auto", search=None, map_k: int | None = None,
             dim: int | None = None, renormalize: bool = False, cosine: bool = False) -> dict[str, float]:
    """Every split's metrics of a RetrievalSet from its raw features [len(dataset), d], in the protocols
    of the module docstring. `search` (knn's signature) replaces exact search, e.g. by compact codes;
    it gets the labelled sets' normalised features."""
    if len(features) != len(dataset.paths):
        raise ValueError(f"{dataset.name}: {len(features)} feature rows for {len(dataset.paths)} images")
    features = np.asarray(features, dtype=np.float32)
    dim = dim or features.shape[1]
    prepared = {}  # labelled or GLDv2 -> (features, search), made when a split needs them

    def inputs(relevance: bool):
        if relevance not in prepared:
            if relevance:  # official: torch.einsum of the raw outputs
                x = features[:, :dim]
                prepared[relevance] = (normalize(x) if cosine else x, search or knn)
            else:  # official: normalize, [:, :num_feat], euclidean_distance
                prepared[relevance] = (truncate(features, dim, renormalize), search or partial(knn, metric="l2"))
        return prepared[relevance]

    out = {}
    for name, split in dataset.splits.items():
        x, find = inputs(split.relevant is not None)
        for metric, value in evaluate_split(x, dataset.labels, split, dataset.ks, device, find, map_k).items():
            out[f"{name}/{metric}" if name else metric] = value
    return out


def evaluate_dims(features: np.ndarray, dataset, dims, device: str = "auto", renormalize: bool = False,
                  cosine: bool = False) -> dict[int, dict[str, float]]:
    """evaluate() on the first `dim` dimensions for each dim <= the feature size (the paper's Fig. 1a)."""
    return {d: evaluate(features, dataset, device, dim=d, renormalize=renormalize, cosine=cosine)
            for d in dims if d <= features.shape[1]}
