"""The release head's BatchNorm synchronised over the ranks while fine-tuning, as deepglint/unicom retrieval.py
converts its model (torch.nn.SyncBatchNorm.convert_sync_batchnorm): in train mode every rank normalises with the
mean and variance of the global batch, and every rank keeps the same running statistics, those one rank would
keep over the whole batch.

Not torch's SyncBatchNorm: it refuses CPU tensors (torch 2.14: "SyncBatchNorm expected input tensor to be on
GPU"), so gloo ranks cannot run it, and under a bf16 engine it would keep bf16 running statistics where the
release's BatchNorm1dFP32 keeps fp32. Here the batch's sums are all-reduced instead, through autograd (the
backward all-reduces the gradients of the sums, as SyncBatchNorm's backward does), on any device.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from unicom_ds.unicom_vit import BatchNorm1dFP32


def batch_moments(x: torch.Tensor, total: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean [C], biased variance [C], row count) of the rows of x [N, C] and of every other rank's, `total`
    summing a tensor over the ranks (the identity on one). Two passes: the centred rows' squares, which keep
    their precision where E[x^2] - mean^2 would cancel."""
    sums = total(torch.cat([x.sum(0), x.new_full((1,), float(len(x)))]))
    count = sums[-1]
    mean = sums[:-1] / count
    return mean, total(((x - mean) ** 2).sum(0)) / count, count


class _Total(torch.autograd.Function):
    """A sum over the ranks that autograd passes through: the gradient of every rank's copy of the sum reaches
    each rank's addend (as torch.distributed.nn's all_reduce, which torch 2.14 deprecates)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        out = t.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm1dFP32(BatchNorm1dFP32):
    """BatchNorm1dFP32 whose train-mode statistics are those of the batch over all ranks; state-dict keys and
    eval mode unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        mean, var, count = batch_moments(xf, _Total.apply)
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 0.0 if self.momentum is None else self.momentum  # as BatchNorm1dFP32
            with torch.no_grad():  # F.batch_norm's update: the unbiased variance
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1), momentum)
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.float() + self.bias.float()
        return out.to(x.dtype)


def convert(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm1dFP32 (the release head's) replaced by a SyncBatchNorm1dFP32 holding its
    parameters and statistics, as torch's convert_sync_batchnorm; a model without one is returned as it is."""
    for name, child in module.named_children():
        if isinstance(child, BatchNorm1dFP32):
            sync = SyncBatchNorm1dFP32(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync.train(child.training))
        else:
            convert(child)
    return module
