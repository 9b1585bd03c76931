"""The trained backbone: open_clip's CLIP vision tower, built from its config with random weights."""
from __future__ import annotations

import open_clip
import torch
from open_clip.model import _build_vision_tower
from torch import nn

from unicom_ds import model_configs

MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-Tiny-16", "ViT-Tiny-32")


def model_config(name: str) -> dict:
    """open_clip's config of `name` ({"embed_dim", "vision_cfg", ...}); ValueError for any other name."""
    if name not in MODELS:
        raise ValueError(f"model={name}: expected one of {', '.join(MODELS)}")
    model_configs.register()
    return open_clip.get_model_config(name)


def build(name: str, grad_checkpointing: bool = False) -> nn.Module:
    """The vision tower alone (no text tower is ever built), fp32, random init; outputs embed_dim."""
    cfg = model_config(name)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    visual.set_grad_checkpointing(grad_checkpointing)
    return visual


def image_size(name: str) -> int:
    return int(model_config(name)["vision_cfg"]["image_size"])


def embed_dim(name: str) -> int:
    return int(model_config(name)["embed_dim"])


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on gains, biases and the class/position embeddings (as CLIP trainers do)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or "embedding" in name
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def export(model_name: str, state_dict: dict[str, torch.Tensor]) -> dict:
    """The RUN/train/backbone.pt payload `unicom_ds.load` reads: fp32 vision-tower weights."""
    return {"model": model_name, "embed_dim": embed_dim(model_name),
            "state_dict": {k: v.detach().float().cpu() for k, v in state_dict.items()}}
