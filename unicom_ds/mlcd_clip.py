"""DeepGlint's MLCD releases in transformers' CLIPVisionModel format (config.json model_type
`clip_vision_model`): DeepGlint-AI/mlcd-vit-base-patch32-224 and mlcd-vit-large-patch14-336, the latter also
the vision tower of DeepGlint's LLaVA-MLCD releases. `load_hf(folder)` reads such a folder without transformers.

The architecture is CLIP's vision tower: patches (a bias-free convolution) behind a class token, a learned
position table, `ln_pre`, pre-LN blocks with QuickGELU MLPs, and `ln_post` on the class token. That normalised
class token is the feature (CLIPVisionModel's `pooler_output`; the folder has no projection). It is read into
open_clip's VisionTransformer, built without its projection: the tower this project already trains, scores and
adapts (detection's ViTDet reads its `conv1`, `positional_embedding`, `ln_pre` and blocks). Its names map
onto CLIPVisionModel's one for one, q, k and v fused into `attn.in_proj_weight`.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

from torch import nn

from unicom_ds.mlcd_vit import HF_PREFIX, from_hf_state_dict
from unicom_ds.state_dicts import CONFIG_FILE, load_checked, read_config_json, read_safetensors

MODEL_TYPES = ("clip_vision_model",)
FORMAT = "CLIP format"  # how tables name this format (mlcd_vit.title)
# transformers' CLIPVisionConfig defaults, which it applies to a field config.json leaves out.
DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
# open_clip's names -> CLIPVisionModel's, outside the blocks (the blocks' names are mlcd_vit's).
_TOP = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
        "positional_embedding": "embeddings.position_embedding.weight",
        "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
        "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias"}
POSITION_IDS = "embeddings.position_ids"  # an arange buffer older transformers versions saved; no weight


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The architecture (image_size, patch_size, width, depth, heads, mlp_dim, eps) of a CLIPVisionModel
    folder's config.json; a folder, file or value this module cannot read raises, naming it."""
    path, cfg = read_config_json(folder, "MLCD model folder")
    if cfg.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {cfg.get('model_type')!r} is not a CLIPVisionModel folder "
                         f"({MODEL_TYPES[0]!r})")
    cfg = {**DEFAULTS, **cfg}
    for key in ("hidden_act", "num_channels"):  # what DeepGlint's releases use, and all this reader builds
        if cfg[key] != DEFAULTS[key]:
            raise ValueError(f"{path}: {key}={cfg[key]!r} is not supported (MLCD's CLIP-format models use "
                             f"{DEFAULTS[key]!r})")
    try:
        return dict(image_size=int(cfg["image_size"]), patch_size=int(cfg["patch_size"]), width=int(cfg["hidden_size"]),
                    depth=int(cfg["num_hidden_layers"]), heads=int(cfg["num_attention_heads"]),
                    mlp_dim=int(cfg["intermediate_size"]), eps=float(cfg["layer_norm_eps"]))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def build(image_size: int, patch_size: int, width: int, depth: int, heads: int, mlp_dim: int,
          eps: float = DEFAULTS["layer_norm_eps"]) -> nn.Module:
    """A randomly initialised eval-mode CLIP vision tower (open_clip's VisionTransformer) of this architecture:
    images [B, 3, image_size, image_size] -> the post-LayerNorm class token [B, width]."""
    from open_clip.transformer import LayerNorm, QuickGELU, VisionTransformer
    model = VisionTransformer(image_size, patch_size, width, depth, heads, mlp_ratio=mlp_dim / width,
                              output_dim=width, act_layer=QuickGELU, norm_layer=partial(LayerNorm, eps=eps))
    model.proj = None  # the feature is the normalised class token itself, as pooler_output
    model.image_size, model.embed_dim = image_size, width  # ints, as the library's other models
    return model.eval()


def load_hf(folder: str | os.PathLike) -> nn.Module:
    """A CLIPVisionModel folder (config.json + model.safetensors or sharded safetensors, fp32, fp16 or bf16) as
    an eval-mode fp32 `build` model, checked key for key and shape for shape."""
    arch = read_hf_config(folder)
    hf, source = read_safetensors(folder)
    hf = {k: v for k, v in hf.items() if k.removeprefix(HF_PREFIX) != POSITION_IDS}
    state = from_hf_state_dict(hf, arch["depth"], source, top=_TOP, in_proj="attn.in_proj_{}", what="a CLIPVisionModel")
    return load_checked(build(**arch), state, source, Path(folder) / CONFIG_FILE).eval()
