"""Train checkpoints: RUN/train/ckpt/step_N/ written whole or not at all.

A save goes to a staging folder, `.step_N.tmp`, that every rank writes into (the DeepSpeed engine
state under `engine/`, one `rank_R.pt` per rank with its prototype block, the block's optimizer
state and RNG states), then rank 0 adds `meta.json`, renames the folder to `step_N` and last
rewrites the `latest` pointer file atomically. A crash at any point before that leaves `latest`
naming the previous, complete checkpoint; the next save clears the stale staging folder (a save that meets
a full disk removes it at once).

Only this project's files are unpickled: the rank files hold plain tensors and Python scalars and are
read with `weights_only=True`. DeepSpeed's engine files need a full unpickler, so they are read only
from the run's own checkpoint folder unless the user says `train.trust_checkpoint=true`.
"""
from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from unicom_ds.atomic import atomic_path, read_json, write_json_atomic, write_text_atomic
from unicom_ds.config import ConfigError
from unicom_ds.disk import DiskFull
from unicom_ds.prototypes import block_range, reslice

ENGINE_TAG = "engine"
LATEST = "latest"
META = "meta.json"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "train" / "ckpt"


def step_name(step: int) -> str:
    return f"step_{step}"


def staging(root: Path, step: int) -> Path:
    return Path(root) / f".{step_name(step)}.tmp"


def rank_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank_{rank:05d}.pt"


def begin(root: Path, step: int) -> Path:
    """Rank 0, before the others write: an empty staging folder (a crashed save's leftovers removed)."""
    tmp = staging(root, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_rank_state(folder: Path, rank: int, state: dict) -> None:
    with atomic_path(rank_file(folder, rank)) as tmp:
        torch.save(state, tmp)


def commit(root: Path, step: int, meta: dict, keep: int) -> Path:
    """Rank 0, after every rank has written: publish the staging folder as step_N, then point `latest` at it."""
    root, tmp = Path(root), staging(root, step)
    missing = [r for r in range(int(meta["world_size"])) if not rank_file(tmp, r).is_file()]
    if missing:
        raise RuntimeError(f"checkpoint {tmp}: rank files missing for ranks {missing}; not publishing it")
    try:
        write_json_atomic(tmp / META, {**meta, "step": step})
    except DiskFull:  # a full disk keeps no more than it held before the save
        discard(root, step)
        raise
    final = root / step_name(step)
    if final.exists():  # an earlier save of this step that `latest` never pointed at
        shutil.rmtree(final)
    tmp.rename(final)
    write_text_atomic(root / LATEST, final.name + "\n")
    prune(root, keep)
    return final


def discard(root: Path, step: int) -> None:
    """Rank 0, once no rank writes into it any more: a failed save's staging folder goes."""
    shutil.rmtree(staging(root, step), ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints; the one `latest` names always stays."""
    current = latest(root)
    done = sorted((p for p in Path(root).glob("step_*") if (p / META).is_file()),
                  key=lambda p: int(p.name.split("_")[1]))
    for old in done[: max(0, len(done) - max(1, keep))]:
        if old != current:
            shutil.rmtree(old)


def latest(root: Path) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    return Path(root) / pointer.read_text().strip()


def resolve(root: Path, resume: str | None, trust: bool = False, section: str = "train") -> Path | None:
    """The checkpoint folder to resume from: `latest` (None when there is none yet), `none`, or a path.

    A path outside this run's checkpoint folder is refused unless `trust` (`<section>.trust_checkpoint`):
    resuming loads DeepSpeed's engine files, which are pickles that can run code.
    """
    if resume in (None, "none", "None", False):
        done = latest(root)
        if done is not None:  # starting over would overwrite finished work: never on the command's word alone
            raise ConfigError(f"{section}.resume={resume}: {Path(root).parent} holds checkpoints up to {done.name}; "
                              f"training from scratch would overwrite them: use a new run_dir, or remove "
                              f"{Path(root).parent} yourself")
        return None
    path = latest(root) if str(resume) == "latest" else Path(str(resume))
    if path is not None and not (path / META).is_file():
        raise FileNotFoundError(f"{section}.resume={resume}: {path} is not a complete checkpoint (no {META})")
    if path is not None and not trust and Path(root).resolve() not in path.resolve().parents:
        raise ConfigError(f"{section}.resume={resume}: {path} is outside this run's checkpoints ({root}); resuming "
                          f"unpickles DeepSpeed's engine files, which can run code: pass "
                          f"{section}.trust_checkpoint=true if you trust whoever wrote it")
    return path


def read_meta(path: Path) -> dict:
    return read_json(Path(path) / META)


# Checkpoints written before loss.kind existed trained Unicom's loss.
META_DEFAULTS = {"loss_kind": "unicom"}


def identity(meta: dict, keys) -> dict:
    """meta.json's values of `keys` (what a resume must agree with), older checkpoints' defaults filled in."""
    return {k: meta.get(k, META_DEFAULTS.get(k)) for k in keys}


def rng_state() -> dict:
    """RNG states as tensors and Python scalars (numpy's key array as a tensor), so weights_only loads them."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def read_rank_file(path: Path) -> dict:
    """One rank file, unpickled with weights_only=True: a planted payload raises instead of running."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: not a rank file this project wrote (holds objects other than tensors and "
                         f"plain values; refused to unpickle them): {str(e).splitlines()[0]}") from None


def load_rank_states(path: Path, num_classes: int, start: int, end: int) -> list[dict]:
    """The saved rank files whose class blocks overlap [start, end) (any saved rank count)."""
    world = int(read_meta(path)["world_size"])
    states = []
    for r in range(world):
        lo, hi = block_range(num_classes, world, r)
        if hi > start and lo < end:
            state = read_rank_file(rank_file(path, r))
            if tuple(state["class_range"]) != (lo, hi):
                raise ValueError(f"{rank_file(path, r)}: holds classes {state['class_range']}, expected {(lo, hi)}")
            states.append(state)
    return states


def merge_prototype_states(states: list[dict], start: int, end: int) -> tuple[torch.Tensor, dict]:
    """Rows [start, end) of the prototype weight and of its AdamW state, rebuilt from saved blocks.

    Per-row optimizer tensors (moments) are re-sliced like the weight; scalars (`step`) are shared.
    """
    pieces = [(*s["class_range"], s["weight"]) for s in states]
    weight = reslice(pieces, start, end)
    saved = [s["optimizer"]["state"].get(0, {}) for s in states]
    merged = {}
    for key, value in saved[0].items():
        if torch.is_tensor(value) and value.dim() == 2:
            merged[key] = reslice([(*s["class_range"], o[key]) for s, o in zip(states, saved)], start, end)
        else:
            merged[key] = value.clone() if torch.is_tensor(value) else value  # never alias the saved state
    optimizer = {"state": {0: merged} if merged else {}, "param_groups": states[0]["optimizer"]["param_groups"]}
    return weight, optimizer
