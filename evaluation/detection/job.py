"""The detect stage: Mask R-CNN with a ViTDet backbone, fine-tuned on COCO train2017, scored on val2017.

    python slurm/submit.py stage=detect run_dir=RUN detect.data_root=/data/coco
    python -m evaluation.detection.job run_dir=RUN detect.data_root=/data/coco     # here, one process

`detect.model` takes the eval stage's model syntax (`run`, `unicom:NAME@FILE`, `openclip:NAME@TAG_OR_FILE`,
`ckpt:NAME@FILE`, `mlcd:FOLDER`); every model `unicom_ds.load` knows becomes the backbone. Outputs, per model label:

    RUN/detect/<label>/ckpt/step_N.pt, latest   atomic checkpoints (model, optimizer, RNG, step)
    RUN/detect/<label>/metrics.json             COCOeval box and mask AP, written last: the done marker
    RUN/eval/results.json, results.md           {label: {"coco": {"box/AP": ..., "mask/AP": ...}}}, Tab. 9
                                                ("shapes" in place of "coco" for the demo's synthetic set)
    RUN/tensorboard/detect                      losses, lr, APs

Distribution: torch DDP, one task per GPU (NCCL; gloo on CPU). DeepSpeed's ZeRO would shard optimizer
state that is small here (a ViT-B Mask R-CNN is ~110M parameters, ~1.3 GB of AdamW state, which every
GPU holds easily), and torchvision's Mask R-CNN, with per-image targets of varying size, runs under
DDP as its reference scripts and ViTDet (detectron2) do. Every rank holds the same weights, so rank 0
alone writes the checkpoints. A run resumes from `latest` by itself: a requeued SLURM job (at the time
limit, as `TrainJob`) and a rerun continue where the last checkpoint left off, with the same data
stream and RNG state, so a resumed run matches an uninterrupted one.
"""
from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import submitit
import torch

from unicom_ds import config as config_mod
from unicom_ds.atomic import atomic_path, read_json, write_json_atomic, write_text_atomic
from unicom_ds.config import ConfigError

# The keys a checkpoint and the final metrics depend on: a resume or a rerun must match them
# (detect.steps may grow: a longer run continues from the last checkpoint).
MADE_WITH = ("seed", "model", "detect.model", "detect.image_size", "detect.scale_range", "detect.batch_size",
             "detect.lr", "detect.warmup_steps", "detect.decay_steps", "detect.weight_decay", "detect.layer_decay",
             "detect.drop_path", "detect.window_size", "detect.global_blocks", "detect.fpn_channels",
             "detect.rois_per_image", "detect.rpn_pre_nms_topk", "detect.rpn_post_nms_topk", "detect.rel_pos")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval's first six stats, in its order


def lr_factor(step: int, warmup: int, decay_steps, gamma: float = 0.1) -> float:
    """ViTDet's (detectron2's) schedule at `step` (0-based): linear warmup from 0.001 over `warmup`
    steps, then the lr times `gamma` at each of `decay_steps`."""
    warm = 1.0 if step >= warmup else 0.001 + (1 - 0.001) * step / warmup
    return warm * gamma ** sum(step >= s for s in decay_steps)


def dataset_key(data_root: str) -> str:
    """The results.json data-set key: "shapes" for the demo's synthetic set (its marker file), else "coco", so
    the synthetic set's AP never stands in a COCO table."""
    from evaluation.detection import synthetic
    return "shapes" if (Path(str(data_root)) / synthetic.MARKER).is_file() else "coco"


def model_spec(cfg):
    from evaluation.run import job_model
    return job_model(str(cfg.detect.model), "detect.model", cfg)


def check(cfg: Any, world: int = 1) -> list[str]:
    """Everything that can fail before submission: the model, its file, the COCO files, the batch split
    over `world` ranks. Returns the plan lines the launcher prints."""
    from evaluation.detection import data
    from evaluation.run import _check_model_name
    cfg = config_mod.as_config(cfg)
    d = cfg.detect
    spec = model_spec(cfg)
    _check_model_name(spec)
    if spec.is_file and not Path(spec.checkpoint).is_file() and not (str(d.model) == "run" and cfg.stage == "all"):
        raise FileNotFoundError(f"detect.model={d.model}: checkpoint {spec.checkpoint} does not exist")
    data.check_files(str(d.data_root))
    check_outputs(out_dir(cfg, spec.label), config_mod.select(cfg, MADE_WITH))
    if int(d.batch_size) % world:
        raise ConfigError(f"detect.batch_size={d.batch_size}: must split evenly over the {world} rank(s)")
    for key in ("rpn_pre_nms_topk", "rpn_post_nms_topk"):
        if len(d[key]) != 2:
            raise ConfigError(f"detect.{key}={list(d[key])}: two numbers, [training, testing]")
    if list(d.decay_steps) != sorted(d.decay_steps):
        raise ConfigError(f"detect.decay_steps={list(d.decay_steps)}: must be increasing")
    images = int(d.steps) * int(d.batch_size)
    decay = "ViTDet's layer decay for its size" if d.layer_decay is None else f"x{d.layer_decay} per layer"
    return [f"detect: Mask R-CNN on {spec.label} ({spec.name}), {d.steps} steps x batch {d.batch_size} "
            f"({world} rank(s) x {int(d.batch_size) // world}) = {images:,} images at {d.image_size} px, "
            f"lr {d.lr} ({decay} down the ViT), decay x0.1 at {list(d.decay_steps)}, "
            f"window {d.window_size or 'none (global attention)'}"]


# ---- checkpoints ----------------------------------------------------------------------------

def out_dir(cfg, label: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_.@" else "_" for c in label)
    return Path(str(cfg.run_dir)) / "detect" / safe


def latest_step(ckpt: Path) -> int:
    pointer = ckpt / "latest"
    return int(pointer.read_text().strip().rsplit("_", 1)[1].split(".")[0]) if pointer.is_file() else 0


def save_checkpoint(ckpt: Path, step: int, model, optimizer, made_with: dict, keep: int = 2) -> Path:
    """step_N.pt written whole (atomic rename), then `latest` rewritten; older files pruned to `keep`."""
    path = ckpt / f"step_{step}.pt"
    state = {"step": step, "made_with": made_with, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    write_text_atomic(ckpt / "latest", path.name + "\n")
    for old in sorted(ckpt.glob("step_*.pt"), key=lambda p: int(p.stem.split("_")[1]))[:-keep]:
        old.unlink()
    return path


def check_outputs(out: Path, made_with: dict) -> None:
    """A rerun into RUN/detect/<label> may only continue that folder's own run (detect.steps may grow): its
    metrics.json and latest checkpoint must have been made with these keys. The launcher's check."""
    done = out / "metrics.json"
    if done.is_file():
        config_mod.check_same(read_json(done)["made_with"], made_with, done)
    load_checkpoint(out / "ckpt", made_with, mmap=True)  # reads only `made_with` of a checkpoint of GBs


def load_checkpoint(ckpt: Path, made_with: dict, mmap: bool = False) -> dict | None:
    """The `latest` checkpoint (tensors and plain values only: weights_only), None without one; one made
    with another config is refused."""
    pointer = ckpt / "latest"
    if not pointer.is_file():
        return None
    path = ckpt / pointer.read_text().strip()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # a planted pickle payload or a damaged file: say which file, run nothing
        raise ValueError(f"{path}: not a checkpoint this project wrote ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    config_mod.check_same(state["made_with"], made_with, path)
    return state


# ---- training -------------------------------------------------------------------------------

def _normalisation(preprocess) -> tuple[list[float], list[float]]:
    for t in getattr(preprocess, "transforms", ()):
        if hasattr(t, "mean") and hasattr(t, "std"):
            return [float(v) for v in t.mean], [float(v) for v in t.std]
    raise ValueError("the model's preprocess has no Normalize step")


def _device(cfg) -> torch.device:
    if str(cfg.device) == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


class Detector:
    """One rank's share of training and evaluation of one backbone."""

    def __init__(self, cfg):
        from unicom_ds.dist import rank_world
        self.cfg, self.d = cfg, cfg.detect
        self.rank, self.world = rank_world()
        self.spec = model_spec(cfg)
        self.out = out_dir(cfg, self.spec.label)
        self.made_with = config_mod.select(cfg, MADE_WITH)
        self.device = _device(cfg)

    def log(self, text: str) -> None:
        if self.rank == 0:
            print(f"[detect {self.spec.label}] {text}", flush=True)

    def recipe(self, depth: int) -> tuple[float, float]:
        """(layer decay, drop path): detect.layer_decay and detect.drop_path, ViTDet's for the size where null."""
        from evaluation.detection.backbone import recipe
        return recipe(depth, self.d.layer_decay, self.d.drop_path)

    def build(self, num_classes: int):
        from unicom_ds.loading import load
        from evaluation.detection.backbone import build_model, vit_depth
        vit, preprocess = load(self.spec.name, self.spec.checkpoint, device="cpu")
        mean, std = _normalisation(preprocess)
        blocks = None if self.d.global_blocks is None else [int(b) for b in self.d.global_blocks]
        layer_decay, drop_path = self.recipe(vit_depth(vit))
        self.log(f"{vit_depth(vit)} blocks: layer decay {layer_decay}, drop path {drop_path}")
        torch.manual_seed(int(self.cfg.seed))  # the new layers' init: the same on every rank and every rerun
        model = build_model(vit, num_classes, int(self.d.image_size), mean, std, int(self.d.window_size),
                            blocks, drop_path, int(self.d.fpn_channels),
                            int(self.d.rois_per_image), tuple(self.d.rpn_pre_nms_topk), tuple(self.d.rpn_post_nms_topk),
                            bool(self.d.rel_pos))
        return model.to(self.device), mean

    def optimizer(self, model):
        from evaluation.detection.backbone import param_groups
        layer_decay, _ = self.recipe(len(model.backbone.body.blocks))
        groups = param_groups(model, float(self.d.lr), float(self.d.weight_decay), layer_decay)
        return torch.optim.AdamW(groups, lr=float(self.d.lr), betas=(0.9, 0.999))

    def loader(self, train_split, mean, start: int):
        from evaluation.detection.data import TrainItems, collate
        per_rank = int(self.d.batch_size) // self.world
        batch = int(self.d.batch_size)
        # Items of step s on this rank: s * batch + rank * per_rank + (0 .. per_rank - 1).
        keys = [s * batch + self.rank * per_rank + j for s in range(start, int(self.d.steps)) for j in range(per_rank)]
        items = TrainItems(train_split, int(self.d.image_size), list(self.d.scale_range), int(self.cfg.seed), mean)
        workers = int(self.d.workers)
        return torch.utils.data.DataLoader(items, batch_size=per_rank, sampler=keys, collate_fn=collate,
                                           num_workers=workers, persistent_workers=False,
                                           prefetch_factor=4 if workers else None)

    def train(self, model, train_split, mean) -> None:
        from unicom_ds import tblog
        from unicom_ds.dist import all_reduce_
        from unicom_ds.progress import progress
        ckpt = self.out / "ckpt"
        steps = int(self.d.steps)
        optimizer = self.optimizer(model)
        state = load_checkpoint(ckpt, self.made_with)
        start = 0 if state is None else int(state["step"])
        if start > steps:
            raise ConfigError(f"{ckpt}: holds step {start}, past detect.steps={steps}; use a new run_dir")
        if start == steps:
            model.load_state_dict(state["model"])
            return
        torch.manual_seed(int(self.cfg.seed) + self.rank)
        batches = iter(self.loader(train_split, mean, start))  # draws its base seed before the RNG restore
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["torch_rng"])
            self.log(f"resumed from {ckpt / ('step_%d.pt' % start)}")
        net = model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        net.train()
        tb = tblog.writer(str(self.cfg.run_dir), "detect") if self.rank == 0 else None
        amp = bool(self.d.amp) and self.device.type == "cuda"
        bad, t0, seen = 0, time.monotonic(), 0
        mode = str(self.cfg.progress) if self.rank == 0 else "off"
        desc = f"detect {self.spec.label}, rank {self.rank} of {self.world}"
        self.log(f"training steps {start} -> {steps}")  # a progress line comes only every 30 s
        for step, (images, targets) in zip(range(start, steps),
                                           progress(batches, total=steps - start, desc=desc, mode=mode, unit="step")):
            factor = lr_factor(step, int(self.d.warmup_steps), list(self.d.decay_steps))
            for g in optimizer.param_groups:
                g["lr"] = float(self.d.lr) * g["lr_scale"] * factor
            images = [im.to(self.device, non_blocking=True) for im in images]
            targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                losses = net(images, targets)
            loss = sum(losses.values())
            losses = {k: v.detach() for k, v in losses.items()}
            # Skip a non-finite step on every rank together (DDP's backward is a collective).
            finite = all_reduce_(torch.tensor([float(torch.isfinite(loss))], device=self.device), "sum")
            optimizer.zero_grad(set_to_none=True)
            if finite.item() < self.world:
                bad += 1
                self.log(f"step {step + 1}: non-finite loss, skipped ({bad} of at most {self.d.max_bad_steps})")
                if bad > int(self.d.max_bad_steps):
                    raise RuntimeError(f"detect: more than detect.max_bad_steps={self.d.max_bad_steps} "
                                       f"non-finite steps; last checkpoint kept in {ckpt}")
                continue
            loss.backward()
            optimizer.step()
            seen += len(images) * self.world
            done = step + 1
            if tb is not None and (done % int(self.d.log_every) == 0 or done == steps):
                for k, v in losses.items():
                    tb.add_scalar(f"detect/{k}", v.item(), done)
                tb.add_scalar("detect/loss", loss.item(), done)
                tb.add_scalar("detect/lr", float(self.d.lr) * factor, done)
                tb.add_scalar("detect/images_per_s", seen / max(1e-9, time.monotonic() - t0), done)
            if done % int(self.d.ckpt_every_steps) == 0 or done == steps:
                if self.rank == 0:
                    save_checkpoint(ckpt, done, model, optimizer, self.made_with)
                if self.world > 1:
                    torch.distributed.barrier()
        if tb is not None:
            tb.close()
        self.log(f"trained {steps - start} step(s) in {time.monotonic() - t0:.0f}s, {bad} skipped; "
                 f"checkpoint {ckpt / ('step_%d.pt' % steps)}")

    @torch.no_grad()
    def predict(self, model, split) -> list[dict]:
        """COCO-format results of this rank's share of the images (boxes xywh, masks as RLE)."""
        import numpy as np
        from pycocotools import mask as mask_utils
        from unicom_ds.progress import progress
        from evaluation.detection.data import to_tensor
        model.eval()
        ids = split.image_ids[self.rank::self.world]
        size = int(self.d.eval_batch_size)
        chunks = [ids[i:i + size] for i in range(0, len(ids), size)]
        out = []
        mode = str(self.cfg.progress) if self.rank == 0 else "off"
        for chunk in progress(chunks, total=len(chunks), desc=f"detect {self.spec.label} on val2017",
                              mode=mode, unit="batch"):
            images = [to_tensor(split.image(i)).to(self.device) for i in chunk]
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bool(self.d.amp) and self.device.type == "cuda"):
                preds = model(images)
            for image_id, p in zip(chunk, preds):
                boxes = p["boxes"].float().cpu().numpy()
                masks = (p["masks"][:, 0] > 0.5).cpu().numpy().astype(np.uint8)
                for box, score, label, m in zip(boxes, p["scores"].tolist(), p["labels"].tolist(), masks):
                    rle = mask_utils.encode(np.asfortranarray(m))
                    rle["counts"] = rle["counts"].decode("ascii")
                    x0, y0, x1, y1 = (float(v) for v in box)
                    out.append({"image_id": int(image_id), "category_id": split.category_of[int(label)],
                                "bbox": [x0, y0, x1 - x0, y1 - y0], "score": float(score), "segmentation": rle})
        return out

    def run(self) -> dict | None:
        from evaluation.detection.data import CocoSplit
        done = self.out / "metrics.json"
        if done.is_file():
            record = read_json(done)
            config_mod.check_same(record["made_with"], self.made_with, done)
            if int(record["steps"]) == int(self.d.steps):
                self.log(f"already done: {done}")
                return record["metrics"] if self.rank == 0 else None
        root = str(self.d.data_root)
        train_split, val_split = CocoSplit(root, "train2017", train=True), CocoSplit(root, "val2017", train=False)
        model, mean = self.build(train_split.num_classes)
        self.log(f"{len(train_split):,} training images, {len(val_split):,} val images, "
                 f"{train_split.num_classes - 1} categories, {sum(p.numel() for p in model.parameters()):,} parameters")
        boxes = {s.split: s.box_faults for s in (train_split, val_split)}
        for split, faults in boxes.items():
            if any(faults.values()):
                self.log(f"{split}: {faults['clipped']:,} boxes reaching outside their image clipped to it, "
                         f"{faults['dropped']:,} with nothing inside dropped")
        self.train(model, train_split, mean)
        preds = self.predict(model, val_split)
        if self.world > 1:
            parts = [None] * self.world
            torch.distributed.all_gather_object(parts, preds)
            preds = [p for part in parts for p in part]
        if self.rank != 0:
            return None
        metrics = coco_metrics(val_split.coco, preds)
        write_json_atomic(done, {"made_with": self.made_with, "steps": int(self.d.steps), "metrics": metrics,
                                 "boxes": boxes})
        return metrics


def coco_metrics(coco_gt, predictions: list[dict]) -> dict[str, float]:
    """COCOeval `bbox` and `segm` AP, AP50, AP75, APs/m/l as fractions ("box/AP", "mask/AP50", ...).
    No detections scores 0; a size class without ground truth (COCOeval's -1) is left out."""
    import contextlib
    import io
    from pycocotools.cocoeval import COCOeval
    out: dict[str, float] = {}
    for iou_type, prefix in (("bbox", "box"), ("segm", "mask")):
        if not predictions:
            stats = [0.0] * len(METRICS)
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                dt = coco_gt.loadRes([dict(p) for p in predictions])
                ev = COCOeval(coco_gt, dt, iou_type)
                ev.evaluate(), ev.accumulate(), ev.summarize()
            stats = [float(s) for s in ev.stats[: len(METRICS)]]
        out.update({f"{prefix}/{m}": s for m, s in zip(METRICS, stats) if s >= 0 and math.isfinite(s)})
    return out


def detect(cfg: Any) -> dict | None:
    """Train and evaluate `detect.model` on this process's ranks; rank 0 writes RUN/eval and returns the metrics."""
    from evaluation import results
    from unicom_ds import tblog
    cfg = config_mod.as_config(cfg)
    start = time.monotonic()
    det = Detector(cfg)
    metrics = det.run()
    if metrics is None:
        return None
    label, dataset = det.spec.label, dataset_key(cfg.detect.data_root)
    results.write_all(cfg.run_dir, {label: {dataset: metrics}}, {})
    with tblog.writer(str(cfg.run_dir), "detect") as w:
        for k, v in metrics.items():
            w.add_scalar(f"detect/{label}/{k}", v, int(cfg.detect.steps))
    # This job's table only: the eval stage before it has printed the others (results.md holds them all).
    print(results.markdown({label: {dataset: metrics}}), flush=True)
    out = Path(str(cfg.run_dir))
    print(f"detect: {label} box AP {100 * metrics.get('box/AP', 0):.1f}, mask AP {100 * metrics.get('mask/AP', 0):.1f} "
          f"({time.monotonic() - start:.0f}s); {det.out}/metrics.json, {out}/eval/results.json and results.md, "
          f"TensorBoard {out / 'tensorboard' / 'detect'}", flush=True)
    return metrics


class DetectJob(submitit.helpers.Checkpointable):
    """The SLURM job (and the local one): one task per GPU joined in a process group, requeued at the time
    limit; the requeued job resumes from the latest checkpoint by itself."""

    def __call__(self, cfg: dict) -> dict | None:
        from evaluation.run import task_rank_world
        rank, world = task_rank_world()
        if world > 1 and not torch.distributed.is_initialized():
            from unicom_ds.train import master_port
            env = submitit.JobEnvironment()
            os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(env.local_rank),
                               "MASTER_ADDR": env.hostnames[0], "MASTER_PORT": str(master_port(env.job_id))})
            gpu = torch.cuda.is_available() and str(config_mod.as_config(cfg).device) != "cpu"
            if gpu:
                torch.cuda.set_device(env.local_rank)
            torch.distributed.init_process_group("nccl" if gpu else "gloo")
        return detect(cfg)

    def checkpoint(self, cfg: dict) -> submitit.helpers.DelayedSubmission:
        # The periodic saves are the checkpoints (a save mid-step on one task would race the others).
        return submitit.helpers.DelayedSubmission(DetectJob(), cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg = config_mod.resolve(["stage=detect", *argv])
        check(cfg)
        config_mod.save(cfg)
    except (ConfigError, ValueError, LookupError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    detect(config_mod.select(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
