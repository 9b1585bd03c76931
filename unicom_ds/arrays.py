"""Small array helpers shared by the stages."""
from __future__ import annotations

import numpy as np
import torch


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, in float32; an all-zero row stays zero."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def torch_device(setting: str) -> torch.device:
    """The `device` key: auto takes the GPU when torch sees one."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)
