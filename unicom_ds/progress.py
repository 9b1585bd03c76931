"""Progress for long loops: a tqdm bar on a terminal, periodic plain lines in logs.

Lines carry their units: `[assign] 3/4 shards, 1,234 rows, 2.1 shards/s, 617 rows/s, 2s elapsed`.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Iterator, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _mode(mode) -> str:
    if mode is False:  # YAML reads `progress: off` as a boolean
        return "off"
    if mode != "auto":
        return mode
    return "bar" if sys.stderr.isatty() else "lines"


def progress(it: Iterable[T], total: int | None = None, desc: str = "", mode: str = "auto",
             every_s: float = 30.0, unit: str = "item", rows: Callable[[T], int] | None = None) -> Iterator[T]:
    """Iterate `it` showing progress in `unit`s (a singular noun); `rows(item)` (optional) counts the rows
    each item holds.

    `lines` prints one line every `every_s` seconds and one at the end."""
    mode = _mode(mode)
    if mode == "off":
        yield from it
        return
    n_rows = 0
    if mode == "bar":
        bar = tqdm(it, total=total, desc=desc, unit=f" {plural(unit)}", dynamic_ncols=True)
        for item in bar:
            yield item
            if rows is not None:
                n_rows += rows(item)
                bar.set_postfix_str(f"{n_rows:,} rows", refresh=False)
        return
    start = last = time.monotonic()
    n = 0
    for n, item in enumerate(it, 1):
        yield item
        if rows is not None:
            n_rows += rows(item)
        now = time.monotonic()
        if now - last >= every_s:
            last = now
            print(line(desc, n, total, unit, n_rows if rows else None, now - start), file=sys.stderr, flush=True)
    print(line(desc, n, total, unit, n_rows if rows else None, time.monotonic() - start), file=sys.stderr, flush=True)


def plural(word: str) -> str:
    return word + ("es" if word.endswith(("s", "x", "ch", "sh")) else "s")


def count(n: int, word: str) -> str:
    """`1 row`, `1,234 rows`."""
    return f"{n:,} {word if n == 1 else plural(word)}"


def line(desc: str, n: int, total: int | None, unit: str, n_rows: int | None, elapsed: float) -> str:
    """One progress line, every number with its unit."""
    per_s = (lambda x: x / elapsed) if elapsed > 0 else (lambda x: 0.0)
    parts = [f"{n:,}/{total:,} {plural(unit)}" if total else count(n, unit)]
    if n_rows is not None:
        parts.append(count(n_rows, "row"))
    parts.append(f"{per_s(n):,.1f} {plural(unit)}/s")
    if n_rows is not None:
        parts.append(f"{per_s(n_rows):,.0f} rows/s")
    parts.append(f"{elapsed:,.0f}s elapsed")
    return f"[{desc}] " + ", ".join(parts)
