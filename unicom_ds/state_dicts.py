"""Reading and checking weights, for every model reader of the library (`loading`, `backbone`, `mlcd_vit`,
`mlcd_clip`): this module is below them all and imports none of them, so they import it without a cycle.

- `read_weights`: a torch.save file, as tensors and plain values only; `is_export` tells a train-stage export
  from a plain state dict; `check_state_dict` compares a state dict with a model key for key.
- A transformers model folder (config.json, and model.safetensors or a sharded model.safetensors.index.json
  with its shards): `read_config_json`, `weight_files`, `read_safetensors`, and `load_checked`, which puts
  tensors of any float dtype into a model after checking every shape against it.

Every fault is one error naming the file and what is wrong.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE = "config.json", "model.safetensors", "model.safetensors.index.json"
WEIGHTS = "a train-stage backbone.pt export, a Unicom release .pt or an open_clip state dict"  # what load() reads


class WeightError(ValueError):
    """Weights that do not hold the architecture their folder names; the message names the file and the keys."""


def read_weights(path, shown=None, expected: str = WEIGHTS) -> dict:
    """The dict a weights file holds, unpickled as tensors and plain values only (weights_only): a planted
    payload is refused, never run. mmap: no tensor data is read until used. Any failure is one ValueError
    naming `shown` (default: the path) and what the file should be (`expected`)."""
    try:
        if not zipfile.is_zipfile(path):  # torch's own message for these talks of mmap
            raise ValueError("not a zip archive as torch.save writes: empty, cut short or another format")
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, dict):
            raise ValueError(f"holds a {type(state).__name__}, not a dict")
    except Exception as e:
        raise ValueError(f"{shown or path}: not a weights file this project can read ({_reason(e)}); expected "
                         f"{expected}; only tensors and plain values are loaded, nothing in it ran") from None
    return state


def _reason(e: Exception) -> str:
    # torch's first line advises weights_only=False (which would run a payload): the line after it says why.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("Weights only load failed")]
    return lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__


def is_export(state: dict) -> bool:
    """A train-stage export ({"model", "embed_dim", "state_dict"}), not a plain state dict."""
    return {"model", "state_dict"} <= set(state)


def check_state_dict(model: nn.Module, state: dict, path, what: str) -> None:
    """Raise naming the file and a few missing / unexpected / mis-shaped keys unless they match exactly."""
    expected = model.state_dict()
    # BatchNorm fills in a missing batch counter itself; it carries no weights.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
    if problems:
        raise ValueError(f"{path}: does not match {what}: " + "; ".join(problems))


# ---- transformers model folders ------------------------------------------------------------------

def read_config_json(folder: str | os.PathLike, what: str) -> tuple[Path, dict]:
    """(path, content) of `folder`/config.json; a missing folder or file raises FileNotFoundError naming it and
    what the folder should be (`what`, e.g. "an MLCD model folder")."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} {folder}: no such folder (expected {CONFIG_FILE} and {WEIGHTS_FILE}, "
                                f"or sharded safetensors with {INDEX_FILE}, as transformers' save_pretrained writes)")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (the {what} holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: holds a {type(config).__name__}, not a JSON object")
    return path, config


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The folder's model.safetensors, or the shards its model.safetensors.index.json names; a missing file
    raises FileNotFoundError naming it."""
    folder = Path(folder)
    single, index = folder / WEIGHTS_FILE, folder / INDEX_FILE
    if single.is_file():
        return [single]
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index}: names shard(s) that are not there: {', '.join(missing)}")
        return [folder / s for s in shards]
    raise FileNotFoundError(f"{single}: no such file (nor a sharded {INDEX_FILE}); the weights of a transformers "
                            f"model folder")


def read_safetensors(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(every tensor of the folder's weight file(s), the file(s) read, for messages)."""
    from safetensors.torch import load_file
    files = weight_files(folder)
    state = {}
    for path in files:
        state.update(load_file(str(path)))
    return state, str(files[0]) if len(files) == 1 else f"{Path(folder) / INDEX_FILE} (shards {', '.join(p.name for p in files)})"


def load_checked(model: nn.Module, state: dict[str, torch.Tensor], source: str, config: Path) -> nn.Module:
    """`model` holding `state` (a complete state dict in its names, any float dtype: copied into the model's),
    after every shape is checked; a mismatch raises WeightError naming `source`, `config` and the keys."""
    bad = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in model.state_dict().items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise WeightError(f"{source}: shapes do not match {config} (file vs config): "
                          f"{'; '.join(bad[:5])}{'; ...' if len(bad) > 5 else ''}")
    model.load_state_dict(state)
    return model
