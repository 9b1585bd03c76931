"""MLCD's multi-label loss over the class-sharded prototype matrix (issue 25, item 2).

The train stage uses it with loss.kind=mlcd (issue 25, item 3: `objectives.prototype_layer`), on RUN/labels/S.topl.npy.

MLCD (An et al., "Multi-label Cluster Discrimination for Visual Representation Learning", ECCV 2024,
arXiv 2407.17331) gives each image its l nearest cluster centres as positive labels (the assign stage
writes them as RUN/labels/S.topl.npy, [n, l], nearest first) and trains with a multi-label loss that,
in the paper's words, separates the losses of the positive classes from those of the negative
classes. The loss here, per image i with positive classes P_i and sampled negative classes N_i, is

    L_i = log(1 + sum_{j in N_i} exp(s * cos_ij)) + log(1 + sum_{p in P_i} exp(-s * (cos_ip - m)))

and the layer returns the mean of L_i over the global batch. Where the formula comes from: the
method section of the paper could not be read from this machine (the search tool reached only its
abstract and introduction), so this is the standard two-sided log-sum-exp form the issue names as
the fallback (the multi-label "softmax + cross-entropy" generalisation, Circle-loss style, with an
additive cosine margin m on the positives); the paper's exact margin placement and its choice of l
(the issue believes 8) are not verified here. `margin_kind="angular"` puts ArcFace's angular
margin on the positives instead, -s * cos(theta_ip + m); with l = 1 that shares every logit with
`ShardedPrototypes`' loss, and the two are related exactly by (see `single_label_gap`)

    L_mlcd = L_arcface + log(1 + (1 + N * P) / (N + P)),  N = sum_j exp(s cos_j), P = exp(s cos(theta_y + m)),

so MLCD with one label is always above the softmax loss and never equal to it.
"""
from __future__ import annotations

import torch

from unicom_ds.dist import all_reduce_
from unicom_ds.margin import add_angle, cosine
from unicom_ds.prototypes import ShardedPrototypes

MARGIN_KINDS = ("additive", "angular")


class _TwoSidedLogSumExp(torch.autograd.Function):
    """[mean over rows of log(1 + sum_neg exp(z)), mean over rows of log(1 + sum_pos exp(z))], columns split
    over ranks.

    `z` [n, c] holds this rank's columns; `pos` [n, c] marks each row's positive columns, `live` [c]
    (or None: all) the columns that take part at all, so a row's negatives are live & ~pos. The two
    maxima and the two sums are each all-reduced in one collective, so every rank returns the same
    loss and never sees another rank's logits; the "1" of each term enters once, after the sum.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, pos: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        neg = ~pos if live is None else (~pos) & live
        # NaN stays NaN through amax and exp, so a NaN logit makes the loss NaN on every rank.
        ninf = float("-inf")
        top = torch.stack([torch.where(neg, z, ninf).amax(1), torch.where(pos, z, ninf).amax(1)]).clamp_min(0.0)
        all_reduce_(top, "max")
        mine = pos | neg
        weights = (z - torch.where(pos, top[1][:, None], top[0][:, None])).exp_().masked_fill_(~mine, 0.0)
        sums = torch.stack([(weights * neg).sum(1), (weights * pos).sum(1)])
        all_reduce_(sums)
        sums.add_((-top).exp())  # the 1 inside each log, once across ranks
        lse = top + sums.log()
        weights.div_(torch.where(pos, sums[1][:, None], sums[0][:, None]))
        ctx.save_for_backward(weights, pos)
        return lse.mean(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        weights, pos = ctx.saved_tensors
        return weights * (torch.where(pos, grad[1], grad[0]) / weights.shape[0]), None, None


def two_sided_terms(z: torch.Tensor, pos: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """[mean_i log(1 + sum_{j neg} exp(z_ij)), mean_i log(1 + sum_{j pos} exp(z_ij))] over column-sharded `z`."""
    return _TwoSidedLogSumExp.apply(z, pos, live)


def two_sided_logsumexp(z: torch.Tensor, pos: torch.Tensor, live: torch.Tensor | None = None) -> torch.Tensor:
    """mean_i [log(1 + sum_{j neg} exp(z_ij)) + log(1 + sum_{j pos} exp(z_ij))] over column-sharded `z`."""
    return two_sided_terms(z, pos, live).sum()


def single_label_gap(neg_sum: torch.Tensor, pos_exp: torch.Tensor) -> torch.Tensor:
    """log(1 + (1 + N P) / (N + P)): MLCD's loss (angular margin, l = 1) minus the softmax loss, per row."""
    return torch.log1p((1 + neg_sum * pos_exp) / (neg_sum + pos_exp))


class MLCDPrototypes(ShardedPrototypes):
    """MLCD's multi-label loss over `ShardedPrototypes`' class-sharded matrix, r1 and r2 included.

    `forward(embeddings [B, d], labels [B, l])` takes the local batch and up to l global class ids per
    image (int64; -1 pads a missing positive and is ignored; a class repeated in a row counts once).
    Embeddings and labels are gathered over ranks; each rank scores the global batch against its
    selected prototypes and the loss (module docstring) is reduced across ranks by one max and one
    sum all-reduce, the same value on every rank. r1 keeps every positive of every image of the
    global batch that falls in this rank's block (room for B_global * l of them, or `max_positives`)
    and fills up with random negatives to ceil(r1 * block); a row's negatives are the selected classes
    that are not its positives. r2, initialisation, checkpoint state, `advance()`, `selected`,
    `device_stats` and the label checks behave as in `ShardedPrototypes` (no host syncs on an
    accelerator: a bad label makes the loss NaN and `check_labels()` raises). A NaN embedding makes
    the loss NaN. Rows without any positive contribute their negative term only. `terms` holds the last
    forward's two terms (loss_negative, loss_positive; detached, on the device), which the train stage
    logs beside the loss.
    """

    def __init__(self, num_classes: int, embed_dim: int, r1: float = 0.1, r2: float = 1.0,
                 margin: float = 0.3, scale: float = 64.0, seed: int = 0, margin_kind: str = "additive",
                 margin_grad: str = "exact", max_positives: int | None = None, equal_batches: bool = False):
        super().__init__(num_classes, embed_dim, r1=r1, r2=r2, margin=margin, scale=scale, seed=seed,
                         margin_grad=margin_grad, max_positives=max_positives, equal_batches=equal_batches)
        if margin_kind not in MARGIN_KINDS:
            raise ValueError(f"margin_kind={margin_kind!r}: expected one of {', '.join(MARGIN_KINDS)}")
        self.margin_kind = margin_kind

    LABELS = "[batch, l]"
    LOWEST_LABEL = -1  # pads a missing positive

    def _label_rows(self, labels: torch.Tensor, batch: int) -> bool:
        return labels.dim() == 2 and labels.shape[0] == batch

    def _labels_text(self) -> str:
        return f"labels must be in [0, {self.num_classes}) or -1 (padding)"

    def _positive_logits(self, cos: torch.Tensor) -> torch.Tensor:
        """The positive term's exponent at every entry (only the positives' entries are used)."""
        if self.margin_kind == "additive":
            return (cos - self.margin) * -self.scale
        return add_angle(cos, self.margin, self.margin_grad) * -self.scale

    def _loss(self, emb: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              hit: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        n, slots = emb.shape[0], weight.shape[0]
        # Positive mask: pairs off this rank write to a spare column, so duplicates never clash.
        pos = torch.zeros(n, slots + 1, dtype=torch.bool, device=emb.device)
        pos[rows, torch.where(hit, cols, slots)] = True
        pos = pos[:, :slots]
        cos = cosine(emb, weight)
        z = torch.where(pos, self._positive_logits(cos), cos * self.scale)
        terms = two_sided_terms(z, pos, valid)
        self.terms = {"loss_negative": terms[0].detach(), "loss_positive": terms[1].detach()}
        return terms.sum()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", margin_kind={self.margin_kind}"
