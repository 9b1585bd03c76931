"""Learning rate by optimizer step: linear warmup, then cosine decay to zero (or a constant rate), or
the one-cycle cosine schedule fine-tuning uses (with its beta1 cycle).
Pure and stateless, so a resume needs nothing but the step. A continuation run (compact or 336-px
epoch) is a new run with a schedule of its own, never the tail of the old cosine."""
from __future__ import annotations

import math


SCHEDULES = ("cosine", "constant", "onecycle")
# torch's OneCycleLR defaults, which deepglint/unicom retrieval.py fine-tunes with: it starts at
# lr / 25 and ends at that / 1e4.
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4
# OneCycleLR's cycle_momentum defaults (on by default): Adam(W)'s beta1 falls from max to base while the
# lr rises, and climbs back while it falls.
ONECYCLE_BASE_BETA1, ONECYCLE_MAX_BETA1 = 0.85, 0.95


def _cos_between(start: float, end: float, progress: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * progress) + 1.0)


def _one_cycle(step: int, warmup_steps: int, total_steps: int, start: float, peak_value: float,
               end: float) -> float:
    """torch.optim.lr_scheduler.OneCycleLR(anneal_strategy="cos") with pct_start = the warmup share:
    cosine from start to peak_value by step warmup_steps - 1, then to end by the last step."""
    peak = max(warmup_steps - 1, 0)
    if step <= peak:
        return _cos_between(start, peak_value, step / peak) if peak else peak_value
    return _cos_between(peak_value, end, min(1.0, (step - peak) / max(total_steps - 1 - peak, 1)))


def beta1_at(step: int, warmup_steps: int, total_steps: int, kind: str, cycle: bool) -> float | None:
    """Adam(W)'s beta1 for optimizer step `step`: OneCycleLR's cycle_momentum for the onecycle schedule
    (0.95 -> 0.85 at the lr's peak -> 0.95), None (leave the optimizer's) otherwise or with cycle off."""
    if kind != "onecycle" or not cycle:
        return None
    warmup_steps = min(max(0, warmup_steps), total_steps)
    return _one_cycle(step, warmup_steps, total_steps, ONECYCLE_MAX_BETA1, ONECYCLE_BASE_BETA1, ONECYCLE_MAX_BETA1)


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, kind: str = "cosine") -> float:
    """The lr of optimizer step `step` (0-based) out of `total_steps`; cosine: 0 after the end."""
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule={kind}: expected one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: must be >= 1")
    warmup_steps = min(max(0, warmup_steps), total_steps)
    if kind == "onecycle":
        low = base_lr / ONECYCLE_DIV
        return _one_cycle(step, warmup_steps, total_steps, low, base_lr, low / ONECYCLE_FINAL_DIV)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps  # the first step already moves the weights
    if kind == "constant":
        return base_lr
    decay = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay) if decay else 1.0
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
