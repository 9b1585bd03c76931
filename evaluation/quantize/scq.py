"""SCQ, self-supervised consistent quantisation (Wu et al. 2022, arXiv 2206.09806), as a head on frozen
backbone features, written from the paper and the authors' code (cazhang/sscq).

The head projects a feature to M sub-vectors of `sub_dim` and soft-quantises each against its codebook of
K codewords (softmax of -squared distance / tau_sq). Trained on two augmented views of each image with:

- part consistency: `part_neighbour` (each sub-space's top neighbours made more likely than the rest) and
  `codeword_diversity` (the batch's mean codeword assignment kept near uniform: its negative entropy);
- global consistency: `instance_contrastive` on the embeddings and on the quantised vectors (NT-Xent), and
  `fused_consistency` (symmetric KL between the two views' similarity distributions over the fused
  embedding + quantised vector).

Every loss is a pure function of the head's outputs; `loss_terms` weighs them from the config keys. The hard
code of a vector is its nearest codeword per sub-space (the soft assignment's argmax); `to_faiss` puts the
codebooks and codes into a faiss IndexPQ (L2, searched by ADC with the projected query).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unicom_ds.atomic import atomic_path
from unicom_ds.objectives import Objective as TrainerObjective

from evaluation.metrics import index_search


class SCQHead(nn.Module):
    """Projection (MLP to books x sub_dim, as the authors' Projection_Head; `hidden=0`: one bias-free linear
    map, what `from_opq` starts from) and M codebooks of K codewords."""

    def __init__(self, in_dim: int, books: int, words: int, sub_dim: int, hidden: int = 512, tau_sq: float = 0.2):
        super().__init__()
        self.books, self.words, self.sub_dim, self.tau_sq, self.hidden = books, words, sub_dim, tau_sq, hidden
        if hidden:
            self.proj = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                                      nn.Linear(hidden, books * sub_dim))
            nn.init.normal_(self.proj[0].weight, 0, 0.01)
            nn.init.xavier_uniform_(self.proj[2].weight)
        else:
            self.proj = nn.Linear(in_dim, books * sub_dim, bias=False)
        self.codebooks = nn.Parameter(torch.empty(books, words, sub_dim))
        nn.init.xavier_uniform_(self.codebooks.view(books * words, sub_dim))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """f: the embedding [B, M*d]; z: its soft quantisation [B, M*d]; cos: cosine of each sub-vector with
        each codeword of its book [B, M, K] (what codeword diversity is measured on)."""
        f = self.project(x)
        z, _ = soft_quantize(f, self.codebooks, self.tau_sq)
        parts = F.normalize(f.view(len(f), self.books, self.sub_dim), dim=-1)
        cos = torch.einsum("bmd,mkd->bmk", parts, F.normalize(self.codebooks, dim=-1))
        return {"f": f, "z": z, "cos": cos}


def from_opq(index: faiss.Index, tau_sq: float) -> SCQHead:
    """A linear head equal to a trained OPQ + PQ index (`baselines.train("opq", ...)`): OPQ's rotation as the
    projection, the PQ centroids as the codebooks, so its hard codes are the index's codes. SCQ's losses then
    start from OPQ instead of a random MLP (docs/benchmarks.md "Compact codes": from scratch the head stays
    below OPQ on digits)."""
    rotation = faiss.downcast_VectorTransform(index.chain.at(0))
    pq = faiss.downcast_index(index.index).pq
    head = SCQHead(rotation.d_in, pq.M, pq.ksub, pq.dsub, hidden=0, tau_sq=tau_sq)
    with torch.no_grad():
        head.proj.weight.copy_(torch.from_numpy(faiss.vector_to_array(rotation.A).reshape(rotation.d_out, rotation.d_in)))
        head.codebooks.copy_(torch.from_numpy(faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)))
    return head


def sub_distances(f: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Squared distance of each sub-vector of f [B, M*d] to each codeword of its book: [B, M, K]."""
    books, _, d = codebooks.shape
    parts = f.view(len(f), books, d)
    return ((parts.unsqueeze(2) - codebooks.unsqueeze(0)) ** 2).sum(-1)


def soft_quantize(f: torch.Tensor, codebooks: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [B, M*d], assignment [B, M, K]): each sub-vector replaced by the softmax(-distance / tau)-weighted
    mean of its book's codewords."""
    assign = torch.softmax(-sub_distances(f, codebooks) / tau, dim=-1)
    z = torch.einsum("bmk,mkd->bmd", assign, codebooks)
    return z.reshape(len(f), -1), assign


def _others(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities of the 2B rows [a; b]: (each row with its other view [2B], each row with the
    2B - 2 rows that are neither itself nor its other view [2B, 2B - 2], in row order)."""
    x = F.normalize(torch.cat([a, b]), dim=1)
    sim = x @ x.T
    n = len(a)
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(a.device)
    keep = torch.ones_like(sim, dtype=torch.bool)
    keep[torch.arange(2 * n), torch.arange(2 * n)] = False
    keep[torch.arange(2 * n), pair] = False
    return sim[torch.arange(2 * n), pair], sim[keep].view(2 * n, 2 * n - 2)


def instance_contrastive(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent over the 2B rows of two views: each row's other view against the 2B - 2 other rows."""
    pos, neg = _others(a, b)
    logits = torch.cat([pos[:, None], neg], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=a.device))


def part_neighbour(za: torch.Tensor, zb: torch.Tensor, books: int, top: int, tau: float) -> torch.Tensor:
    """Per sub-space, -log of the share of each row's `top` nearest other rows in its softmax(sim / tau)
    over all 2B - 2 other rows (self and other view left out, as the authors' default); mean over books."""
    total = za.new_zeros(())
    for a, b in zip(za.chunk(books, dim=1), zb.chunk(books, dim=1)):
        _, neg = _others(a, b)
        ranked = neg.sort(dim=1, descending=True).values / tau
        total = total + (torch.logsumexp(ranked, 1) - torch.logsumexp(ranked[:, :top], 1)).mean()
    return total / books


def codeword_diversity(cos_a: torch.Tensor, cos_b: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Negative entropy of each book's codeword distribution averaged over the batch (softmax over the
    codewords of the cosines [B, M, K], both views), mean over books: minimised, it spreads the codes."""
    p = torch.softmax(torch.cat([cos_a, cos_b]), dim=-1).mean(0)  # [M, K]
    return (p * torch.log(p + eps)).sum(-1).mean()


def fused_consistency(fa: torch.Tensor, fb: torch.Tensor, za: torch.Tensor, zb: torch.Tensor,
                      tau: float) -> torch.Tensor:
    """Symmetric KL between view a's and view b's distributions softmax(sim / tau) over the other images,
    similarities of the fused vectors f + z (the authors' `sum` fusion)."""
    _, neg = _others(fa + za, fb + zb)
    n = len(fa)
    log_p, log_q = F.log_softmax(neg[:n] / tau, 1), F.log_softmax(neg[n:] / tau, 1)
    kl_pq = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")  # KL(p || q)
    kl_qp = F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")
    return 0.5 * (kl_pq + kl_qp)


def loss_terms(out_a: dict, out_b: dict, c: Any, books: int) -> dict[str, torch.Tensor]:
    """The weighted terms (weights and temperatures from the quantize.scq keys `c`); 'loss' is their sum."""
    terms = {
        "ic_embedding": float(c.w_ic_embedding) * instance_contrastive(out_a["f"], out_b["f"], float(c.tau_ic)),
        "ic_quantised": float(c.w_ic_quantised) * instance_contrastive(out_a["z"], out_b["z"], float(c.tau_ic)),
        "fused": float(c.w_fused) * fused_consistency(out_a["f"], out_b["f"], out_a["z"], out_b["z"],
                                                      float(c.tau_fused)),
        "part_neighbour": float(c.w_part_neighbour) * part_neighbour(out_a["z"], out_b["z"], books,
                                                                     int(c.top_neighbours), float(c.tau_pn)),
        "diversity": float(c.w_diversity) * codeword_diversity(out_a["cos"], out_b["cos"]),
    }
    terms["loss"] = sum(terms.values())
    return terms


class Encoder(nn.Module):
    """Backbone and head trained together (the method scq_e2e): images -> the backbone's
    L2-normalised features (what the frozen path caches) -> the head's outputs."""

    def __init__(self, backbone: nn.Module, head: SCQHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.head(F.normalize(self.backbone(images), dim=-1))


class Objective(TrainerObjective):
    """The Trainer's objective (unicom_ds.objectives): the head trained on two views per row
    (evaluation.quantize.pairs) by `loss_terms`, exported as the head's file (state dict and shape) at `path`.

    With a `backbone` (end to end), the engine trains `Encoder(backbone, head)` on images, the backbone's
    parameter groups at lr x `backbone_lr_mult`, and the file also holds the backbone's state dict."""

    def __init__(self, head: SCQHead, c: Any, path: Path, in_dim: int, backbone: nn.Module | None = None,
                 backbone_name: str = ""):
        self.head, self.backbone, self.c, self.path = head, backbone, c, Path(path)
        self.model = head if backbone is None else Encoder(backbone.train().requires_grad_(True), head)
        self.shape = {"in_dim": in_dim, "books": head.books, "words": head.words, "sub_dim": head.sub_dim,
                      "hidden": head.hidden, "tau_sq": head.tau_sq}
        self.name = "scq-head:" + ",".join(f"{k}={v}" for k, v in self.shape.items())
        if backbone is not None:
            self.name += f",backbone={backbone_name}"

    def param_groups(self, weight_decay: float) -> list[dict]:
        from unicom_ds.backbone import param_groups
        groups = param_groups(self.head, weight_decay)
        if self.backbone is not None:
            mult = float(self.c.backbone_lr_mult)
            groups += [{**g, "lr_mult": mult, "name": "backbone"} for g in param_groups(self.backbone, weight_decay)]
        return groups

    def loss(self, model, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        a, b = batch
        out = model(torch.cat([a, b]))  # one forward through the engine for both views (no batch statistics)
        terms = loss_terms({k: v[:len(a)] for k, v in out.items()}, {k: v[len(a):] for k, v in out.items()},
                           self.c, self.head.books)
        return terms.pop("loss"), terms

    def export(self, state: dict[str, torch.Tensor], ckpt: Path, step: int) -> Path:
        saved = {"state_dict": state, **self.shape}
        if self.backbone is not None:  # the Encoder's keys: head.*, backbone.*
            saved = {**saved, "state_dict": _prefixed(state, "head."), "backbone": _prefixed(state, "backbone.")}
        with atomic_path(self.path) as tmp:
            torch.save(saved, tmp)
        return self.path

    @staticmethod
    def load(path: Path) -> SCQHead:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        head = SCQHead(saved["in_dim"], saved["books"], saved["words"], saved["sub_dim"], saved["hidden"],
                       saved["tau_sq"])
        head.load_state_dict(saved["state_dict"])
        return head.eval()

    @staticmethod
    def load_backbone(path: Path, backbone: nn.Module) -> nn.Module:
        """`backbone` (the model trained from, as loaded) with the end-to-end trained weights of `path`."""
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if "backbone" not in saved:
            raise ValueError(f"{path}: an SCQ head trained on a frozen backbone holds no backbone weights")
        backbone.load_state_dict(saved["backbone"])
        return backbone.eval()


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@torch.no_grad()
def embed(head: SCQHead, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """The projected embeddings f [n, M*d] (what is coded, and the query side of ADC)."""
    device = head.codebooks.device
    t = torch.as_tensor(np.ascontiguousarray(x, dtype=np.float32))
    return torch.cat([head.project(t[i:i + batch].to(device)).cpu() for i in range(0, len(t), batch)]
                     ).numpy() if len(t) else np.zeros((0, head.books * head.sub_dim), np.float32)


@torch.no_grad()
def hard_codes(head: SCQHead, f: np.ndarray) -> np.ndarray:
    """Each sub-vector's nearest codeword (the argmax of its soft assignment): int64 [n, M]."""
    d = sub_distances(torch.as_tensor(f), head.codebooks.detach().cpu())
    return d.argmin(-1).numpy()


ADC = ("squared", "plain")  # quantize.scq.adc


@torch.no_grad()
def adc_search(head: SCQHead, queries_f: np.ndarray, codes: np.ndarray, k: int,
               adc: str = "squared") -> tuple[np.ndarray, np.ndarray]:
    """The head's own asymmetric distance search: per query, a table of the distances of its sub-vectors
    to every codeword, summed over the database's codes; (distances, rows) of the k nearest. `squared`:
    squared Euclidean per sub-space (what faiss' IndexPQ sums); `plain`: Euclidean, not squared, as the
    authors' evaluation (cazhang/sscq `pqDist_one`) sums it."""
    if adc not in ADC:
        raise ValueError(f"quantize.scq.adc={adc!r}: expected one of {', '.join(ADC)}")
    table = sub_distances(torch.as_tensor(queries_f), head.codebooks.detach().cpu())  # [nq, M, K]
    if adc == "plain":
        table = table.clamp_min(0).sqrt()
    idx = torch.as_tensor(codes).T  # [M, n]
    dist = sum(table[:, m, idx[m]] for m in range(head.books))  # [nq, n]
    d, i = torch.topk(dist, k, dim=1, largest=False)
    return d.numpy(), i.numpy()


class CodeSearch:
    """A coded database searched by `adc_search`, with faiss' `search(queries, k)` so that
    metrics.index_search can drive it (in query chunks, the query itself left out)."""

    def __init__(self, head: SCQHead, codes: np.ndarray, adc: str):
        self.head, self.codes, self.adc = head, codes, adc

    CHUNK = 256  # queries per distance table: bounds the [chunk, database] distance matrix

    def search(self, queries_f: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.codes))
        parts = [adc_search(self.head, queries_f[i:i + self.CHUNK], self.codes, k, self.adc)
                 for i in range(0, len(queries_f), self.CHUNK)]
        return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


def pack_codes(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Codes [n, M] in faiss' PQ layout: code m at bits m*nbits.. of the row, least significant bit first."""
    shifts = np.arange(nbits)
    bits = ((codes[:, :, None] >> shifts) & 1).reshape(len(codes), -1).astype(np.uint8)
    return np.packbits(bits, axis=1, bitorder="little")


def to_faiss(head: SCQHead, codes: np.ndarray) -> faiss.IndexPQ:
    """A faiss IndexPQ (L2) with the head's codebooks as its PQ centroids, holding `codes` [n, M]."""
    books, words, d = head.codebooks.shape
    nbits = int(np.log2(words))
    if 2 ** nbits != words:
        raise ValueError(f"{words} codewords per book: faiss PQ needs a power of two")
    index = faiss.IndexPQ(books * d, books, nbits, faiss.METRIC_L2)
    # faiss' centroid table is (M, ksub, dsub), row-major: the head's codebooks as they are.
    faiss.copy_array_to_vector(head.codebooks.detach().cpu().numpy().astype(np.float32).ravel(), index.pq.centroids)
    index.is_trained = True
    index.add_sa_codes(pack_codes(np.asarray(codes, dtype=np.int64), nbits))
    return index


def searcher(head: SCQHead, adc: str = "squared"):
    """metrics.knn's signature over the head: the gallery (backbone features) projected and hard-coded
    into the exported faiss IndexPQ, the projected queries searched by ADC (`adc`: see adc_search; the
    plain sum is the head's own exhaustive search, faiss has no such metric)."""
    if adc not in ADC:
        raise ValueError(f"quantize.scq.adc={adc!r}: expected one of {', '.join(ADC)}")

    def search(queries, gallery, k, device="auto", exclude_self=False):
        k = min(k, len(gallery) - int(exclude_self))
        codes = hard_codes(head, embed(head, gallery))
        index = to_faiss(head, codes) if adc == "squared" else CodeSearch(head, codes, adc)
        return index_search(index, embed(head, queries), k, exclude_self)
    return search
