"""Math of the Unicom margin softmax: r1/r2 selections, ArcFace margin, cross-rank cross-entropy.

Everything here works on one process; the only cross-rank step is `all_reduce_`, a no-op
without a process group, so the functions are tested single-process on CPU.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from unicom_ds.dist import all_reduce_

# Stream tags: keep the random draws of the class selection, the feature selection and the
# weight init independent although they share the user's seed.
STREAM_R1, STREAM_R2, STREAM_INIT = 1, 2, 3


def generator(seed: int, *stream: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch generator seeded from (seed, *stream): equal streams give equal draws on any rank."""
    state = np.random.SeedSequence([seed, *stream]).generate_state(1, np.uint64)[0]
    g = torch.Generator(device=device)
    g.manual_seed(int(state) & (2**63 - 1))
    return g


def fraction_count(ratio: float, n: int) -> int:
    """ceil(ratio * n), immune to float noise such as 0.3 * 10 = 3.0000000000000004."""
    return math.ceil(round(ratio * n, 6))


def select_slots(hit: torch.Tensor, local: torch.Tensor, block: int, r1: float, batch: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """r1's class selection in a shape fixed by (block, r1, batch), never by the labels.

    `local[i]` is row i's class in this block where `hit[i]`. The selection keeps every positive
    and fills up with uniformly random negatives to ceil(r1 * block) classes; with more positives
    than that, all positives and nothing else. Its size varies, so it lives in
    K = min(block, max(ceil(r1 * block), batch)) slots, room for every positive of `batch` rows.
    Returns (index [K]: local ids, the selection first and sorted; valid [K] bool, or None when every
    slot is selected; count: the number selected, a 0-dim tensor). Padding slots hold real ids
    (so gathers stay in range) that the softmax must mask out with `valid`.
    """
    want = fraction_count(r1, block)
    slots = min(block, max(want, batch))
    # The top of iid uniform scores is a uniform subset; a score of 2 puts every positive on top.
    # amax scatter: rows of other blocks write -1 to a clamped id, which any score in [0, 1) beats.
    score = torch.rand(block, generator=gen, device=gen.device).to(local.device)
    marks = torch.where(hit, 2.0, -1.0).to(score.dtype)
    score.scatter_reduce_(0, local.clamp(0, block - 1), marks, "amax")
    count = (score == 2.0).sum().clamp_min(want)
    top = score.topk(slots).indices  # by descending score: the selection first
    if slots == want:
        return top.sort().values, None, count
    # Padding slots get keys past the block, so the sort keeps the selection first and sorted.
    keys = torch.where(torch.arange(slots, device=top.device) < count, top, top + block).sort().values
    valid = keys < block
    return torch.where(valid, keys, keys - block), valid, count


def select_sampled(hit: torch.Tensor, local: torch.Tensor, u: torch.Tensor, r1: float,
                   room: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """MLCD's r1 (negative class sampling, the paper's Eq. 4): every positive of the block, plus the classes
    whose uniform draw `u` [block] is below r1, in K = min(block, room + ceil(r1 * block)) slots.

    `local[i]` is pair i's class in this block where `hit[i]`; `room` bounds the distinct positives. Unlike
    `select_slots`, negatives are sampled however many positives there are: the sample is {c: u_c < r1}, a
    uniform subset of about r1 of the block whatever the positives (Bernoulli, so its size varies; a class's
    draw depends on the class only when `u` does). Returns (index [K]: local ids, the selection first and
    sorted; valid [K]; sampled [K]: valid slots in the sample, positives included; count). Should the sample
    overflow the slots, the draws nearest 0 are kept (still a uniform subset); should the positives, count
    is their number, above K (the caller's overflow check).
    """
    block = u.numel()
    slots = min(block, room + fraction_count(r1, block))
    # A spare last entry takes the pairs of other blocks, so duplicate ids never clash.
    positive = torch.zeros(block + 1, dtype=torch.bool, device=u.device)
    positive[torch.where(hit, local, block)] = True
    positive = positive[:block]
    sampled = u < r1
    # Positives first, then the other classes by ascending draw: the sampled ones before the rest.
    top = torch.where(positive, 2.0, 1.0 - u).topk(slots).indices
    n_pos = positive.sum()
    count = torch.where(n_pos > slots, n_pos, (positive | sampled).sum().clamp_max(slots))
    # Padding slots get keys past the block, so the sort keeps the selection first and sorted.
    keys = torch.where(torch.arange(slots, device=u.device) < count, top, top + block).sort().values
    valid = keys < block
    index = torch.where(valid, keys, keys - block)
    return index, valid, sampled[index] & valid, count


def select_classes(positives: torch.Tensor, block: int, r1: float, gen: torch.Generator) -> torch.Tensor | None:
    """Local class ids to score this step (sorted), or None for the whole block.

    Keeps every id in `positives` and fills up with uniformly random negatives to
    ceil(r1 * block) ids; when there are more positives than that, all positives and nothing else.
    `select_slots`' draw cut to its selection (a host sync: for analysis, not for the train step).
    """
    if fraction_count(r1, block) >= block:
        return None
    hit = torch.ones(positives.numel(), dtype=torch.bool, device=positives.device)
    index, _, count = select_slots(hit, positives, block, r1, positives.numel(), gen)
    return index[: int(count)]


def feature_subset(dim: int, r2: float, seed: int, step: int) -> torch.Tensor | None:
    """The ceil(r2 * dim) feature dimensions used at `step` (sorted), or None for all of them.

    Drawn on the CPU from (seed, step) only, hence the same on every rank.
    """
    keep = fraction_count(r2, dim)
    if keep >= dim:
        return None
    return torch.randperm(dim, generator=generator(seed, STREAM_R2, step))[:keep].sort().values


class _Cosine(torch.autograd.Function):
    """cos between unit rows `unit` [n, d] and raw rows `weight` [c, d].

    Scaling the product by 1/|w| instead of normalising the weight avoids a [c, d] copy, and the
    backward writes the weight's gradient into a single [c, d] buffer (autograd's norm and
    division backward would allocate three).
    """

    @staticmethod
    def forward(ctx, unit: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        inv = torch.linalg.vector_norm(weight, dim=1).clamp_min(1e-12).reciprocal_()
        cos = (unit @ weight.T).mul_(inv)
        ctx.save_for_backward(unit, weight, inv, cos)
        return cos

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        unit, weight, inv, cos = ctx.saved_tensors
        scaled = grad * inv
        grad_unit = scaled @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            # d cos_ij / d w_j = inv_j * u_i - cos_ij * inv_j^2 * w_j
            grad_weight = scaled.T @ unit
            grad_weight.addcmul_(weight, ((grad * cos).sum(0) * inv * inv)[:, None], value=-1)
        return grad_unit, grad_weight


def cosine(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """cos between rows of `embeddings` [n, d] and rows of `weight` [c, d] -> [n, c]."""
    return _Cosine.apply(F.normalize(embeddings, dim=1), weight)


class _AddAngle(torch.autograd.Function):
    """cos(theta + m) for cos(theta) = c, with its analytic derivative sin(theta + m) / sin(theta)."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, margin: float) -> torch.Tensor:
        c = c.clamp(-1.0, 1.0)
        ctx.save_for_backward(c)
        ctx.margin = margin
        return c * math.cos(margin) - (1.0 - c * c).sqrt() * math.sin(margin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (c,) = ctx.saved_tensors
        m = ctx.margin
        # Below one ulp of the dtype, 1 - c^2 is rounding noise: clamp it so sin(theta) > 0.
        sin = (1.0 - c * c).clamp_min(torch.finfo(c.dtype).eps).sqrt()
        return grad * (math.cos(m) + c * math.sin(m) / sin), None


MARGIN_GRADS = ("exact", "straight_through")


def add_angle(c: torch.Tensor, margin: float, grad: str = "exact") -> torch.Tensor:
    """cos(arccos(c) + margin).

    grad="exact": its analytic gradient, finite at |c| = 1. grad="straight_through": the gradient
    of the identity, as the official code gets by applying arccos, + m and cos under no_grad (the
    paper's numbers were made that way).
    """
    if grad == "exact":
        return _AddAngle.apply(c, margin)
    if grad == "straight_through":
        with torch.no_grad():
            shifted = _AddAngle.apply(c, margin)
        return c + (shifted - c).detach()
    raise ValueError(f"margin gradient '{grad}': expected one of {', '.join(MARGIN_GRADS)}")


def margin_logits(cos: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, margin: float,
                  scale: float, grad: str = "exact", hit: torch.Tensor | None = None) -> torch.Tensor:
    """scale * cos, with scale * cos(theta + margin) at the positives (rows[i], cols[i]).

    With `hit`, only the pairs where hit[i] are positives (a fixed-size list of pairs).
    """
    logits = cos * scale
    at = cos[rows, cols]
    shifted = add_angle(at, margin, grad)
    logits.index_put_((rows, cols), (shifted if hit is None else torch.where(hit, shifted, at)) * scale)
    return logits


class _ShardedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over rows whose columns (classes) are split across ranks."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                hit: torch.Tensor | None) -> torch.Tensor:
        n = logits.shape[0]
        top = all_reduce_(logits.max(dim=1, keepdim=True).values, "max")
        prob = (logits - top).exp_()
        total = all_reduce_(prob.sum(dim=1, keepdim=True))
        prob.div_(total)
        # Each row's positive lives on exactly one rank: a sum over ranks hands it to every rank.
        positive = logits.new_zeros(n, 1)
        at = logits[rows, cols]
        # where, not a product: a non-positive pair may point at a masked -inf column.
        positive[rows, 0] = at if hit is None else torch.where(hit, at, 0.0)
        all_reduce_(positive)
        ctx.save_for_backward(prob, rows, cols, hit)
        return (top + total.log() - positive).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        prob, rows, cols, hit = ctx.saved_tensors
        unit = grad / prob.shape[0]
        out = prob * unit
        out[rows, cols] -= unit if hit is None else unit * hit
        return out, None, None, None


def sharded_cross_entropy(logits: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                          hit: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over all rows; `logits` [n, c_rank] hold this rank's columns.

    Row rows[i]'s class is column cols[i] on this rank; the other rows' classes live on other
    ranks (every row's class lives on exactly one rank). Max, normaliser and positive logit are all-reduced, so every rank returns the same loss and
    never sees another rank's logits. With `hit`, only the pairs where hit[i] are positives.
    """
    return _ShardedCrossEntropy.apply(logits, rows, cols, hit)


def margin_softmax_loss(embeddings: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                        margin: float, scale: float, grad: str = "exact", hit: torch.Tensor | None = None,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """ArcFace loss of `embeddings` [n, d] against this rank's (selected) prototypes `weight` [c, d].

    The positives are (rows[i], cols[i]): row rows[i] belongs to class `weight[cols[i]]`; with
    `hit`, only the pairs where hit[i]. `valid` [c] bool leaves padding rows of `weight` out of the
    softmax (no loss, no gradient). `grad` is the margin's gradient (`add_angle`).
    """
    logits = margin_logits(cosine(embeddings, weight), rows, cols, margin, scale, grad, hit)
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return sharded_cross_entropy(logits, rows, cols, hit)
