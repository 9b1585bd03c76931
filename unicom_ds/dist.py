"""torch.distributed helpers that fall back to one rank when no process group is initialised."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` in place over all ranks (`op` is "sum" or "max"); a no-op on one rank."""
    if rank_world()[1] > 1:
        dist.all_reduce(tensor, op=_OPS[op])
    return tensor


def _gather_padded(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All-gather rows of `x` from every rank, allowing a different row count per rank."""
    world = rank_world()[1]
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    # all_gather needs equal shapes: pad to the largest batch, cut the padding off afterwards.
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sizes


def _gather_equal(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """All-gather rows of `x` from every rank, every rank holding as many rows: one collective, and
    no size exchange, so the host never waits for the device."""
    world = rank_world()[1]
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x)
    return out, [x.shape[0]] * world


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, equal: bool) -> torch.Tensor:
        out, sizes = (_gather_equal if equal else _gather_padded)(x.contiguous())
        ctx.sizes = sizes
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # Every rank's loss depends on every row: this rank's rows get the sum of all ranks' grads.
        grad = all_reduce_(grad.contiguous().clone())
        rank = rank_world()[0]
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]], None


def gather_rows(x: torch.Tensor, equal: bool = False) -> torch.Tensor:
    """Concatenate `x` over ranks in rank order (autograd-aware); `x` itself on one rank.

    Ranks may hold different row counts: they exchange them first, which makes the host read them
    (a wait on the device per call). `equal=True` promises the same row count on every rank and
    skips that exchange; a rank that breaks the promise makes the collective fail or hang, so only
    callers that know the sizes (the train loop's fixed micro batches) set it.

    Backward sums the gathered gradient over ranks and returns this rank's rows, so each rank
    holds the exact gradient of a loss that every rank computes over the whole gathered batch.
    """
    if rank_world()[1] == 1:
        return x
    return _GatherRows.apply(x, equal)


def cpu_allreduce_buffer(rank: int) -> Path:
    """The /dev/shm file DeepSpeed's CPU accelerator maps for rank `rank`'s shared-memory all-reduce
    (its csrc/cpu/comm/shm.cpp names it by user id, MASTER_ADDR, MASTER_PORT and rank)."""
    return Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def unlink_cpu_allreduce_buffer(rank: int) -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffer name (collective). DeepSpeed never unlinks these
    67 MB files: each CPU run leaked one per rank into /dev/shm, i.e. RAM, until a reboot (hundreds of test
    runs filled 18 GB of a 23 GB machine). Peers open the buffer by name only while the process group
    starts, so after a barrier the name can go; the mapping lives until the process exits."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    cpu_allreduce_buffer(rank).unlink(missing_ok=True)


CPU_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory communication op, compiled on its first CPU launch


def prepare_cpu_comm_op(local_rank: int) -> Path | None:
    """Before DeepSpeed starts on CPU: its communication op is built into TORCH_EXTENSIONS_DIR, by default
    `torch_extensions` inside this Python environment, so it is built once per environment however a stage
    starts (demo.sh, an activated venv, a SLURM task), not again into ~/.cache, where environments also
    rebuild it for each other. Local rank 0 says so before a build (1-2 minutes on 2 cores, silent
    otherwise). Returns the op's build folder; None when the environment is read-only and TORCH_EXTENSIONS_DIR
    unset (torch's own cache, where a build cannot be foreseen)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        return None
    folder = Path(root) / CPU_COMM_OP
    if local_rank == 0 and not any(folder.glob(f"{CPU_COMM_OP}*.so")):
        print(f"building DeepSpeed's CPU communication op once, ~2 min, into {folder}", flush=True)
    return folder
