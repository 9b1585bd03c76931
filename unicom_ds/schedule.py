"""Learning rate by optimizer step: linear warmup, then cosine decay to zero (or a constant rate).
Pure and stateless, so a resume needs nothing but the step. A continuation run (compact or 336-px
epoch) is a new run with a schedule of its own, never the tail of the old cosine."""
from __future__ import annotations

import math


SCHEDULES = ("cosine", "constant")


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, kind: str = "cosine") -> float:
    """The lr of optimizer step `step` (0-based) out of `total_steps`; cosine: 0 after the end."""
    if kind not in SCHEDULES:
        raise ValueError(f"train.schedule={kind}: expected one of {', '.join(SCHEDULES)}")
    if total_steps < 1:
        raise ValueError(f"total_steps={total_steps}: must be >= 1")
    warmup_steps = min(max(0, warmup_steps), total_steps)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps  # the first step already moves the weights
    if kind == "constant":
        return base_lr
    decay = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / decay) if decay else 1.0
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * progress))
