"""Progress for long loops: a tqdm bar on a terminal, periodic plain lines in logs."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _mode(mode) -> str:
    if mode is False:  # YAML reads `progress: off` as a boolean
        return "off"
    if mode != "auto":
        return mode
    return "bar" if sys.stderr.isatty() else "lines"


def progress(it: Iterable[T], total: int | None = None, desc: str = "", mode: str = "auto",
             every_s: float = 30.0) -> Iterator[T]:
    """Iterate `it` showing progress. `lines` prints one line every `every_s` seconds and at the end."""
    mode = _mode(mode)
    if mode == "bar":
        yield from tqdm(it, total=total, desc=desc, dynamic_ncols=True)
        return
    if mode == "off":
        yield from it
        return
    start = last = time.monotonic()
    n = 0
    for n, item in enumerate(it, 1):
        yield item
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            _line(desc, n, total, now - start)
    _line(desc, n, total, time.monotonic() - start)


def _line(desc: str, n: int, total: int | None, elapsed: float) -> None:
    of = f"/{total}" if total else ""
    rate = n / elapsed if elapsed > 0 else 0.0
    print(f"[{desc}] {n}{of} done, {elapsed:.0f}s, {rate:.1f}/s", file=sys.stderr, flush=True)
