"""The optimizer of both parameter sets (backbone in the engine, prototype blocks outside it)."""
from __future__ import annotations

from typing import Iterable

import torch


def adamw(params: Iterable, lr: float, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """torch AdamW; fused: one kernel over each tensor instead of a dozen elementwise passes. The
    prototype block is one large tensor (125k x 512 per GPU for 1M classes on 8 GPUs), so this matters."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)
