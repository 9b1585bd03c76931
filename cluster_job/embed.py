"""Embed stage: CLIP image and text features of input shards -> RUN/embed/S.{img,txt}.npy, S.keys.txt, S.done.json."""
from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader

from cluster_job.features import EMBED_KEYS, done_path, embed_dir
from cluster_job.wds_reader import ShardBatches
from unicom_ds import model_configs
from unicom_ds.arrays import torch_device
from unicom_ds.atomic import read_json, save_npy_atomic, write_json_atomic, write_text_atomic
from unicom_ds.config import as_config, check_same, select
from unicom_ds.progress import progress
from unicom_ds.shards import stem

RANDOM_NOTICE = (
    "NOTICE: clip.pretrained=random: the CLIP model is randomly initialised, so its features (and the "
    "clusters made from them) carry no meaning. Real use passes pretrained CLIP weights, e.g. "
    "clip.pretrained=openai or clip.pretrained=/path/to/weights.pt.")


def load_clip(model_name: str, pretrained: str, device: torch.device):
    """(model, preprocess, tokenizer) from open_clip; `random` means no weights at all."""
    import open_clip

    model_configs.register()
    if pretrained == "random":
        print(RANDOM_NOTICE, file=sys.stderr, flush=True)
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=None if pretrained == "random" else pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def shard_config(cfg, path: str) -> dict:
    """What made a shard's features: recorded in its done.json and compared on a rerun."""
    return {**select(cfg, EMBED_KEYS), "data.shard": str(path)}


@torch.no_grad()
def encode(model, images: torch.Tensor, tokens: torch.Tensor, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised image and text features as float16 (normalised in float32 first)."""
    amp = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    with amp:
        img = model.encode_image(images.to(device, non_blocking=True))
        txt = model.encode_text(tokens.to(device, non_blocking=True))
    img = torch.nn.functional.normalize(img.float(), dim=-1)
    txt = torch.nn.functional.normalize(txt.float(), dim=-1)
    return img.half().cpu().numpy(), txt.half().cpu().numpy()


def embed_shard(cfg, path: str, model, preprocess, tokenizer, device: torch.device) -> dict:
    """Embed one input shard and write its four files, done.json last. Returns done.json's content."""
    start = time.monotonic()
    out, s = embed_dir(cfg.run_dir), stem(path)
    workers = int(cfg.embed.workers)
    if workers and multiprocessing.current_process().daemon:  # e.g. a multiprocessing.Pool worker
        print(f"embed {s}: decoding in the main process: a daemonic process cannot start embed.workers",
              file=sys.stderr, flush=True)
        workers = 0
    loader = DataLoader(ShardBatches(path, cfg.embed.batch_size, preprocess, tokenizer), batch_size=None,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=2 if workers else None)
    keys, imgs, txts, skipped, fault = [], [], [], Counter(), None
    for batch in progress(loader, desc=f"embed {s}", mode=cfg.progress):
        skipped.update(batch["skipped"])
        fault = fault or batch["fault"]
        if batch["keys"]:
            img, txt = encode(model, batch["images"], batch["tokens"], device)
            keys.extend(batch["keys"])
            imgs.append(img)
            txts.append(txt)
    d = int(model.visual.output_dim)
    save_npy_atomic(out / f"{s}.img.npy", np.concatenate(imgs) if imgs else np.zeros((0, d), np.float16))
    save_npy_atomic(out / f"{s}.txt.npy", np.concatenate(txts) if txts else np.zeros((0, d), np.float16))
    write_text_atomic(out / f"{s}.keys.txt", "".join(k + "\n" for k in keys))
    done = {"n": len(keys), "d": d, "skipped": dict(sorted(skipped.items())), "fault": fault,
            "config": shard_config(cfg, path), "seconds": round(time.monotonic() - start, 3)}
    write_json_atomic(done_path(cfg.run_dir, s), done)
    if fault:
        print(f"embed {s}: {path} is damaged ({fault}); kept the {len(keys)} rows read before it",
              file=sys.stderr, flush=True)
    return done


def pending(cfg, shards: list[str]) -> list[str]:
    """Shards without done.json; a done.json made with another config is an error, not a skip."""
    todo = []
    for path in shards:
        marker = done_path(cfg.run_dir, stem(path))
        if marker.is_file():
            check_same(read_json(marker).get("config", {}), shard_config(cfg, path), marker)
        else:
            todo.append(path)
    return todo


def embed_shards(cfg, shards: list[str]) -> list[dict]:
    """Job function: embed the given input shards (skipping finished ones). Returns their done.json contents."""
    cfg = as_config(cfg)
    todo = pending(cfg, list(shards))
    print(f"embed: {len(shards) - len(todo)} of {len(shards)} shards already done", file=sys.stderr, flush=True)
    if not todo:
        return []
    device = torch_device(cfg.device)
    start = time.monotonic()
    model, preprocess, tokenizer = load_clip(cfg.clip.model, cfg.clip.pretrained, device)
    done = [embed_shard(cfg, p, model, preprocess, tokenizer, device) for p in todo]
    skipped = sum(sum(d["skipped"].values()) for d in done)
    print(f"embed: {len(done)} shard(s), {sum(d['n'] for d in done)} rows, {skipped} skipped, "
          f"{time.monotonic() - start:.1f}s -> {embed_dir(cfg.run_dir)}", file=sys.stderr, flush=True)
    return done
