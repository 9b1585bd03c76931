"""`load(name, checkpoint)` -> (eval-mode model, image transform) for every model source.

The model maps a batch of transformed images to embeddings (`model(images)`), whatever its source:

- `openclip:NAME` with checkpoint = an open_clip pretrained tag, a local file, or None (random
  init): the CLIP/OpenCLIP baselines; the model is the CLIP vision tower (`encode_image`).
- a plain state dict in the Unicom release format: the official release files (fp16) and this
  repo's exports of the release architecture (`RUN/train/backbone.pt` of `model=ViT-B-16` etc.,
  fp32). `name` is `ViT-B/32`, `ViT-B/16`, `ViT-L/14`, `ViT-L/14@336` (also `ViT-B-32` style,
  `unicom:NAME`, or a tiny test config); loaded strictly, key for key, into fp32.
- a train-stage export of an open_clip tower or an MLCD ViT (`model=openclip:NAME`, `model=MLCD-ViT-...`,
  a dict {"model", "embed_dim", "state_dict"}): the backbone rebuilt by name; `name` is that model name
  (or `ckpt:NAME`).
- `mlcd:FOLDER` (or `mlcd` with checkpoint = FOLDER): an MLCD folder in either of DeepGlint's release
  formats (`load_mlcd_folder`): transformers' MLCDVisionModel (RoPE2D, the bigG releases), read into
  `unicom_ds.mlcd_vit`'s MLCDViT, or CLIPVisionModel (the B/32 and L/14-336 releases), read into
  `unicom_ds.mlcd_clip`'s CLIP tower; transformers is not used. The feature is the folder's pooler output.

What a checkpoint file holds decides between the last two. Nothing is ever downloaded for Unicom files.
"""
from __future__ import annotations

import os
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
from torch import nn

from unicom_ds import backbone, mlcd_clip, mlcd_vit, unicom_vit
from unicom_ds.state_dicts import check_state_dict, is_export, read_config_json, read_weights, weight_files

OPENCLIP = "openclip:"
UNICOM = "unicom:"
CKPT = "ckpt:"
MLCD = "mlcd"
RELEASE_URL = "https://github.com/deepglint/unicom/releases"
_KINDS = {True: "a train-stage export", False: "a plain state dict (the Unicom release format)"}
MLCD_FORMATS = (mlcd_vit, mlcd_clip)  # the readers of MLCD folders, each by its config.json model_type(s)


def load(name: str, checkpoint: str | os.PathLike | None = None,
         device: str | torch.device = "cpu") -> tuple[nn.Module, Callable]:
    """(model in eval mode on `device`, PIL image -> tensor transform); see the module docstring."""
    if name == MLCD or name.startswith(MLCD + ":"):
        model, preprocess = _load_mlcd(name, checkpoint)
        return model.to(device).eval(), preprocess
    is_file = checkpoint is not None and Path(checkpoint).is_file()
    state = read_weights(checkpoint) if is_file else None
    export = state is not None and is_export(state)
    if name.startswith(OPENCLIP) and not export:
        model, preprocess = _load_openclip(name[len(OPENCLIP):], checkpoint)
    else:
        if checkpoint is None:
            raise ValueError(f"model '{name}': a checkpoint file must be given (Unicom release files "
                             f"from {RELEASE_URL}, or RUN/train/backbone.pt); nothing is downloaded")
        if state is None:
            raise FileNotFoundError(f"checkpoint {checkpoint}: no such file")
        wanted = True if name.startswith(CKPT) else False if name.startswith(UNICOM) else export
        if wanted != export:
            raise ValueError(f"{checkpoint}: model '{name}' needs {_KINDS[wanted]}, this file is {_KINDS[export]}")
        if export:
            model, preprocess = _load_export(_strip(name, CKPT), state, checkpoint)
        else:
            model, preprocess = _load_unicom(_strip(name, UNICOM), state, checkpoint)
    return model.to(device).eval(), preprocess


def clip_transform(image_size: int) -> Callable:
    """Bicubic resize of the short side, center crop, CLIP normalisation: the Unicom release's
    preprocess, and open_clip's for the CLIP vision towers this repo trains."""
    import open_clip
    return open_clip.image_transform(
        image_size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
        std=open_clip.OPENAI_DATASET_STD, resize_mode="shortest", interpolation="bicubic")


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix):] if name.startswith(prefix) else name


def _load_unicom(name: str, state: dict, path) -> tuple[nn.Module, Callable]:
    model = unicom_vit.build(name)
    check_state_dict(model, state, path, f"the Unicom {name} architecture")
    model.load_state_dict(state)  # copies the fp16 release tensors into the fp32 parameters
    return model, clip_transform(model.image_size)


def _load_mlcd(name: str, checkpoint) -> tuple[nn.Module, Callable]:
    folder = name[len(MLCD) + 1:] or checkpoint
    if folder is None:
        raise ValueError(f"model '{name}': give the folder, mlcd:FOLDER or checkpoint=FOLDER (config.json and "
                         f"model.safetensors in transformers' MLCDVisionModel or CLIPVisionModel format); "
                         f"nothing is downloaded")
    if name != MLCD and checkpoint is not None and Path(checkpoint) != Path(folder):
        raise ValueError(f"model '{name}' names its folder; checkpoint={checkpoint} would be another")
    return load_mlcd_folder(folder)


def mlcd_folder(folder: str | os.PathLike) -> tuple[ModuleType, dict]:
    """(the module that reads this MLCD folder: mlcd_vit or mlcd_clip, its architecture), from config.json's
    model_type; the weight file(s) must be there, but are not read. A missing file, another model_type or a
    value the reader does not take raises, naming the file."""
    path, config = read_config_json(folder, "MLCD model folder")
    kind = config.get("model_type")
    module = next((m for m in MLCD_FORMATS if kind in m.MODEL_TYPES), None)
    if module is None:
        known = "; ".join(f"{' / '.join(map(repr, m.MODEL_TYPES))} ({m.FORMAT})" for m in MLCD_FORMATS)
        raise ValueError(f"{path}: model_type {kind!r} is not an MLCD release format; mlcd: reads {known}")
    arch = module.read_hf_config(folder)
    weight_files(folder)
    return module, arch


def mlcd_folder_title(folder: str | os.PathLike) -> str:
    """How results tables name the MLCD model in `folder`: "MLCD ViT-L/14-336 (CLIP format)"."""
    module, arch = mlcd_folder(folder)
    return mlcd_vit.title(arch, module.FORMAT)


def load_mlcd_folder(folder: str | os.PathLike) -> tuple[nn.Module, Callable]:
    """An MLCD folder in either of DeepGlint's release formats (config.json's model_type: mlcd_vision_model /
    mlcd, RoPE2D; clip_vision_model, CLIP format; weights in model.safetensors or sharded, fp32, fp16 or bf16)
    as (eval-mode fp32 model, the release's image transform: CLIP's, at the model's input size). The model
    maps images [B, 3, S, S] to the folder's pooler output [B, model.embed_dim] (the post-LayerNorm class
    token, no projection) and has `.image_size` (S); faults raise one error naming the file."""
    module, _ = mlcd_folder(folder)
    model = module.load_hf(folder)
    return model, clip_transform(model.image_size)


def _load_export(name: str, export: dict, path) -> tuple[nn.Module, Callable]:
    model = export["model"]
    if name not in ("", model):
        raise ValueError(f"{path}: holds a '{model}' backbone, not '{name}'")
    visual = backbone.build(model).eval()
    check_state_dict(visual, export["state_dict"], path, f"the {backbone.description(model)}")
    visual.load_state_dict(export["state_dict"])
    dim = backbone.embed_dim(model)
    if dim != export.get("embed_dim", dim):
        raise ValueError(f"{path}: embed_dim {export['embed_dim']} but '{export['model']}' outputs {dim}")
    return visual, clip_transform(backbone.image_size(model))


def openclip_architecture(name: str, pretrained: str | os.PathLike | None) -> str:
    """The open_clip config to build for weights `pretrained`: `NAME-quickgelu` where the tag was trained
    with QuickGELU (OpenAI's, LAION-400M's and MetaCLIP's ViTs). open_clip 3 only warns on that mismatch and
    builds GELU, which changes every feature of those weights. Files and other tags keep `name`."""
    import open_clip
    if pretrained is None or name.endswith("-quickgelu"):
        return name
    quick = open_clip.pretrained.get_pretrained_cfg(name, str(pretrained)).get("quick_gelu", False)
    return f"{name}-quickgelu" if quick and f"{name}-quickgelu" in open_clip.list_models() else name


def _load_openclip(name: str, pretrained: str | os.PathLike | None) -> tuple[nn.Module, Callable]:
    import open_clip
    from unicom_ds import model_configs
    model_configs.register()
    model = open_clip.create_model(openclip_architecture(name, pretrained),
                                   pretrained=None if pretrained is None else str(pretrained))
    return model.visual, _openclip_transform(model.visual)


def _openclip_transform(visual: nn.Module) -> Callable:
    import open_clip
    cfg = visual.preprocess_cfg
    return open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"], std=cfg["std"],
                                     resize_mode=cfg["resize_mode"], interpolation=cfg["interpolation"])
