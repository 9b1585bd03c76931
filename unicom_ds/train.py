"""The train stage: a ViT inside DeepSpeed (ZeRO-2) over the sharded prototype layer.

    deepspeed unicom_ds/train.py --deepspeed_config ds_configs/zero2.json run_dir=RUN [key=value ...]

The backbone and its AdamW live in the engine; the prototype block of each rank lives outside it
with its own AdamW on the same warmup+cosine schedule, stepped at accumulation boundaries. The
same `train(cfg)` runs under the deepspeed launcher, under SLURM (`TrainJob`) and in tests.

A run never destroys its past: a step whose loss or gradients are not finite is skipped on every
rank together (at most train.max_bad_steps per job, then the job stops with an error), a checkpoint
or export with non-finite weights is never written, so `latest` and backbone.pt stay finite.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # Run as a script, this folder would come first on sys.path and its modules (schedule.py,
    # checkpoint.py, ...) would shadow top-level packages of the same name for every library.
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import resource
import socket
import time
from typing import Callable

import submitit
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from unicom_ds import (backbone, checkpoint, config, continuation, disk, quiet, schedule, tblog, train_data,
                       train_plan, unicom_vit)
from unicom_ds.atomic import read_json
from unicom_ds.decode import Augment
from unicom_ds.dist import all_reduce_, prepare_cpu_comm_op, rank_world, unlink_cpu_allreduce_buffer
from unicom_ds.objectives import Objective, PrototypeObjective
from unicom_ds.optim import adamw

TRAIN_PY = Path(__file__).resolve()


EPILOG = """Every other argument is a config key=value, as for slurm/submit.py (e.g. model=ViT-B-16 train.lr=1e-3
loss.r2=0.5 train.continue_from=RUN); the run's RUN/config.yaml is read first. Every key with its default and
meaning: README.md, section "Config keys" (python docs/config_reference.py). dry_run=true prints the plan for
WORLD_SIZE ranks (the deepspeed launcher sets it) and trains nothing."""


class TrainingDiverged(RuntimeError):
    """Too many steps with non-finite loss or gradients, or non-finite weights: nothing more is saved."""


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(
        prog="deepspeed unicom_ds/train.py",
        usage="deepspeed [--num_gpus N] unicom_ds/train.py [--deepspeed_config FILE] run_dir=RUN [key=value ...]",
        description="Unicom training: a ViT in a DeepSpeed ZeRO-2 engine over the sharded prototype layer.",
        epilog=EPILOG)
    ap.add_argument("--deepspeed_config", help="DeepSpeed JSON (default: train.deepspeed_config)")
    ap.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args, overrides = ap.parse_known_args(argv)
    cfg = config.resolve(overrides)
    if args.deepspeed_config:
        cfg.train.deepspeed_config = args.deepspeed_config
    if cfg.dry_run:
        world = int(os.environ.get("WORLD_SIZE", 1))
        lines = train_plan.precheck(cfg, world, f"WORLD_SIZE={world}", labels_expected=True)
        print("\n".join(["dry run: nothing is trained", *lines]))
        return None
    return train(cfg)


def num_classes(source: continuation.LabelSource) -> int:
    path = source.kmeans_summary
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; the train stage needs the cluster stage's k-means summary")
    return int(read_json(path)["k"])


def peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class ShardData:
    """The train stage's data: the image shards of data.shards with the cluster stage's pseudo labels
    joined by __key__. Fine-tuning passes another object with the same three members to `Trainer`."""

    skip_reasons = train_data.SKIP_REASONS

    def __init__(self, cfg: DictConfig):
        self.cfg, self.source = cfg, continuation.label_source(cfg)
        self.classes = num_classes(self.source)
        self.augment = Augment.of(cfg.train.augment)

    def check(self, rank: int, world: int, device: torch.device) -> int:
        """Collective: rank 0 checks every labels file (a few GB at 400M samples), every rank gets the
        verdict; returns the number of labelled samples."""
        outcome = [None]
        if rank == 0:
            try:
                outcome[0] = train_data.check_labels(self.source, self.cfg.data.shards, self.classes,
                                                     progress_mode=self.cfg.progress)
            except (train_data.LabelError, OSError) as e:
                outcome[0] = str(e)
        if world > 1:
            dist.broadcast_object_list(outcome, src=0, device=device)
        if isinstance(outcome[0], str):
            raise train_data.LabelError(f"run_dir={self.cfg.run_dir}: {outcome[0]}")
        self.shards, self.device = outcome[0], device
        if rank == 0 and self.decode_device() is not None:
            print(f"[train] images decode and crop on {device} (train.gpu_decode); the workers only read them", flush=True)
        return self.shards.rows

    def decode_device(self) -> torch.device | None:
        """The rank's GPU with train.gpu_decode (the workers then only read tar members), else None."""
        return self.device if bool(self.cfg.train.gpu_decode) and self.device.type == "cuda" else None

    def batches(self, *, epoch: int, in_epoch: int, accum: int, count: int, micro: int, image_size: int,
                rank: int, world: int, seed: int, workers: int, timeout_s: float):
        """`count` micro batches (images, labels, skipped per reason) of this rank from step `in_epoch` of `epoch`."""
        # Seeded by the position, so a resumed run draws a fresh stream rather than replaying one.
        return train_data.epoch_batches(
            self.shards.urls, self.source, image_size, micro, count,
            seed=hash((seed, epoch, in_epoch)) & 0x7FFFFFFF, rank=rank, workers=workers, timeout_s=timeout_s,
            decode_on=self.decode_device(), augment=self.augment)


class Trainer:
    """One rank's training state: engine, objective, position.

    The train stage uses the defaults: a backbone over the sharded prototype layer (`PrototypeObjective`
    of loss.kind). A job that reuses this machinery passes its own `data` (see ShardData), `out` (the
    folder under run_dir for checkpoints, export and TensorBoard), the config `section` holding its train.*
    keys and `loss` its loss.* keys. Fine-tuning passes `init`, which returns (model name, backbone in fp32)
    to start the prototype objective from instead of a random init; the SCQ head passes its own `objective`
    (unicom_ds.objectives: what it trains, its loss, state and stats), and its data then has no `classes`.
    The loop below is the same for every objective.

    `epoch_end(model, epoch)` runs on every rank after each epoch's last step (fine-tuning scores the
    test split there, as deepglint/unicom retrieval.py does); the model is back in train mode after it.
    """

    def __init__(self, cfg: DictConfig, data=None, *, out: str = "train", section: str = "train",
                 loss: str = "loss", init: Callable[[], tuple[str, torch.nn.Module]] | None = None,
                 objective: Objective | None = None,
                 epoch_end: Callable[[torch.nn.Module, int], None] | None = None):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        on_cpu = get_accelerator().device_name() == "cpu"
        if on_cpu:
            prepare_cpu_comm_op(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl")
        self.rank, self.world = rank_world()
        if on_cpu:
            unlink_cpu_allreduce_buffer(self.rank)
        self.cfg, self.run_dir, self.out = cfg, Path(str(cfg.run_dir)), out
        self.tc, self.lc = OmegaConf.select(cfg, section), OmegaConf.select(cfg, loss)
        self.section = section
        self.data = ShardData(cfg) if data is None else data
        self.epoch_end = epoch_end
        self.ds = train_plan.deepspeed_config(cfg, self.world, section)
        self.micro, self.accum = int(self.ds["train_micro_batch_size_per_gpu"]), self.ds["gradient_accumulation_steps"]
        self.global_batch = int(self.ds["train_batch_size"])
        self.root = self.run_dir / out / "ckpt"
        self.resume_path = checkpoint.resolve(self.root, self.tc.resume, bool(self.tc.trust_checkpoint),
                                              section)
        # A continuation starts from its base run only once; after that it resumes from its own checkpoints.
        continue_from = OmegaConf.select(self.tc, "continue_from")
        self.base = (continuation.finished_run(continue_from)
                     if continue_from and self.resume_path is None else None)
        if self.base is not None:
            continuation.check_compatible(self.base, str(cfg.model))

        torch.manual_seed(int(cfg.seed))  # the same backbone init on every rank
        # A job's objective is built by the job, the same on every rank.
        self.objective = self.prototype_objective(init, loss) if objective is None else objective
        wd = float(self.tc.weight_decay)
        opt = adamw(self.objective.param_groups(wd), float(self.tc.lr), wd)
        self.engine, _, _, _ = deepspeed.initialize(model=self.objective.model, optimizer=opt, config=self.ds)
        self.device = self.engine.device
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        self.rows = self.data.check(self.rank, self.world, self.device)
        self.steps_per_epoch = int(self.tc.steps_per_epoch or max(1, self.rows // self.global_batch))
        self.total_steps = int(self.tc.epochs) * self.steps_per_epoch
        self.warmup_steps = round(float(self.tc.warmup_epochs) * self.steps_per_epoch)
        self.stop = min(self.total_steps, int(self.tc.max_steps or self.total_steps))
        self.objective.start(self.device, wd)
        self.step = self.bad_steps = 0
        self.resumed_from: Path | None = None
        # Every check has passed: only now does a first train stage record the run's config.
        if self.rank == 0 and not (self.run_dir / "config.yaml").is_file():
            config.save(cfg)
        torch.manual_seed(int(cfg.seed) * 1000 + self.rank)  # distinct augmentations per rank

    def prototype_objective(self, init: Callable[[], tuple[str, torch.nn.Module]] | None,
                            loss: str) -> PrototypeObjective:
        """The backbone (random, `init`'s, or the base run's) over the prototype layer of loss.kind."""
        if init is None:
            name = str(self.cfg.model)
            model = backbone.build(name, bool(self.tc.grad_checkpointing))
        else:  # every rank loads the same file; a resume then overwrites these weights
            name, model = init()
            model.train()
        if self.base is not None:  # before the engine: ZeRO makes its fp32 master copies from these weights
            model.load_state_dict(self.base_weights(name), strict=True)
        return PrototypeObjective(
            name, model, classes=int(self.data.classes), kind=continuation.loss_kind(self.cfg, loss),
            loss_cfg=self.lc, lr_mult=float(self.tc.prototype_lr_mult), seed=int(self.cfg.seed), micro=self.micro,
            rank=self.rank, world=self.world, out=self.run_dir / self.out, base=self.base)

    def base_weights(self, name: str) -> dict[str, torch.Tensor]:
        """The base run's exported backbone for this model: at this input size (release models), fp32."""
        state = torch.load(self.base.backbone, map_location="cpu", weights_only=True)
        if not backbone.is_release(name):
            return state["state_dict"]
        return unicom_vit.resize_state_dict(state, backbone.image_size(name))

    # ---------------------------------------------------------------- checkpoints
    def identity(self) -> dict:
        """What a resume must match: the objective's name (the model) and its identity()."""
        return {"model": self.objective.name, **self.objective.identity()}

    def meta(self) -> dict:
        return {**self.identity(), "world_size": self.world, "epoch": self.step // self.steps_per_epoch,
                "step_in_epoch": self.step % self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch}

    def sync_batchnorm_stats(self) -> None:
        """Average the BatchNorm running statistics over ranks (each rank normalises its own micro
        batch, as the release's training did; the saved statistics are those of all ranks)."""
        if self.world > 1:
            for buf in self.running_stats():
                all_reduce_(buf).div_(self.world)

    def weights_finite(self) -> bool:
        """Collective: every rank's engine copy and the objective's weights outside it are finite."""
        module = self.engine.module
        ok = all(bool(torch.isfinite(t).all()) for t in (*module.parameters(), *module.buffers(),
                                                         *self.objective.weights()) if t.is_floating_point())
        return not bool(all_reduce_(torch.tensor([0.0 if ok else 1.0], device=self.device), "max").item())

    def save(self) -> Path:
        """Collective: every rank writes its part into the staging folder, rank 0 publishes it.

        Non-finite weights are never written: the checkpoints and `latest` keep the last finite state.
        A full disk on any rank fails the save on every rank with DiskFull, once none is writing any more,
        and rank 0 removes the staging folder: the disk holds no more than before the save.
        """
        self.sync_batchnorm_stats()
        if not self.weights_finite():
            raise TrainingDiverged(f"step {self.step}: the weights are not finite; no checkpoint written. "
                                   f"{self.last_good()}")
        tmp = checkpoint.staging(self.root, self.step)
        if self.rank == 0:
            checkpoint.begin(self.root, self.step)
        dist.barrier()
        full = None
        try:
            with disk.writing(tmp):  # DeepSpeed's own torch.save calls: a full disk as one line, not "basic_ios::clear"
                self.engine.save_checkpoint(str(tmp), tag=checkpoint.ENGINE_TAG, save_latest=False)
        except disk.DiskFull as e:
            full = e
            dist.barrier()  # the one DeepSpeed's save ends with after its writes (none between), skipped here
        if full is None:
            try:
                checkpoint.save_rank_state(tmp, self.rank, {"rank": self.rank, **self.objective.rank_state(),
                                                            "rng": checkpoint.rng_state()})
            except disk.DiskFull as e:
                full = e
        if all_reduce_(torch.tensor([float(full is not None)], device=self.device), "max").item():
            full = full or disk.DiskFull(tmp)
            dist.barrier()  # every rank's message has measured the full disk before rank 0 frees it
            if self.rank == 0:
                checkpoint.discard(self.root, self.step)
            raise full
        if self.rank == 0:
            checkpoint.commit(self.root, self.step, self.meta(), int(self.tc.keep_checkpoints))
        dist.barrier()
        return self.root / checkpoint.step_name(self.step)

    def repartition_zero_state(self, path: Path, tag: str) -> str:
        """Load a ZeRO checkpoint saved on another rank count; says what it restored.

        DeepSpeed's engine refuses partitions saved for another rank count, and its ZeRO optimizer's
        load_state_dict indexes the saved list by this rank, which fails when growing. Its elastic
        restore underneath merges the unpadded partitions of all saved ranks and re-splits them for
        this rank count, so call that directly.
        """
        saved = self.engine._get_all_zero_checkpoints(str(path), tag)
        if not saved or not isinstance(saved[0].get("base_optimizer_state"), list):
            return "backbone weights restored from bf16, Adam moments reset (saved without elastic_checkpoint)"
        opt = self.engine.optimizer
        opt._restore_elastic_base_optimizer_state(saved)
        opt._restore_from_elastic_fp32_weights(saved)
        opt._link_all_hp_params()
        return "backbone fp32 weights and Adam moments re-partitioned"

    def last_good(self) -> str:
        last = checkpoint.latest(self.root)
        where = f"The last finite checkpoint is {last} (train.resume=latest continues from it)" if last else \
            "No checkpoint was written yet"
        return f"{where}; lower {self.section}.lr (now {float(self.tc.lr):g}) or check the data"

    def resume(self) -> None:
        path = self.resume_path
        if path is None:
            if self.base is not None:
                self.log(f"continues from {self.base.run} ({self.base.meta['model']} at its step "
                         f"{self.base.meta['step']}): backbone and prototypes loaded, a new schedule from step 0")
            return
        meta = checkpoint.read_meta(path)
        identity = self.identity()
        config.check_same(checkpoint.identity(meta, identity), identity, path)
        tag = checkpoint.ENGINE_TAG
        if meta["world_size"] == self.world:
            self.engine.load_checkpoint(str(path), tag=tag)
        else:
            self.engine.load_checkpoint(str(path), tag=tag, load_optimizer_states=False,
                                        load_lr_scheduler_states=False)
            moments = self.repartition_zero_state(path, tag)
            self.log(f"resume on {self.world} ranks from a {meta['world_size']}-rank checkpoint: "
                     f"prototype blocks re-sliced, {moments}")
        self.objective.load_state(path, meta)
        if meta["world_size"] == self.world:
            checkpoint.set_rng_state(checkpoint.read_rank_file(checkpoint.rank_file(path, self.rank))["rng"])
        self.step = int(meta["step"])
        self.resumed_from = path
        self.log(f"resumed from {path} at step {self.step}")

    def export(self, ckpt: Path) -> Path:
        """Rank 0: the objective's export (the train stage: RUN/train/backbone.pt and export.json) from the
        fp32 weights merged from the ZeRO partitions. A non-finite export is never written."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=checkpoint.ENGINE_TAG)
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise TrainingDiverged(f"{ckpt}: non-finite weights ({', '.join(bad[:3])}); "
                                   f"the {self.objective.export_kind} left as it was")
        return self.objective.export(state, ckpt, self.step)

    # ---------------------------------------------------------------- training
    def log(self, text: str) -> None:
        if self.rank == 0:
            print(f"[{self.out}] {text}", flush=True)

    def set_lr(self) -> float:
        lr = schedule.lr_at(self.step, float(self.tc.lr), self.warmup_steps, self.total_steps,
                             str(self.tc.schedule))
        for group in self.engine.optimizer.param_groups:
            # DeepSpeed's elastic ZeRO checkpoints (loadable on another rank count) read the step
            # from the param groups; torch's AdamW keeps it per parameter only.
            group["step"] = self.step
        groups = [*self.engine.optimizer.param_groups, *self.objective.outside_groups()]
        for group in groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        # <section>.cycle_momentum (fine-tuning's OneCycleLR): beta1 moves against the lr in every group.
        beta1 = schedule.beta1_at(self.step, self.warmup_steps, self.total_steps, str(self.tc.schedule),
                                  bool(OmegaConf.select(self.tc, "cycle_momentum", default=False)))
        if beta1 is not None:
            for group in groups:
                group["betas"] = (beta1, group["betas"][1])
        return lr

    def micro_step(self, *batch: torch.Tensor) -> tuple[torch.Tensor, bool]:
        batch = tuple(t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else None, non_blocking=True)
                      for t in batch)
        loss, terms = self.objective.loss(self.engine, batch)
        self.terms.append({name: value.detach().float() for name, value in terms.items()})
        self.engine.backward(loss)
        # The prototype layer's loss is the same on every rank (it reduces it), so is this flag (another
        # objective's is per rank: nonfinite_window reduces it); kept on the device.
        self.window_finite = self.window_finite & torch.isfinite(loss.detach())
        boundary = self.engine.is_gradient_accumulation_boundary()
        if not boundary:
            self.engine.step()
            return loss.detach(), False
        bad = self.nonfinite_window()
        if bad:
            # DeepSpeed skips a step only when it sees the gradients overflow; a non-finite loss whose
            # gradients came out finite (zero, say) would still move the weights by AdamW's momentum.
            # lr 0 keeps them; set_lr restores the schedule's lr at the next micro step.
            for group in self.engine.optimizer.param_groups:
                group["lr"] = 0.0
        skipped = self.engine.skipped_steps
        self.engine.step()  # DeepSpeed skips the backbone's step itself when its gradients are not finite
        bad = bad or self.engine.skipped_steps > skipped
        if bad:
            self.bad_steps += 1
            # Train-mode forwards of the bad window moved the BatchNorm statistics (to NaN, often).
            for buf, saved in zip(self.running_stats(), self.stats_before):
                buf.copy_(saved)
        self.objective.after_step(skipped=bad)
        self.stats_before = [buf.clone() for buf in self.running_stats()]
        self.window_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.step += 1
        if bad:
            self.log(f"step {self.step}: non-finite loss or gradients, step skipped "
                     f"({self.bad_steps} of {self.section}.max_bad_steps={int(self.tc.max_bad_steps)} in this job)")
            if self.bad_steps > int(self.tc.max_bad_steps):
                raise TrainingDiverged(f"{self.bad_steps} optimizer steps with non-finite loss or gradients "
                                       f"({self.section}.max_bad_steps={int(self.tc.max_bad_steps)}); stopping without "
                                       f"saving. {self.last_good()}")
        return loss.detach(), True  # a tensor: reading it every step would sync with the GPU

    def running_stats(self) -> list[torch.Tensor]:
        return [b for name, b in self.engine.module.named_buffers() if name.endswith(("running_mean", "running_var"))]

    def nonfinite_window(self) -> bool:
        """Collective, once per optimizer step: a non-finite loss in this accumulation window or a
        non-finite gradient outside the engine on any rank (every rank gets the same answer: no hang)."""
        local = ~self.window_finite | ~torch.as_tensor(self.objective.grads_finite(), device=self.device)
        return bool(all_reduce_(local.float().reshape(1), "max").item())

    def run(self) -> dict:
        self.resume()
        self.set_lr()
        self.window_finite = torch.ones((), dtype=torch.bool, device=self.device)
        self.stats_before = [buf.clone() for buf in self.running_stats()]
        cfg, objective = self.cfg, self.objective
        tb = tblog.writer(str(self.run_dir), self.out) if self.rank == 0 else None
        self.log(f"{objective.name} on {self.world} rank(s) ({self.device}, {self.dtype}), {objective.describe()}"
                 f"global batch {self.global_batch} = {self.micro} x {self.world} x {self.accum} accumulation, "
                 f"{self.steps_per_epoch} steps/epoch, steps {self.step} -> {self.stop} of {self.total_steps}")
        skipped = torch.zeros(len(self.data.skip_reasons), dtype=torch.float64)
        skipped_total = torch.zeros(len(self.data.skip_reasons), dtype=torch.float64)
        losses, window_start, window_steps, start = [], time.time(), 0, time.time()
        start_step, last_loss = self.step, float("nan")
        self.terms: list[dict[str, torch.Tensor]] = []  # the objective's loss terms since the last log step
        while self.step < self.stop:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            n_steps = min(self.steps_per_epoch - in_epoch, self.stop - self.step)
            batches = self.data.batches(
                epoch=epoch, in_epoch=in_epoch, accum=self.accum, count=n_steps * self.accum, micro=self.micro,
                image_size=objective.image_size, rank=self.rank, world=self.world, seed=int(cfg.seed),
                # A job's in-memory data source may have no loader keys.
                workers=int(OmegaConf.select(self.tc, "workers", default=0)),
                timeout_s=float(OmegaConf.select(self.tc, "loader_timeout_s", default=0)))
            for *batch, skipped_now in batches:
                lr = self.set_lr()
                loss, boundary = self.micro_step(*batch)
                losses.append(loss)
                skipped += skipped_now
                if not boundary:
                    continue
                objective.boundary()
                window_steps += 1
                if self.step % int(self.tc.log_every) == 0 or self.step == self.stop:
                    skipped_total += all_reduce_(skipped.to(self.device)).cpu()
                    now = time.time()
                    ips = window_steps * self.global_batch / max(now - window_start, 1e-9)
                    last_loss = float(torch.stack(losses).mean())
                    norm = self.engine.get_global_grad_norm()
                    scalars = {"loss": last_loss, "lr": lr, "beta1": self.engine.optimizer.param_groups[0]["betas"][0],
                               "images_per_s": ips,
                               "images_per_s_per_gpu": ips / self.world,
                               "grad_norm": float(norm) if norm is not None else float("nan"),
                               **objective.scalars(window_steps),
                               "peak_mem_mb": peak_mem_mb(self.device),
                               "skipped_samples": float(skipped_total.sum()),
                               "skipped_steps": float(self.bad_steps),
                               **{f"lr_{g['name']}": g["lr"] for g in self.engine.optimizer.param_groups
                                  if "name" in g},
                               **{name: float(torch.stack([t[name] for t in self.terms]).mean())
                                  for name in (self.terms[0] if self.terms else {})}}
                    self.terms = []
                    if tb is not None:
                        for name, value in scalars.items():
                            tb.add_scalar(f"{self.section}/{name}", value, self.step)
                        tb.flush()
                    selection = (f"selected {scalars['selected_classes']:.0f} " if "selected_classes" in scalars
                                 else "")
                    self.log(f"step {self.step}/{self.stop} epoch {epoch} loss {last_loss:.4f} lr {lr:.3g} "
                             f"{ips:.1f} img/s grad_norm {scalars['grad_norm']:.3g} "
                             f"{selection}skipped {int(scalars['skipped_samples'])}")
                    skipped.zero_()
                    losses, window_start, window_steps = [], now, 0
                if self.epoch_end is not None and self.step % self.steps_per_epoch == 0:
                    paused = time.time()
                    self.epoch_end(self.engine.module, self.step // self.steps_per_epoch - 1)  # before a save
                    self.engine.module.train()
                    window_start += time.time() - paused  # images/s counts training only
                if self.step % int(self.tc.ckpt_every_steps) == 0 and self.step < self.stop:
                    self.save()
        # The last step is never saved periodically; a run resumed at its end has nothing new to save.
        final = self.save() if self.step > start_step or self.resumed_from is None else self.resumed_from
        # A finished run rerun: its export of that very checkpoint stays as it is, byte for byte.
        done = objective.exported(final) if final == self.resumed_from else None
        exported = (done or self.export(final)) if self.rank == 0 else None
        seconds = time.time() - start
        summary = {"steps": self.step, "start_step": start_step, "seconds": round(seconds, 2),
                   "images_per_s": (self.step - start_step) * self.global_batch / max(seconds, 1e-9),
                   "loss": last_loss, "skipped": dict(zip(self.data.skip_reasons, map(int, skipped_total.tolist()))),
                   "skipped_steps": self.bad_steps, "checkpoint": str(final)}
        kind = objective.export_kind
        summary[kind] = str(exported)
        self.log(f"done: steps {start_step} -> {self.step} in {seconds:.0f}s, loss {last_loss:.4f}, "
                 f"skipped {summary['skipped']}, checkpoint {final}, {kind} {exported}")
        if tb is not None:
            tb.close()
        return summary


def train(cfg: DictConfig, **job) -> dict:
    """Train on the ranks of the current environment (deepspeed launcher, SLURM task, or one process);
    `job`: Trainer's keyword arguments for a job that reuses this machinery (fine-tuning)."""
    if cfg.device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return Trainer(cfg, **job).run()


class TrainJob(submitit.helpers.Checkpointable):
    """The SLURM job: one task per GPU, torch.distributed set up from SLURM, requeued on timeout.
    A job reusing the train machinery subclasses it with its own `section` and `run`."""

    section = "train"  # the config section whose `resume` a requeue sets

    def __call__(self, cfg: dict) -> dict:
        quiet.install()
        env = submitit.JobEnvironment()
        os.environ.update({"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
                           "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.hostnames[0],
                           "MASTER_PORT": str(master_port(env.job_id))})
        return self.run(config.as_config(cfg))

    def run(self, cfg: DictConfig) -> dict:
        return train(cfg)

    def checkpoint(self, cfg: dict) -> submitit.helpers.DelayedSubmission:
        # The periodic saves are the checkpoints: SIGUSR1 reaches one task only and a save is a
        # collective of all ranks. The requeued job continues from the latest complete one.
        cfg = config.select(config.as_config(cfg))
        section = cfg
        for part in self.section.split("."):  # a nested section (quantize.scq)
            section = section[part]
        section["resume"] = "latest"
        return submitit.helpers.DelayedSubmission(type(self)(), cfg)


def master_port(job_id: str) -> int:
    """A port that all tasks of one job agree on and that differs between concurrent jobs."""
    digits = "".join(c for c in str(job_id) if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def local_command(cfg: dict | DictConfig, script: Path = TRAIN_PY, section: str = "train") -> list[str]:
    """The `deepspeed ...` argv of launcher=local: one process per visible GPU (<section>.local_processes on CPU).

    It runs `script` (this file; fine-tuning passes its own) with run_dir and every key whose value
    differs from what the run directory alone resolves to.
    """
    cfg = config.as_config(cfg)
    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    procs = int(OmegaConf.select(cfg, section).local_processes or gpus or 1)
    base = _flat(config.select(config.resolve([f"run_dir={cfg.run_dir}"])))
    overrides = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in _flat(config.select(cfg)).items()
                 if k != "run_dir" and not k.startswith(("slurm.", "config")) and base.get(k) != v]
    ds_arg = ["--deepspeed_config", str(cfg.train.deepspeed_config)] if section == "train" else []
    # deepspeed's runner under this interpreter: the `deepspeed` on PATH may belong to another Python.
    argv = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_nodes", "1", "--num_gpus", str(procs),
            "--master_port", str(free_port()),
            str(script), *ds_arg, f"run_dir={cfg.run_dir}", *overrides]
    return argv if gpus else ["env", "DS_ACCELERATOR=cpu", *argv]


if __name__ == "__main__":
    quiet.install()  # also when run by deepspeed directly, not through launch_local
    with disk.one_line(TrainingDiverged):
        main()
