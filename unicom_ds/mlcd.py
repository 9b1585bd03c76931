"""MLCD's multi-label loss over the class-sharded prototype matrix (issue 25, item 2; issue 30).

The train stage uses it with loss.kind=mlcd (`objectives.prototype_layer`), on RUN/labels/S.topl.npy.

MLCD (An et al., "Multi-label Cluster Discrimination for Visual Representation Learning", ECCV 2024,
arXiv 2407.17331; read in its HTML v2) gives each image its l nearest cluster centres as positive labels
and trains with, per image i with positive classes P_i and sampled negative classes N_i,

    L_i = log(1 + sum_{p in P_i} exp(-s cos(theta_ip + m))) + log(1 + sum_{j in N_i} exp(s cos theta_ij))

and the layer returns its mean over the global batch. Against the paper, term by term:

- The two terms: Sec. 3.2, Eq. 5 (the disambiguated loss; the HTML's text calls it "Eq. 3.2"): the pairwise
  loss of Eq. 4, log(1 + sum_{N'} e^{s_j} sum_P e^{-s_i}), plus sum_{N'} e^{s_j} and sum_P e^{-s_i} inside the
  log, which factorises into log(1 + sum_P e^{-s_i}) + log(1 + sum_{N'} e^{s_j}). Matches; the layer keeps the
  two terms (`terms`: loss_positive, loss_negative), which the train stage logs.
- s_i, s_j: the paper's similarities of L2-normalised features and class centres (Sec. 3.1, Eq. 3; App.
  A.1.2). The scale s is stated nowhere (Eq. 3-5 write bare s_i); A.1.2 says the loss follows ArcFace and
  Unicom, whose scale is 64: loss.scale, default 64 (ours, from them).
- The margin: App. A.1.2, "a margin (m = 0.3) for the positive classes", following ArcFace, whose margin is
  angular: cos(theta + m) on the positives only, default (`margin_kind="angular"`, loss.margin = 0.3, its
  gradient loss.margin_grad as for Unicom). `margin_kind="additive"` (cos - m, our earlier form) is an option.
- The negatives: Sec. 3.2 (after Eq. 4): N'_i is a subset of image i's negative classes Omega_n, randomly
  sampled at each loss calculation step, |N'_i| = r |Omega_n|, r the negative class sampling ratio. Ours
  (`negatives="sampled"`, default): r1 is r; each step (micro-batch) draws one uniform sample S of about r1
  of all k classes (`margin.select_sampled`, Bernoulli, so |S| varies by a few sd) and N_i = S minus P_i: a
  uniform subset of about r of Omega_n(i), shared by the rows of the step. `negatives="selected"` is
  PartialFC's convention instead: every scored class that is not i's positive, so the other images'
  positives too (at the paper's scale about 23% of k in every row, on top of r).
- Which classes are scored: every positive of the global batch plus S (Sec. 3.2 "Clustering": "margin-based
  PartialFC", sampling part of the negative centres each iteration). Not PartialFC's own rule (fill up to
  r * block, nothing more once the positives exceed it): at the paper's setting (32,800 x 8 labels, 410
  images per GPU, on 80 GPUs' 12,500-class blocks: about 2,900 positives per block against r * block =
  1,250) it samples no negative at any r <= 0.2, yet Tab. 5(b) differs over r = 0.01-0.2 (73.4-75.2): the
  paper's runs sampled.
- l and r: Sec. 4.1, defaults k = 1M, r = 0.1, l = 8 (Tab. 5(b), (c): ViT-B/32, 5 epochs, r = 1.0 gives
  63.2, l = 1 gives 71.4, l = 8 75.2; fixed l beats similarity thresholds, Tab. 5(d)): assign.top_l = 8 and
  loss.r1 = 0.1.
- Batch and schedule (Sec. 4.1, App. Tab. 9, 10): 32 epochs, batch 32K (Tab. 10: 32,800) on 80 A100s,
  AdamW lr 0.001 and weight decay 0.2, 2,000 warm-up iterations; Tab. 9's per-model lr (5e-4 B/32, 4e-4
  L/14) are CLIP's values, beside its text tower. L/14@336 is the 224-px L/14 fine-tuned one epoch at 336
  (Sec. 4.6, VLM paragraph). The paper states nothing of bigG (only DeepGlint's releases name it). The
  README's MLCD recipes carry these.
- Code: DeepGlint's repository (github.com/deepglint/unicom, mlcd/) releases the models, not the training
  loss; no public re-implementation of the loss was found to compare with.

`margin_kind` and `negatives` are arguments of the layer, set in the train stage by loss.margin_kind and
loss.negatives (defaults: the paper's form). With l = 1, `margin_kind="angular"` and `negatives="selected"` every logit is
`ShardedPrototypes`' over the same classes, and the two losses are related exactly by (see `single_label_gap`)

    L_mlcd = L_arcface + log(1 + (1 + N * P) / (N + P)),  N = sum_j exp(s cos_j), P = exp(s cos(theta_y + m)),

so MLCD with one label is always above the softmax loss and never equal to it.
"""
from __future__ import annotations

import torch

from unicom_ds.dist import all_reduce_
from unicom_ds.margin import STREAM_R1, add_angle, cosine, generator, select_sampled
from unicom_ds.prototypes import ShardedPrototypes

MARGIN_KINDS = ("angular", "additive")
NEGATIVES = ("sampled", "selected")


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
    sum all-reduce, the same value on every rank. r1 is MLCD's negative class sampling ratio: a rank
    scores every positive of the global batch in its block and the block's part of one uniform sample of
    about r1 of all classes, drawn from (seed, step, forward count) and a class's id, so the same on every
    rank and any number of ranks (`margin.select_sampled`; slots for B_global * l positives, or
    `max_positives`, plus ceil(r1 * block)). `negatives` picks each row's negatives among the scored
    classes (module docstring). r2, initialisation, checkpoint state, `advance()`, `selected`,
    `device_stats` (selected_classes - positives: the sampled negatives) and the label checks behave as in
    `ShardedPrototypes` (no host syncs on an accelerator: a bad label makes the loss NaN and
    `check_labels()` raises). `sampled` lists the scored classes of the sample. A NaN embedding makes the
    loss NaN. Rows without any positive contribute their negative term only. `terms` holds the last
    forward's two terms (loss_negative, loss_positive; detached, on the device), which the train stage
    logs beside the loss.
    """

    def __init__(self, num_classes: int, embed_dim: int, r1: float = 0.1, r2: float = 1.0,
                 margin: float = 0.3, scale: float = 64.0, seed: int = 0, margin_kind: str = "angular",
                 negatives: str = "sampled", margin_grad: str = "exact", max_positives: int | None = None,
                 equal_batches: bool = False):
        super().__init__(num_classes, embed_dim, r1=r1, r2=r2, margin=margin, scale=scale, seed=seed,
                         margin_grad=margin_grad, max_positives=max_positives, equal_batches=equal_batches)
        for name, value, allowed in (("margin_kind", margin_kind, MARGIN_KINDS), ("negatives", negatives, NEGATIVES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(allowed)}")
        self.margin_kind, self.negatives = margin_kind, negatives
        self._sampled: torch.Tensor | None = None  # the last forward's sample flags per slot (None: every class)

    @property
    def sampled(self) -> torch.Tensor | None:
        """Global class ids of the last forward's r1 sample among the scored classes, positives included,
        sorted (a host sync: not for the step)."""
        if self._slots is None or self._sampled is None:
            return self.selected
        return self.class_range[0] + self._slots[0][self._sampled]

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

    def _select(self, hit: torch.Tensor, local: torch.Tensor, block: int, room: int):
        start, end = self.class_range
        # Every rank draws all k classes from a rank-free seed and keeps its block's: one sample for the job.
        gen = generator(self.seed, STREAM_R1, self.step, self._draws, device=self.weight.device)
        u = torch.rand(self.num_classes, generator=gen, device=self.weight.device)[start:end]
        index, valid, self._sampled, count = select_sampled(hit, local, u, self.r1, room)
        return index, valid, self._sampled if self.negatives == "sampled" else valid, count

    def _loss(self, emb: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              hit: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        n, slots = emb.shape[0], weight.shape[0]
        # Positive mask: pairs off this rank write to a spare column, so duplicates never clash.
        pos = torch.zeros(n, slots + 1, dtype=torch.bool, device=emb.device)
        pos[rows, torch.where(hit, cols, slots)] = True
        pos = pos[:, :slots]
        cos = cosine(emb, weight)
        z = torch.where(pos, self._positive_logits(cos), cos * self.scale)
        terms = two_sided_terms(z, pos, live)  # a row's negatives: the live slots that are not its positives
        self.terms = {"loss_negative": terms[0].detach(), "loss_positive": terms[1].detach()}
        return terms.sum()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", margin_kind={self.margin_kind}, negatives={self.negatives}"
