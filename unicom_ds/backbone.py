"""The trained backbone, by model name.

- `ViT-B-32`, `ViT-B-16`, `ViT-L-14`, `ViT-L-14-336` (and the tiny test configs `ViT-Tiny-16`,
  `ViT-Tiny-16-96`, `ViT-Tiny-32`): the architecture of the official Unicom release
  (`unicom_ds.unicom_vit`), exported as a release-format plain state dict.
- `openclip:<name>`: open_clip's CLIP vision tower of that config (class token, `ln_post`, `proj`),
  exported as {"model", "embed_dim", "state_dict"}.
- `MLCD-ViT-B-32`, `MLCD-ViT-L-14-336`, `MLCD-ViT-bigG-14-224/336/448` (and `MLCD-ViT-Tiny-16` for tests):
  the RoPE2D ViT of the MLCD releases (`unicom_ds.mlcd_vit`), exported as {"model", "embed_dim",
  "state_dict"}; `python -m unicom_ds.mlcd_vit export NAME RUN/train/backbone.pt FOLDER` turns that into a
  transformers MLCDVisionModel folder.
- `MLCD-CLIP-ViT-B-32`, `MLCD-CLIP-ViT-L-14-336` (and `MLCD-CLIP-ViT-Tiny-16` for tests): the CLIP-format tower of
  DeepGlint's B/32 and L/14-336 MLCD releases (`unicom_ds.mlcd_clip`: open_clip's tower without projection), the
  names an `mlcd:FOLDER` of that format is fine-tuned and exported under, as {"model", "embed_dim", "state_dict"}.

open_clip is imported only when an open_clip tower is built, so the launcher's checks stay cheap.
"""
from __future__ import annotations

import torch
from torch import nn

from unicom_ds import mlcd_clip, mlcd_vit, unicom_vit

OPENCLIP = "openclip:"
_OPENCLIP_CONFIGS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336", "ViT-Tiny-16", "ViT-Tiny-32",
                     # the towers of weights trained with QuickGELU (OpenAI's, LAION-400M's), fine-tuned
                     "ViT-B-32-quickgelu", "ViT-B-16-quickgelu", "ViT-L-14-quickgelu", "ViT-L-14-336-quickgelu")
# The releases' config.json sizes (tests/test_mlcd_clip_format.py RELEASES); the eps is mlcd_clip's default.
MLCD_CLIP = {
    "MLCD-CLIP-ViT-B-32": dict(image_size=224, patch_size=32, width=768, depth=12, heads=12, mlp_dim=3072),
    "MLCD-CLIP-ViT-L-14-336": dict(image_size=336, patch_size=14, width=1024, depth=24, heads=16, mlp_dim=4096),
    "MLCD-CLIP-ViT-Tiny-16": dict(image_size=64, patch_size=16, width=64, depth=2, heads=2, mlp_dim=256),
}
MODELS = (*unicom_vit.CONFIGS, *(OPENCLIP + n for n in _OPENCLIP_CONFIGS), *mlcd_vit.CONFIGS, *MLCD_CLIP)


def check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"model={name}: expected one of {', '.join(MODELS)}")


def is_release(name: str) -> bool:
    """True for the Unicom release architecture, False for an open_clip tower or an MLCD ViT."""
    check_name(name)
    return name in unicom_vit.CONFIGS


def is_mlcd(name: str) -> bool:
    """True for an MLCD ViT of either format (RoPE2D or CLIP)."""
    check_name(name)
    return name in mlcd_vit.CONFIGS or name in MLCD_CLIP


def _mlcd_config(name: str) -> dict:
    return mlcd_vit.CONFIGS[name] if name in mlcd_vit.CONFIGS else MLCD_CLIP[name]


def folder_name(module, arch: dict) -> str | None:
    """The name of the architecture an MLCD folder holds (`loading.mlcd_folder`'s reader module and arch), which
    `build` rebuilds exactly; None for a size or setting no name has."""
    if module is mlcd_vit:
        named, fixed = mlcd_vit.CONFIGS, dict(rope_theta=mlcd_vit.ROPE_THETA, eps=mlcd_vit.LN_EPS)
    else:
        named, fixed = MLCD_CLIP, dict(eps=mlcd_clip.DEFAULTS["layer_norm_eps"])
    return next((name for name, c in named.items() if {**c, **fixed} == arch), None)


def _openclip_config(name: str) -> dict:
    import open_clip

    from unicom_ds import model_configs
    model_configs.register()
    return open_clip.get_model_config(name[len(OPENCLIP):])


def build(name: str, grad_checkpointing: bool = False) -> nn.Module:
    """The backbone to train, fp32, random init, train mode; maps images to embed_dim features."""
    if is_release(name):
        return unicom_vit.build_for_training(name, grad_checkpointing)
    if name in mlcd_vit.CONFIGS:
        return mlcd_vit.build_for_training(name, grad_checkpointing)
    if name in MLCD_CLIP:
        tower = mlcd_clip.build(**MLCD_CLIP[name]).train()
        tower.set_grad_checkpointing(grad_checkpointing)
        return tower
    from open_clip.model import _build_vision_tower
    cfg = _openclip_config(name)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=cfg.get("quick_gelu", False))
    visual.set_grad_checkpointing(grad_checkpointing)
    return visual


def image_size(name: str) -> int:
    if is_release(name):
        return int(unicom_vit.config(name)["image_size"])
    if is_mlcd(name):
        return int(_mlcd_config(name)["image_size"])
    return int(_openclip_config(name)["vision_cfg"]["image_size"])


def embed_dim(name: str) -> int:
    if is_release(name):
        return int(unicom_vit.config(name)["embed_dim"])
    if is_mlcd(name):
        return int(_mlcd_config(name)["width"])  # the class token's width: MLCD has no projection
    return int(_openclip_config(name)["embed_dim"])


def description(name: str) -> str:
    """One line for plans and logs: which architecture a model name trains."""
    kind = ("Unicom release architecture" if is_release(name) else "MLCD RoPE2D ViT" if name in mlcd_vit.CONFIGS
            else "MLCD CLIP-format tower" if name in MLCD_CLIP else "open_clip CLIP vision tower")
    return f"{name} ({kind}, {image_size(name)} px, {embed_dim(name)}-d embedding)"


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on gains, biases and the class/position embeddings (as CLIP trainers do;
    MLCD's class_pos_emb holds the class token's rotary angles)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("embedding", "pos_embed", "class_pos_emb"))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def export(model_name: str, state_dict: dict[str, torch.Tensor]) -> dict:
    """The RUN/train/backbone.pt payload `unicom_ds.load` reads, fp32.

    Release architectures: a plain state dict with the release's keys (the release files hold
    the same keys in fp16). open_clip towers and MLCD ViTs (both formats): {"model", "embed_dim", "state_dict"}.
    """
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in state_dict.items()}
    if is_release(model_name):
        return state
    return {"model": model_name, "embed_dim": embed_dim(model_name), "state_dict": state}
