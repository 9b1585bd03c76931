"""Embedded shards on disk (RUN/embed) and the feature k-means and assign cluster.

Shards are read memory-mapped, one at a time, and released before the next one, so the pages a
reader touches never add up over shards: peak memory follows the rows asked for, not the data size.
A run may read another run's embeddings (`embed.from=OLD_RUN`): `source_run` says whose.
Every row read is checked to be finite: the embed stage never writes a non-finite row, so one found
here was written by something else, and the error names its file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from omegaconf import OmegaConf

from unicom_ds.arrays import normalize
from unicom_ds.atomic import read_json
from unicom_ds.config import ConfigError, check_same
from unicom_ds.progress import count

# The config keys whose change makes embeddings differ; stored in every S.done.json (plus `seed`
# when the weights are random: it draws them).
EMBED_KEYS = ("clip.model", "clip.pretrained")
MODES = ("joint", "image", "text")


class NonFiniteFeatures(ValueError):
    """A stored feature row holds NaN or inf; the message names the file and the rows."""


def embed_identity(cfg) -> dict:
    """What makes a shard's features: compared with each S.done.json's "config" before it is used."""
    ident = {k: OmegaConf.select(cfg, k) for k in EMBED_KEYS}
    if ident["clip.pretrained"] == "random":
        ident["seed"] = int(cfg.seed)
    if OmegaConf.select(cfg, "embed.source"):  # imported features (cluster_job.import_embeddings)
        ident["embed.source"] = str(cfg.embed.source)
    return ident


def source_run(cfg) -> str:
    """The run whose embed/ this run reads: `embed.from` when set (and another run), else the run itself."""
    other = cfg.embed.get("from")
    if other and Path(str(other)).resolve() != Path(str(cfg.run_dir)).resolve():
        return str(other)
    return str(cfg.run_dir)


def reuse_hint(cfg, recorded: dict | None = None, current: dict | None = None) -> str:
    """The cheapest way on when k-means or labels were made with `recorded`, not `current`: a new run
    that reads this run's embeddings in place, with the changed keys."""
    recorded, current = recorded or {}, current or {}
    changed = "".join(f" {k}={current[k]}" for k in sorted(current)
                      if recorded.get(k) != current[k] and current[k] is not None)
    saved = Path(str(cfg.run_dir)) / "config.yaml"
    stage = cfg.get("stage") if cfg.get("stage") in ("cluster", "all") else "cluster"
    return ("to keep it and reuse this run's embeddings by reference (nothing is copied), start a new run: "
            f"python slurm/submit.py stage={stage}" + (f" config={saved}" if saved.is_file() else "")
            + f" run_dir=NEW_RUN embed.from={source_run(cfg)}{changed}")


def embed_dir(run_dir: str) -> Path:
    return Path(run_dir) / "embed"


def done_path(run_dir: str, stem: str) -> Path:
    return embed_dir(run_dir) / f"{stem}.done.json"


def joint(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    """The joint image-text feature of the paper: normalize((img + txt) / 2)."""
    return normalize((np.asarray(img, np.float32) + np.asarray(txt, np.float32)) / 2)


def feature(img: np.ndarray | None, txt: np.ndarray | None, mode: str) -> np.ndarray:
    """The feature k-means clusters for `kmeans.mode` (image and text are stored normalised)."""
    if mode == "joint":
        return joint(img, txt)
    if mode == "image":
        return normalize(img)
    if mode == "text":
        return normalize(txt)
    raise ConfigError(f"kmeans.mode={mode}: expected one of {', '.join(MODES)}")


def embedded_stems(run_dir: str) -> list[str]:
    """Stems of the shards that count as embedded: those whose S.done.json exists."""
    return sorted(p.name[: -len(".done.json")] for p in embed_dir(run_dir).glob("*.done.json"))


def done_records(run_dir: str, stems: list[str], identity: dict | None = None) -> list[dict]:
    """The S.done.json of each stem; with `identity`, refuse shards made by another CLIP, or imported from
    another source (an own embedding records no embed.source), see check_same."""
    records = []
    for s in stems:
        done = read_json(done_path(run_dir, s))
        if identity is not None:
            keys = set(identity) | {"embed.source"}
            check_same({k: done.get("config", {}).get(k) for k in keys}, {k: identity.get(k) for k in keys},
                       done_path(run_dir, s))
        records.append(done)
    return records


def check_reuse(cfg, stems: list[str]) -> None:
    """With `embed.from`: every shard must be embedded there, by the same CLIP; nothing is written there."""
    src = source_run(cfg)
    if not embed_dir(src).is_dir():
        hint = ""
        if (Path(src) / "config.yaml").is_file():
            other = OmegaConf.load(Path(src) / "config.yaml").get("embed", {}).get("from")
            hint = f" (that run reads its embeddings from {other}: use embed.from={other})" if other else ""
        raise ConfigError(f"embed.from={src}: {embed_dir(src)} does not exist{hint}")
    missing = [s for s in stems if not done_path(src, s).is_file()]
    if missing:
        raise ConfigError(
            f"embed.from={src}: {len(missing)} of the {len(stems)} shards of data.shards are not embedded there "
            f"(first: {done_path(src, missing[0])} missing); finish them in that run "
            f"(python slurm/submit.py stage=embed run_dir={src}), or leave them out of data.shards")
    if cfg.embed.redo_damaged:
        raise ConfigError(f"embed.redo_damaged=true with embed.from={src}: the embeddings belong to that run; "
                          f"redo them there (python slurm/submit.py stage=embed run_dir={src} embed.redo_damaged=true)")
    done_records(src, stems, embed_identity(cfg))


def row_counts(run_dir: str, stems: list[str], identity: dict | None = None) -> np.ndarray:
    """Rows per embedded shard from its done.json."""
    return np.asarray([int(d["n"]) for d in done_records(run_dir, stems, identity)], dtype=np.int64)


def damage(done: dict) -> dict | None:
    """A done.json's damage record; done markers written before it existed say only "fault": <reason>."""
    if done.get("damaged"):
        return done["damaged"]
    if done.get("fault"):
        return {"reason": done["fault"], "rows_kept": int(done["n"]), "rows_lost": None}
    return None


def damaged_shards(stems: list[str], records: list[dict]) -> list[dict]:
    """[{"shard", "reason", "rows_kept", "rows_lost"}] of the shards whose done.json records damage."""
    return [{"shard": s, **damage(d)} for s, d in zip(stems, records) if damage(d)]


def damage_line(damaged: list[dict]) -> str:
    """`2 damaged shards (00003, 00007), 1,200 rows kept, 31 rows lost (+ unknown in 1)` for summaries."""
    lost = [d["rows_lost"] for d in damaged if d.get("rows_lost") is not None]
    unknown = len(damaged) - len(lost)
    names = ", ".join(d["shard"] for d in damaged[:5]) + (", ..." if len(damaged) > 5 else "")
    return (f"{count(len(damaged), 'damaged shard')} ({names}), {count(sum(d['rows_kept'] for d in damaged), 'row')} "
            f"kept, {count(sum(lost), 'row')} lost" + (f" (+ unknown in {unknown})" if unknown else ""))


def _check_finite(part: np.ndarray, run_dir: str, stem: str, side: str, rows) -> None:
    """Raise NonFiniteFeatures naming the file when a row of `part` (file rows `rows`) is not finite."""
    bad = ~np.isfinite(part).all(axis=1)
    if bad.any():
        at = (np.arange(rows.start, rows.start + len(part)) if isinstance(rows, slice) else np.asarray(rows))[bad]
        raise NonFiniteFeatures(
            f"{embed_dir(run_dir) / f'{stem}.{side}.npy'}: {len(at)} of the rows read hold NaN or inf "
            f"(first: row {at[0]}); the embed stage never writes such rows, so this file was changed after it: "
            f"delete {done_path(run_dir, stem)} and run stage=embed to embed the shard again")


def _open(run_dir: str, stem: str, mode: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    d = embed_dir(run_dir)
    img = np.load(d / f"{stem}.img.npy", mmap_mode="r") if mode in ("joint", "image") else None
    txt = np.load(d / f"{stem}.txt.npy", mmap_mode="r") if mode in ("joint", "text") else None
    return img, txt


def _read(run_dir: str, stem: str, img, txt, rows, mode: str) -> np.ndarray:
    """feature() of the given rows (sorted indices or a slice), after checking they are finite."""
    parts = {"img": None if img is None else img[rows], "txt": None if txt is None else txt[rows]}
    for side, part in parts.items():
        if part is not None:
            _check_finite(part, run_dir, stem, side, rows)
    return feature(parts["img"], parts["txt"], mode)


def dim(run_dir: str, stem: str) -> int:
    return int(np.load(embed_dir(run_dir) / f"{stem}.img.npy", mmap_mode="r").shape[1])


def read_rows(run_dir: str, stem: str, rows: np.ndarray, mode: str) -> np.ndarray:
    """Features of the given (sorted) rows of one shard; only those rows are read from disk."""
    img, txt = _open(run_dir, stem, mode)
    return _read(run_dir, stem, img, txt, rows, mode)


def iter_batches(run_dir: str, stem: str, mode: str, batch_size: int) -> Iterator[np.ndarray]:
    """The features of one shard in consecutive row batches."""
    img, txt = _open(run_dir, stem, mode)
    n = (img if img is not None else txt).shape[0]
    for a in range(0, n, max(1, int(batch_size))):
        yield _read(run_dir, stem, img, txt, slice(a, a + int(batch_size)), mode)


def sample_rows(counts: np.ndarray, n_sample: int, seed: int) -> list[np.ndarray]:
    """A seeded uniform sample without replacement of `n_sample` of all rows, as sorted row ids per shard."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    n_sample = min(int(n_sample), total)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=n_sample, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    cuts = np.searchsorted(picked, starts)
    return [picked[cuts[i]:cuts[i + 1]] - starts[i] for i in range(len(counts))]


def gather(run_dir: str, stems: list[str], rows: list[np.ndarray], mode: str, d: int,
           dtype: type = np.float32) -> np.ndarray:
    """The sampled rows of every shard into one array (float32, or float16 to halve a large sample: the stored
    features are float16 already), one shard mapped at a time."""
    out = np.empty((sum(len(r) for r in rows), d), dtype=dtype)
    at = 0
    for stem, r in zip(stems, rows):
        if len(r):
            out[at:at + len(r)] = read_rows(run_dir, stem, r, mode)
            at += len(r)
    return out
