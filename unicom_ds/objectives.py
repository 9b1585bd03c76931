"""What the Trainer trains: an objective over micro batches.

`unicom_ds.train.Trainer` owns the loop: the DeepSpeed engine and its AdamW, the schedule, gradient
accumulation, the skipped non-finite steps, checkpoint publication, TensorBoard. An objective says
what is trained, in four groups:

- identity: `name` (checkpoints record it; a resume must match), `model` (the module the engine
  trains), `image_size` (the data's crop size; 0 when the data are not images), `identity()` (more keys
  a resume must match), `describe()` (for the run's first log line);
- step: `param_groups(weight_decay)` (the engine's AdamW groups; a group's `lr_mult` scales the
  schedule's lr, a group's `name` logs its lr as lr_<name>), `start(device, weight_decay)` (state outside
  the engine, once the engine exists), `loss(engine, batch) -> (loss, {term: tensor})` over a micro batch
  (the data's tensors on the device, floats in the engine's dtype), `outside_groups()` (optimizer groups
  outside the engine the schedule also drives), `grads_finite()` (this rank's outside gradients, on the
  device), `after_step(skipped)` at each accumulation boundary;
- state: `weights()` (tensors outside the engine that must stay finite), `rank_state()` and
  `load_state(path, meta)` (what each rank keeps next to the engine's checkpoint), `export(state, ckpt, step)`
  (rank 0, from the fp32 weights: what the job keeps; `export_kind` names it in the run's summary),
  `exported(ckpt)` (that export when it was already made from checkpoint `ckpt`: a finished run's rerun
  leaves it as it is);
- stats: `boundary()` at each optimizer step, `scalars(window_steps)` at log steps (collective).

`Objective` gives the optional members their do-nothing defaults. `PrototypeObjective` is the train
stage's and fine-tuning's: a backbone over the sharded prototype layer, single-label (Unicom) or
multi-label (MLCD). SCQ's head is another (evaluation.quantize.scq.Objective).
"""
from __future__ import annotations

from pathlib import Path

import torch

from unicom_ds import backbone, checkpoint, config, continuation
from unicom_ds.atomic import atomic_path, read_json, write_json_atomic
from unicom_ds.dist import all_reduce_
from unicom_ds.mlcd import MLCDPrototypes
from unicom_ds.optim import adamw
from unicom_ds.prototypes import ShardedPrototypes

# loss.kind -> the prototype layer: the same matrix, arguments and state; mlcd takes labels [B, l].
PROTOTYPE_LAYERS = {"unicom": ShardedPrototypes, "mlcd": MLCDPrototypes}


def prototype_layer(kind: str) -> type[ShardedPrototypes]:
    if kind not in PROTOTYPE_LAYERS:
        raise config.ConfigError(f"loss.kind={kind}: expected one of {', '.join(PROTOTYPE_LAYERS)}")
    return PROTOTYPE_LAYERS[kind]


class Objective:
    """The members every objective may leave as they are (see the module docstring)."""

    name: str
    model: torch.nn.Module
    image_size = 0
    export_kind = "export"

    def identity(self) -> dict:
        return {}

    def describe(self) -> str:
        return ""

    def exported(self, ckpt: Path) -> Path | None:
        return None

    def start(self, device: torch.device, weight_decay: float) -> None:
        pass

    def outside_groups(self) -> list[dict]:
        return []

    def grads_finite(self) -> torch.Tensor | bool:
        return True

    def after_step(self, skipped: bool) -> None:
        pass

    def weights(self) -> tuple[torch.Tensor, ...]:
        return ()

    def rank_state(self) -> dict:
        return {}

    def load_state(self, path: Path, meta: dict) -> None:
        pass

    def boundary(self) -> None:
        pass

    def scalars(self, window_steps: int) -> dict[str, float]:
        return {}


class PrototypeObjective(Objective):
    """A backbone (in the engine) whose embeddings the sharded prototype layer of `kind` scores; the
    layer's block and its AdamW live outside the engine and step at accumulation boundaries.

    `loss_cfg`: the loss.* keys (r1, r2, r3, margin, scale, margin_grad); `lr_mult`: the prototypes' lr over
    the schedule's; `base`: a finished run whose prototypes start this one (train.continue_from);
    `out`: the folder of the exported backbone.pt and its export.json.
    """

    export_kind = "backbone"

    def __init__(self, name: str, model: torch.nn.Module, *, classes: int, kind: str, loss_cfg, lr_mult: float,
                 seed: int, micro: int, rank: int, world: int, out: Path,
                 base: continuation.FinishedRun | None = None):
        self.name, self.model, self.k, self.kind, self.lc = name, model, int(classes), kind, loss_cfg
        self.dim, self.image_size = backbone.embed_dim(name), backbone.image_size(name)
        self.lr_mult, self.seed, self.micro, self.rank, self.world = lr_mult, seed, micro, rank, world
        self.out, self.base = Path(out), base
        self.layer_class = prototype_layer(kind)  # refused before any work
        self.r3 = float(getattr(loss_cfg, "r3", None) or 0.0)  # a section without it (fine-tuning's): no dropout

    # identity
    def identity(self) -> dict:
        return {"num_classes": self.k, "embed_dim": self.dim, "loss_kind": self.kind}

    def describe(self) -> str:
        return f"k={self.k}, {self.kind} loss, "

    # step
    def param_groups(self, weight_decay: float) -> list[dict]:
        return backbone.param_groups(self.model, weight_decay)

    def start(self, device: torch.device, weight_decay: float) -> None:
        lc = self.lc
        # MLCD's form (loss.margin_kind, loss.negatives); a section without them (fine-tuning's) takes the paper's
        form = {key: str(getattr(lc, key, None) or default)
                for key, default in (("margin_kind", "angular"), ("negatives", "sampled"))} if self.kind == "mlcd" else {}
        self.layer = self.layer_class(self.k, self.dim, r1=float(lc.r1), r2=float(lc.r2), margin=float(lc.margin),
                                      scale=float(lc.scale), seed=self.seed, margin_grad=str(lc.margin_grad),
                                      equal_batches=True, **form).to(device)  # micro batches: micro rows everywhere
        if self.base is not None:
            self._read_block(self.base.checkpoint)
        self.opt = adamw(self.layer.parameters(), 0.0, weight_decay)  # the lr: set_lr, from the schedule
        for group in self.opt.param_groups:
            group["lr_mult"] = self.lr_mult
        # [selected classes, positives], summed on the device and read at log steps only: reading the layer's
        # stats per step waits on the GPU.
        self.selected = torch.zeros(2, dtype=torch.float64, device=device)

    def loss(self, engine, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        images, labels = batch
        if images.shape[0] != self.micro:  # the layer gathers without exchanging sizes: a short batch would hang
            raise RuntimeError(f"rank {self.rank}: a micro batch of {images.shape[0]} rows, not the "
                               f"{self.micro} of every rank (train_micro_batch_size_per_gpu)")
        emb = engine(images)
        if self.r3:  # loss.r3: feature dropout, each rank on its own rows before the layer gathers them
            emb = torch.nn.functional.dropout(emb, self.r3)
        if self.world > 1:
            # The layer gives each rank the exact gradient of the global-batch loss; DeepSpeed then
            # averages backbone gradients over ranks, so undo its division by the world size.
            world = self.world
            emb.register_hook(lambda g: g * world)
        return self.layer(emb.float(), labels), self.layer.terms

    def outside_groups(self) -> list[dict]:
        return self.opt.param_groups

    def grads_finite(self) -> torch.Tensor | bool:
        grad = self.layer.weight.grad
        return True if grad is None else torch.isfinite(grad).all()

    def after_step(self, skipped: bool) -> None:
        if not skipped:
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.layer.advance()

    # state
    def weights(self) -> tuple[torch.Tensor, ...]:
        return (self.layer.weight,)

    def rank_state(self) -> dict:
        return {"class_range": self.layer.class_range, "weight": self.layer.weight.detach().cpu(),
                "optimizer": self.opt.state_dict()}

    def _read_block(self, path: Path) -> dict:
        """This rank's block from the blocks saved in checkpoint `path` (any saved rank count), into the
        layer; returns their AdamW state re-sliced the same way."""
        states = checkpoint.load_rank_states(path, self.k, *self.layer.class_range)
        weight, opt_state = checkpoint.merge_prototype_states(states, *self.layer.class_range)
        self.layer.weight.data.copy_(weight.to(self.layer.weight.device))
        return opt_state

    def load_state(self, path: Path, meta: dict) -> None:
        """This rank's block and its AdamW state (a continuation's base run starts from the block only)."""
        opt_state = self._read_block(path)
        if opt_state["state"]:
            self.opt.load_state_dict(opt_state)
            for group in self.opt.param_groups:  # a checkpoint's groups may predate lr_mult
                group["lr_mult"] = self.lr_mult
        self.layer.step = int(meta["step"])

    def export(self, state: dict[str, torch.Tensor], ckpt: Path, step: int) -> Path:
        """OUT/backbone.pt (the fp32 backbone), then OUT/export.json naming the checkpoint it came from."""
        out = self.out / "backbone.pt"
        with atomic_path(out) as tmp:
            torch.save(backbone.export(self.name, state), tmp)
        write_json_atomic(out.with_name(continuation.EXPORT_META), {
            "model": self.name, "embed_dim": self.dim, "num_classes": self.k, "step": step, "checkpoint": ckpt.name})
        return out

    def exported(self, ckpt: Path) -> Path | None:
        out, record = self.out / "backbone.pt", self.out / continuation.EXPORT_META
        if out.is_file() and record.is_file() and read_json(record).get("checkpoint") == Path(ckpt).name:
            return out
        return None

    # stats
    def boundary(self) -> None:
        stats = self.layer.device_stats
        self.selected[0] += stats["selected_classes"]
        self.selected[1] += stats["positives"]

    def scalars(self, window_steps: int) -> dict[str, float]:
        self.layer.check_labels()  # labels on a GPU are range-checked there, reported here
        selected, positives = (all_reduce_(self.selected.clone()) / max(window_steps, 1)).tolist()
        self.selected.zero_()
        # Every scored class that is no positive of the batch was drawn by r1 (both kinds of layer).
        return {"selected_classes": selected, "positives": positives, "sampled_negatives": selected - positives}
