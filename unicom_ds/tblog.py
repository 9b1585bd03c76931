"""TensorBoard: every stage writes under RUN/tensorboard/<stage>."""
from __future__ import annotations

from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def writer(run_dir: str, stage: str) -> SummaryWriter:
    path = Path(run_dir) / "tensorboard" / stage
    path.mkdir(parents=True, exist_ok=True)
    return SummaryWriter(log_dir=str(path))


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalars under `logdir` (recursively), as {tag: [(step, value), ...]}: tests and the report use it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for folder in sorted({p.parent for p in Path(logdir).rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out
