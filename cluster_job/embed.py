"""Embed stage: CLIP image and text features of input shards -> RUN/embed/S.{img,txt}.npy, S.keys.txt, S.done.json.

A damaged shard (truncated, or a read error that persists after retries) keeps the rows read before the
damage, and its S.done.json records the damage ("damaged": reason, rows kept, rows lost when the shard's
img2dataset S_stats.json tells). The task that met it exits non-zero after finishing its other shards,
so nothing downstream starts as if all were well; rerunning as is goes on with the rows kept (the
damage stays recorded and reaches RUN/labels/summary.json), `embed.redo_damaged=true` reads exactly the
damaged shards again. Rows whose features come out NaN or inf are skipped, counted as
"nonfinite_feature", and never written.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import sys
import time
from collections import Counter

import numpy as np
import torch
from torch.utils.data import DataLoader

from cluster_job.features import (check_reuse, damage, damage_line, damaged_shards, done_path, embed_dir, embed_identity,
                                  source_run)
from cluster_job.wds_reader import ShardBatches, stats_path
from unicom_ds import model_configs, tblog
from unicom_ds.arrays import torch_device
from unicom_ds.atomic import read_json, save_npy_atomic, write_json_atomic, write_text_atomic
from unicom_ds.config import as_config, check_same
from unicom_ds.decode import TensorPreprocess, decode_batch
from unicom_ds.loading import openclip_architecture
from unicom_ds.progress import count, progress
from unicom_ds.shards import check_present, expand, stem

RANDOM_NOTICE = (
    "NOTICE: clip.pretrained=random: the CLIP model is randomly initialised (from `seed`), so its features "
    "(and the clusters made from them) carry no meaning. Real use passes pretrained CLIP weights, e.g. "
    "clip.pretrained=openai or clip.pretrained=/path/to/weights.pt.")


class DamagedShards(RuntimeError):
    """An embed task met damaged shards; their rows before the damage are kept and recorded."""


def load_clip(model_name: str, pretrained: str, device: torch.device, seed: int = 0):
    """(model, preprocess, tokenizer) from open_clip; `random` means no weights at all, drawn from `seed`
    (so every task and every rerun embeds with the same model)."""
    import open_clip

    model_configs.register()
    if pretrained != "random":
        model, _, preprocess = open_clip.create_model_and_transforms(
            openclip_architecture(model_name, pretrained), pretrained=pretrained, device=device)
        return model.eval(), preprocess, open_clip.get_tokenizer(model_name)
    print(RANDOM_NOTICE, file=sys.stderr, flush=True)
    with torch.random.fork_rng(devices=[]):  # open_clip initialises on the CPU, then moves to `device`
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def shard_config(cfg, path: str) -> dict:
    """What made a shard's features: recorded in its done.json and compared on a rerun."""
    return {**embed_identity(cfg), "data.shard": str(path)}


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


def finite_rows(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """Rows whose image and text features are both finite (NaN or inf anywhere disqualifies a row)."""
    return np.isfinite(img).all(axis=1) & np.isfinite(txt).all(axis=1)


def rows_lost(path: str, rows_read: int) -> int | None:
    """Rows a damaged shard did not give, from img2dataset's S_stats.json ("successes"); None: unknown."""
    stats = stats_path(path)
    if not stats.is_file():
        return None
    successes = int(read_json(stats).get("successes", -1))
    return successes - rows_read if successes >= rows_read else None


def device_preprocess(preprocess, device: torch.device) -> TensorPreprocess | None:
    """The preprocess as tensor operations where images decode on the device (CUDA: nvJPEG), else
    None: the CPU workers decode and preprocess with PIL."""
    if device.type != "cuda":
        return None
    try:
        return TensorPreprocess(preprocess)
    except ValueError as e:
        print(f"embed: decoding on the CPU: {e}", file=sys.stderr, flush=True)
        return None


def decode_on(batch: dict, tensor_pre: TensorPreprocess, device: torch.device, skipped: Counter) -> dict:
    """A batch of raw image bytes decoded and preprocessed on `device`; members that decode nowhere
    (not even with PIL on the CPU) are dropped and counted as corrupt_image, as the CPU path does."""
    images, _ = decode_batch(batch["raw"], device)
    keep = [i for i, image in enumerate(images) if image is not None]
    skipped["corrupt_image"] += len(images) - len(keep)
    out = {"keys": [batch["keys"][i] for i in keep], "tokens": batch["tokens"][keep]}
    if keep:
        out["images"] = torch.stack([tensor_pre(images[i]) for i in keep])
    return out


def embed_shard(cfg, path: str, model, preprocess, tokenizer, device: torch.device, desc: str = "") -> dict:
    """Embed one input shard and write its four files, done.json last. Returns done.json's content."""
    start = time.monotonic()
    out, s = embed_dir(cfg.run_dir), stem(path)
    workers = int(cfg.embed.workers)
    if workers and multiprocessing.current_process().daemon:  # e.g. a multiprocessing.Pool worker
        print(f"embed {s}: decoding in the main process: a daemonic process cannot start embed.workers",
              file=sys.stderr, flush=True)
        workers = 0
    tensor_pre = device_preprocess(preprocess, device)
    loader = DataLoader(ShardBatches(path, cfg.embed.batch_size, preprocess, tokenizer, raw_images=tensor_pre is not None),
                        batch_size=None,
                        num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=False, prefetch_factor=2 if workers else None)
    keys, imgs, txts, skipped, faults = [], [], [], Counter(), []

    def batches():  # the workers' end records carry the tar's fault, not rows
        for b in loader:
            if b.get("end"):
                faults.append(b["fault"])
            else:
                yield b

    for batch in progress(batches(), desc=desc or f"embed {s}", mode=cfg.progress, unit="batch",
                          rows=lambda b: len(b["keys"]) + sum(b["skipped"].values())):
        skipped.update(batch["skipped"])
        if batch["keys"] and tensor_pre is not None:
            batch = decode_on(batch, tensor_pre, device, skipped)
        if batch["keys"]:
            img, txt = encode(model, batch["images"], batch["tokens"], device)
            ok = finite_rows(img, txt)
            if not ok.all():
                skipped["nonfinite_feature"] += int((~ok).sum())
            keys.extend(k for k, good in zip(batch["keys"], ok) if good)
            imgs.append(img[ok])
            txts.append(txt[ok])
    d = int(model.visual.output_dim)
    save_npy_atomic(out / f"{s}.img.npy", np.concatenate(imgs) if imgs else np.zeros((0, d), np.float16))
    save_npy_atomic(out / f"{s}.txt.npy", np.concatenate(txts) if txts else np.zeros((0, d), np.float16))
    write_text_atomic(out / f"{s}.keys.txt", "".join(k + "\n" for k in keys))
    damaged, fault = None, next((f for f in faults if f), None)
    if fault:
        read = len(keys) + sum(skipped.values()) - skipped["truncated"]  # the cut row is lost, not bad
        damaged = {"reason": fault, "rows_kept": len(keys), "rows_lost": rows_lost(path, read)}
    done = {"n": len(keys), "d": d, "skipped": dict(sorted(skipped.items())), "damaged": damaged,
            "config": shard_config(cfg, path), "seconds": round(time.monotonic() - start, 3)}
    write_json_atomic(done_path(cfg.run_dir, s), done)
    if damaged:
        lost = "an unknown number" if damaged["rows_lost"] is None else f"{damaged['rows_lost']:,}"
        print(f"embed {s}: {path} is DAMAGED ({fault}); kept {count(len(keys), 'row')} read before it, "
              f"lost {lost}", file=sys.stderr, flush=True)
    return done


def finished(cfg, path: str) -> dict | None:
    """The done.json of an input shard in this run, None when not embedded; refuses another config's."""
    marker = done_path(cfg.run_dir, stem(path))
    if not marker.is_file():
        return None
    done = read_json(marker)
    check_same(done.get("config", {}), shard_config(cfg, path), marker,
               "features made another way cannot be mixed with these: use a new run_dir (this one keeps its "
               f"own), or delete {embed_dir(cfg.run_dir)} to embed again here")
    return done


def pending(cfg, shards: list[str]) -> tuple[list[str], list[dict]]:
    """(shards to embed, damage of the done shards kept as they are). To embed: those without done.json,
    plus the damaged ones with `embed.redo_damaged`."""
    todo, kept = [], []
    for path in shards:
        done = finished(cfg, path)
        if done is None or (damage(done) and cfg.embed.redo_damaged):
            todo.append(path)
        elif damage(done):
            kept.append({"shard": stem(path), **damage(done)})
    return todo, kept


def embed_shards(cfg, shards: list[str]) -> list[dict]:
    """Job function: embed the given input shards (skipping finished ones). Returns their done.json contents.

    Raises DamagedShards, after all its shards are done, when one of them came out damaged."""
    cfg = as_config(cfg)
    shards = list(shards)
    if source_run(cfg) != str(cfg.run_dir):
        check_reuse(cfg, [stem(p) for p in shards])
        print(f"embed: all {len(shards)} shards reused from {embed_dir(source_run(cfg))} (embed.from)",
              file=sys.stderr, flush=True)
        return []
    todo, kept = pending(cfg, shards)
    print(f"embed: {len(shards) - len(todo)} of {len(shards)} shards already done"
          + (" (damaged ones are redone: embed.redo_damaged=true)" if cfg.embed.redo_damaged else ""),
          file=sys.stderr, flush=True)
    if kept:
        print(f"embed: going on with {damage_line(kept)}, as recorded in their done.json; "
              "embed.redo_damaged=true reads them again", file=sys.stderr, flush=True)
    if not todo:
        return []
    check_present(todo)  # gone since submission: say so now, not as a shard recorded damaged after retries
    device = torch_device(cfg.device)
    start = time.monotonic()
    model, preprocess, tokenizer = load_clip(cfg.clip.model, cfg.clip.pretrained, device, int(cfg.seed))
    order = {p: i for i, p in enumerate(expand(cfg.data.shards))}  # TensorBoard step: the shard's place in data.shards
    # shards_done as this task sees it: the markers found at its start plus the new ones it writes
    shards_done = len(list(embed_dir(cfg.run_dir).glob("*.done.json")))
    done = []
    with tblog.writer(cfg.run_dir, "embed") as tb:
        for i, path in enumerate(todo):
            shards_done += not done_path(cfg.run_dir, stem(path)).is_file()
            done.append(embed_shard(cfg, path, model, preprocess, tokenizer, device,
                                    desc=f"embed {stem(path)}, shard {i + 1}/{len(todo)}"))
            log_shard(tb, order.get(path, i), done[-1], shards_done)
    rows, skipped = sum(d["n"] for d in done), Counter()
    for d in done:
        skipped.update(d["skipped"])
    new = damaged_shards([stem(p) for p in todo], done)
    print(f"embed: {count(len(done), 'shard')}, {count(rows, 'row')} embedded, {count(sum(skipped.values()), 'row')} skipped"
          + (f" ({', '.join(f'{r}: {c:,}' for r, c in sorted(skipped.items()))})" if skipped else "")
          + (f", {damage_line(new)}" if new else "")
          + f", {time.monotonic() - start:.1f}s -> {embed_dir(cfg.run_dir)}", file=sys.stderr, flush=True)
    if new:
        raise DamagedShards(
            f"embed: {damage_line(new)}: " + "; ".join(f"{d['shard']}: {d['reason']}" for d in new)
            + ". Their rows before the damage are kept and the damage is recorded in their done.json. "
            "Rerun with embed.redo_damaged=true to read exactly these shards again, or rerun as is to go on "
            "with the rows kept.")
    return done


def log_shard(tb, step: int, done: dict, shards_done: int) -> None:
    """TensorBoard scalars of one embedded shard: throughput, skipped rows by reason, damage, progress."""
    tb.add_scalar("embed/images_per_s", done["n"] / max(done["seconds"], 1e-9), step)
    tb.add_scalar("embed/rows", done["n"], step)
    for reason, rows in done["skipped"].items():
        tb.add_scalar(f"embed/skipped/{reason}", rows, step)
    tb.add_scalar("embed/damaged", int(bool(done["damaged"])), step)
    tb.add_scalar("embed/shards_done", shards_done, step)
