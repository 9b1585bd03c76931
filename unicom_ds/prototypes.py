"""The prototype matrix sharded by rows over ranks, and the block helpers checkpoints use."""
from __future__ import annotations

import math

import torch
from torch import nn

from unicom_ds.dist import all_reduce_, gather_rows, rank_world
from unicom_ds.margin import (MARGIN_GRADS, STREAM_INIT, STREAM_R1, feature_subset, fraction_count, generator,
                              margin_softmax_loss, select_slots)

# Rows are initialised in chunks seeded by (seed, chunk): the full matrix is the same for any
# number of ranks, and no rank ever materialises more than its block plus one chunk.
_INIT_CHUNK = 4096
_INIT_STD = 0.01


def block_range(num_classes: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of `rank`'s contiguous class block; block sizes differ by at most one."""
    if num_classes < world:
        raise ValueError(f"num_classes={num_classes} is smaller than the world size {world}: "
                         "every rank needs at least one class")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world size {world}")
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def reslice(pieces: list[tuple[int, int, torch.Tensor]], start: int, end: int) -> torch.Tensor:
    """Rows [start, end) rebuilt from saved blocks (start_i, end_i, rows_i) of any rank count.

    Works for the weight and for any optimizer state with one row per class.
    """
    parts, at = [], start
    for lo, hi, rows in sorted(pieces, key=lambda p: p[0]):
        if rows.shape[0] != hi - lo:
            raise ValueError(f"block [{lo}, {hi}) holds {rows.shape[0]} rows, expected {hi - lo}")
        if hi <= at or lo >= end:
            continue
        if lo > at:
            break
        parts.append(rows[at - lo : min(hi, end) - lo])
        at = min(hi, end)
    if at < end:
        gap_end = min([lo for lo, _, _ in pieces if lo > at] + [end])
        raise ValueError(f"saved blocks do not cover classes [{at}, {gap_end}): "
                         f"have {sorted((lo, hi) for lo, hi, _ in pieces)}")
    return torch.cat(parts)


def init_block(start: int, end: int, dim: int, seed: int) -> torch.Tensor:
    """N(0, 0.01) rows [start, end) of the seed's full prototype matrix, fp32."""
    out = torch.empty(end - start, dim)
    for chunk in range(start // _INIT_CHUNK, math.ceil(end / _INIT_CHUNK)):
        base = chunk * _INIT_CHUNK
        lo, hi = max(start, base), min(end, base + _INIT_CHUNK)
        rows = torch.randn(_INIT_CHUNK, dim, generator=generator(seed, STREAM_INIT, chunk))
        out[lo - start : hi - start] = rows[lo - base : hi - base] * _INIT_STD
    return out


def _checks_at_once(device: torch.device) -> bool:
    """Whether a label range check may ask the device at once: yes where the host is the device."""
    return device.type == "cpu"


class ShardedPrototypes(nn.Module):
    """Margin softmax over a class-sharded prototype matrix with Unicom's r1/r2 selections.

    Each rank owns rows `class_range` of the (num_classes x embed_dim) matrix as `weight`, plain
    fp32 (math runs in fp32 whatever the embeddings' dtype or autocast). `forward(embeddings,
    labels)` takes the local batch and global class ids, gathers embeddings and labels over
    ranks, scores the global batch against this rank's selected prototypes and returns the mean
    ArcFace loss over the global batch, the same value on every rank. Logits and W are never
    gathered; only the selected rows of `weight` receive gradient.

    The step never waits on the host: every shape follows from (batch, block, r1, r2), not from the
    labels (r1's selection lives in fixed-size padded slots, see `margin.select_slots`), and labels
    on an accelerator are range-checked asynchronously: an out-of-range label makes the loss NaN
    (the train loop's non-finite guard skips the step on every rank) and sets `label_fault`, which
    `check_labels()` turns into the ValueError. Labels on the CPU are checked at once. The slots
    have room for every positive a global batch can hold on a rank; `max_positives` caps that room
    (a rank averages global batch / ranks positives), and a batch with more positives on a rank is
    handled like a bad label (NaN loss, then the error). `equal_batches=True` promises the same local
    batch size on every rank (`dist.gather_rows(equal=True)`: no size exchange). `selected`
    and `last_stats` are read lazily (a host sync when read); `device_stats` holds the same
    counts as tensors on the device.

    Randomness: r2's feature subset depends on (seed, step) only, so it is equal on all ranks;
    `step` moves only with `advance()`, which the train loop calls once per optimizer step (all
    micro-batches of a step share the subset). r1's negatives are drawn from (seed, step, forward
    count since advance, rank).

    For the train loop: gradients reaching the embeddings are exact for the global-batch loss.
    DeepSpeed averages backbone gradients over ranks, so scale the embeddings' gradient by the
    world size with a hook (`emb.register_hook(lambda g: g * world)`) to keep them exact. The
    weight stays out of the engine, with its own optimizer.
    """

    def __init__(self, num_classes: int, embed_dim: int, r1: float = 0.1, r2: float = 1.0,
                 margin: float = 0.3, scale: float = 64.0, seed: int = 0, margin_grad: str = "exact",
                 max_positives: int | None = None, equal_batches: bool = False):
        super().__init__()
        self.equal_batches = equal_batches
        if max_positives is not None and max_positives < 1:
            raise ValueError(f"max_positives={max_positives} must be at least 1 (or None: no cap)")
        self.max_positives = max_positives
        for name, value in (("r1", r1), ("r2", r2)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"{name}={value} must be in (0, 1]")
        if margin < 0 or scale <= 0:
            raise ValueError(f"need margin >= 0 and scale > 0, got margin={margin}, scale={scale}")
        if margin_grad not in MARGIN_GRADS:
            raise ValueError(f"margin_grad={margin_grad!r}: expected one of {', '.join(MARGIN_GRADS)}")
        self.num_classes, self.embed_dim = num_classes, embed_dim
        self.r1, self.r2, self.margin, self.scale, self.seed = r1, r2, margin, scale, seed
        self.margin_grad = margin_grad
        self.rank, self.world = rank_world()
        self.class_range = block_range(num_classes, self.world, self.rank)
        self.weight = nn.Parameter(init_block(*self.class_range, embed_dim, seed))
        self.step = 0
        self._draws = 0  # forwards since the last advance(): fresh negatives per micro-batch
        self._slots: tuple[torch.Tensor, torch.Tensor | int] | None = None  # (index, count) of the last forward
        self._dims: tuple | None = None  # ((step, device), dims on the cpu, dims on the device)
        self.features: torch.Tensor | None = None  # feature dims used in the last forward
        self.device_stats: dict[str, torch.Tensor | int] = {}
        self.terms: dict[str, torch.Tensor] = {}  # a loss's parts, logged beside it (MLCD's two sides)
        # On the device, over the forwards since check_labels(): [any label out of range, -min, max,
        # most positives on this rank beyond the slots' room (0: none)].
        self.label_fault: torch.Tensor | None = None

    @property
    def selected(self) -> torch.Tensor | None:
        """Global class ids scored in the last forward, sorted (a host sync: not for the step)."""
        if self._slots is None:
            return None
        index, count = self._slots
        return self.class_range[0] + index[: int(count)]

    @property
    def last_stats(self) -> dict[str, int]:
        """`device_stats` of the last forward as ints (a host sync)."""
        return {name: int(value) for name, value in self.device_stats.items()}

    def check_labels(self) -> None:
        """Raise the ValueError of an out-of-range label seen on the device since the last call."""
        if self.label_fault is None:
            return
        fault, neg_low, high, over = self.label_fault.tolist()
        self.label_fault = None
        if fault:
            raise ValueError(f"{self._labels_text()}, got labels from {-neg_low} to {high}")
        if over:
            self._raise_overflow(over)

    def _raise_overflow(self, positives: int) -> None:
        raise ValueError(f"a global batch held {positives} classes of one rank's block, more than "
                         f"max_positives={self.max_positives} leaves room for: raise max_positives (or None)")

    # Subclasses (MLCD's multi-label loss) change these: what labels look like, the lowest valid one (-1 pads
    # there), r1's selection and the loss over this rank's selected prototypes; the rest of the step is shared.
    LABELS = "[batch]"
    LOWEST_LABEL = 0

    def _label_rows(self, labels: torch.Tensor, batch: int) -> bool:
        return labels.shape == (batch,)

    def _labels_text(self) -> str:
        return f"labels must be in [0, {self.num_classes})"

    def _raise_bad_labels(self, labels: torch.Tensor) -> None:
        bad = labels[(labels < self.LOWEST_LABEL) | (labels >= self.num_classes)]
        raise ValueError(f"{self._labels_text()}, got {bad[:5].tolist()}")

    def _select(self, hit: torch.Tensor, local: torch.Tensor, block: int,
                room: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """r1's classes of this block in fixed slots: (index, valid, live, count) as `margin.select_slots`
        returns them, `live` marking the slots the loss scores against every row (here: the valid ones)."""
        gen = generator(self.seed, STREAM_R1, self.step, self._draws, self.rank, device=self.weight.device)
        index, valid, count = select_slots(hit, local, block, self.r1, room, gen)
        return index, valid, valid, count

    def _loss(self, emb: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              hit: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
        """The loss of the global batch `emb` [n, d'] against this rank's selected prototypes `weight`;
        pair p is (row rows[p], column cols[p]), on this rank where hit[p]; `live` marks the live slots."""
        return margin_softmax_loss(emb, weight, rows, cols, self.margin, self.scale, self.margin_grad,
                                   hit=hit, valid=live)

    def advance(self) -> None:
        """Move to the next optimizer step (new r2 subset, new r1 negatives)."""
        self.step += 1
        self._draws = 0

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings must be [batch, {self.embed_dim}], got {tuple(embeddings.shape)}")
        if not self._label_rows(labels, embeddings.shape[0]):
            raise ValueError(f"labels must be {self.LABELS.replace('batch', str(embeddings.shape[0]))}, "
                             f"got {tuple(labels.shape)}")
        if rank_world() != (self.rank, self.world):
            raise RuntimeError(f"built for rank {self.rank} of {self.world} but the process group is now "
                               f"{rank_world()}: build the layer after init_process_group")
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = gather_rows(embeddings.to(dtype), self.equal_batches)
            labels = gather_rows(labels.to(device=self.weight.device, dtype=torch.long), self.equal_batches)
            out_of_range = (labels < self.LOWEST_LABEL) | (labels >= self.num_classes)
            # Every rank sees the same gathered labels, so all ranks raise or poison together (no hang).
            at_once = _checks_at_once(labels.device)
            if at_once and out_of_range.any():
                self._raise_bad_labels(labels)
            start, end = self.class_range
            n = labels.shape[0]
            flat = labels.reshape(-1)  # pair p: (row p // width, class flat[p]); one pair per row for one label
            block, width = end - start, flat.numel() // max(n, 1)
            # Every pair takes part, with hit[p] saying whether its class is on this rank (-1 never is).
            hit = (flat >= start) & (flat < end)
            local = (flat - start).clamp(0, block - 1)
            rows = torch.arange(flat.numel(), device=labels.device)
            if width > 1:
                rows = rows.div_(width, rounding_mode="floor")
            if fraction_count(self.r1, block) >= block:
                index, valid, live, count, cols = None, None, None, block, local
            else:
                room = flat.numel() if self.max_positives is None else min(flat.numel(), self.max_positives)
                index, valid, live, count = self._select(hit, local, block, room)
                cols = torch.searchsorted(index if valid is None else torch.where(valid, index, block), local)
                cols = cols.clamp_max(index.numel() - 1)
            self._draws += 1
            dims = self._feature_dims(emb.device)
            weight = self._rows(index, dims)
            if dims is not None:
                emb = emb[:, dims]
            loss = self._loss(emb, weight.to(dtype), rows, cols, hit, live)
            # Positives beyond the slots' room (only possible under max_positives), 0 if none.
            if index is None:
                over = torch.zeros((), dtype=torch.long, device=labels.device)
            else:
                over = torch.where(count > index.numel(), count, 0)
            if not at_once:
                seen = torch.stack([out_of_range.any().long(), -labels.min(), labels.max(), over])
                self.label_fault = seen if self.label_fault is None else torch.maximum(self.label_fault, seen)
                loss = torch.where(seen[0].bool() | (seen[3] > 0), torch.nan, loss)
            elif self.max_positives is not None:  # one rank's overflow stops every rank: no hang
                worst = int(all_reduce_(over.reshape(1).double(), "max").item())
                if worst:
                    self._raise_overflow(worst)
        self._slots = (torch.arange(block, device=self.weight.device) if index is None else index, count)
        self.device_stats = {"selected_classes": count, "positives": self._positives(hit, local, block),
                             "features": int(weight.shape[1]), "global_batch": n}
        return loss

    @staticmethod
    def _positives(hit: torch.Tensor, local: torch.Tensor, block: int) -> torch.Tensor:
        """Distinct classes of this block in the batch, as a device tensor (fixed shapes)."""
        seen = torch.zeros(block, dtype=torch.int32, device=local.device)
        return seen.scatter_reduce_(0, local, hit.to(torch.int32), "amax").sum()

    def _feature_dims(self, device: torch.device) -> torch.Tensor | None:
        """r2's dims of this step on `device`, copied once per step without waiting on the host."""
        if self._dims is None or self._dims[0] != (self.step, device):
            dims = feature_subset(self.embed_dim, self.r2, self.seed, self.step)
            on_device = dims
            if dims is not None and device.type != "cpu":
                on_device = (dims.pin_memory() if device.type == "cuda" else dims).to(device, non_blocking=True)
            self._dims = ((self.step, device), dims, on_device)
        self.features = self._dims[1]
        return self._dims[2]

    def _rows(self, index: torch.Tensor | None, dims: torch.Tensor | None) -> torch.Tensor:
        """The selected sub-matrix of `weight`, with no copy when everything is selected."""
        # index_select, not w[index]: its backward is index_add_, which CPUs run in parallel.
        weight = self.weight if index is None else self.weight.index_select(0, index)
        return weight if dims is None else weight.index_select(1, dims)

    def get_extra_state(self) -> dict:
        return {"step": self.step, "class_range": self.class_range, "num_classes": self.num_classes}

    def set_extra_state(self, state: dict) -> None:
        if state["num_classes"] != self.num_classes or tuple(state["class_range"]) != self.class_range:
            raise ValueError(f"saved prototypes are classes {tuple(state['class_range'])} of {state['num_classes']}, "
                             f"this rank holds {self.class_range} of {self.num_classes}: rebuild the weight "
                             "with unicom_ds.prototypes.reslice")
        self.step = int(state["step"])

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, embed_dim={self.embed_dim}, class_range={self.class_range}, "
                f"r1={self.r1}, r2={self.r2}, margin={self.margin}, scale={self.scale}, margin_grad={self.margin_grad}")
