"""Import stage: CLIP features that already exist (clip-retrieval's layout, e.g. LAION's released
ViT-B/32 embeddings) -> RUN/embed/S.{img,txt}.npy, S.keys.txt, S.done.json, in place of the embed stage.

The source folder (`embed.source`) holds `img_emb/img_emb_N.npy`, `text_emb/text_emb_N.npy` and
`metadata/metadata_N.parquet`, row-aligned; it is read with rom1504's embedding-reader (local or any
fsspec URL), one part N per unit of work, batch by batch.

Keys (the join rule): each row's webdataset `__key__` is the metadata's `key` column (img2dataset's key),
or, without one, the file name of `image_path` up to its first dot. Its image shard is the shard of
`data.shards` whose stem is the key's first characters (img2dataset's keys are the shard number followed
by the row number, e.g. `000420017` is row 17 of `00042.tar`). Rows of a shard missing from data.shards
("shard_not_in_data_shards", counted per part), rows whose key has no image in its shard (the download
failed there; told by img2dataset's S.parquet next to the tar, else by the tar's headers: "image_absent"),
repeated keys ("duplicate_key") and rows holding NaN, inf or zeros ("nonfinite_feature") are counted and
dropped, never given a label.

Copy, not read in place: a part's rows come from up to ~100 tars, interleaved, and k-means, assign and the
train stage's join all read one contiguous file per image shard. Each part is written as per-shard
fragments (RUN/embed/parts/N/), rows in key order (the order of an img2dataset tar, so an import and our
own embed of the same shard match row for row); when every part is done, the task that sees it links each
shard's fragment to RUN/embed/S.* (a hard link: no second copy) or, for a shard split over parts, merges
them, and writes S.done.json last. Rows already of unit norm (clip-retrieval stores them so) are kept bit
for bit; others are normalised; all are stored float16.

Memory: one part's keys plus one batch (and embedding-reader's copy of the part's metadata table),
whatever the number of parts.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
import tarfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cluster_job.features import done_path, embed_dir, embed_identity
from unicom_ds.atomic import atomic_path, read_json, write_json_atomic, write_text_atomic
from unicom_ds.config import ConfigError, as_config, check_same
from unicom_ds.progress import count, progress
from unicom_ds.shards import expand, stem

FOLDERS = {"img": "img_emb", "txt": "text_emb", "meta": "metadata"}
KEY_COLUMNS = ("key", "image_path")
# |norm - 1| within which a stored row counts as unit: float16 rounding of a unit row stays far inside it.
NORM_TOL = 2e-3
MERGE_CHUNK = 65536  # rows copied at once when a shard's fragments are merged


@dataclass(frozen=True)
class Part:
    name: str        # N of img_emb_N.npy
    start: int       # first row in the reader's global numbering
    count: int
    metadata: str    # path of metadata_N.parquet


def _number(path: str, prefix: str) -> str | None:
    m = re.fullmatch(rf"{prefix}_(\w+)\.(npy|parquet)", Path(path).name)
    return m.group(1) if m else None


class Source:
    """The clip-retrieval folder: one embedding-reader per side, checked to be row-aligned part by part."""

    def __init__(self, folder: str, key_column: str = "auto"):
        from embedding_reader import EmbeddingReader
        from embedding_reader.get_file_list import get_file_list

        self.folder = str(folder).rstrip("/")
        where = {side: f"{self.folder}/{sub}" for side, sub in FOLDERS.items()}
        try:
            fs, meta_files = get_file_list(where["meta"], "parquet")
            if not meta_files:
                raise FileNotFoundError(f"no metadata_N.parquet in {where['meta']}")
            self.key_column = self._key_column(fs, meta_files[0], key_column)
            self.img = EmbeddingReader(where["img"], file_format="parquet_npy", meta_columns=[self.key_column],
                                       metadata_folder=where["meta"])
            self.txt = EmbeddingReader(where["txt"], file_format="npy")
        except (OSError, ValueError, IndexError) as e:
            raise ConfigError(f"embed.source={folder}: not a readable clip-retrieval folder (img_emb/, text_emb/, "
                              f"metadata/): {e}") from None
        self.meta_fs = fs
        self.dim = int(self.img.dimension)
        self.parts = self._parts()

    @staticmethod
    def _key_column(fs, path: str, wanted: str) -> str:
        import pyarrow.parquet as pq

        with fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
        options = KEY_COLUMNS if wanted == "auto" else (wanted,)
        found = next((c for c in options if c in names), None)
        if found is None:
            raise ValueError(f"{path} has no {' or '.join(options)} column (columns: {', '.join(names)}); "
                             "the rows cannot be joined to image shards without it")
        return found

    def _parts(self) -> list[Part]:
        img, txt = self.img.reader.headers, self.txt.reader.headers
        if len(img) != len(txt) or self.txt.dimension != self.dim:
            raise ConfigError(f"embed.source={self.folder}: {len(img)} img_emb files of d={self.dim} but "
                              f"{len(txt)} text_emb files of d={self.txt.dimension}")
        parts = []
        for a, b in zip(img.itertuples(), txt.itertuples()):
            n = _number(a.filename, "img_emb")
            if n is None or n != _number(b.filename, "text_emb") or n != _number(a.metadata_path, "metadata"):
                raise ConfigError(f"embed.source={self.folder}: {a.filename}, {b.filename} and {a.metadata_path} "
                                  "are not one part (expected img_emb_N.npy, text_emb_N.npy, metadata_N.parquet)")
            if a.count != b.count:
                raise ConfigError(f"embed.source={self.folder}: {a.filename} holds {a.count} rows but "
                                  f"{b.filename} holds {b.count}; image and text rows must align")
            parts.append(Part(n, int(a.count_before), int(a.count), str(a.metadata_path)))
        return parts

    def keys(self, part: Part) -> np.ndarray:
        """The __key__ of every row of a part (see the module docstring), from one metadata column."""
        import pyarrow.parquet as pq

        with self.meta_fs.open(part.metadata, "rb") as f:
            column = pq.read_table(f, columns=[self.key_column]).column(0).to_pylist()
        if len(column) != part.count:
            raise ValueError(f"{part.metadata} holds {len(column)} rows but img_emb_{part.name}.npy {part.count}")
        return np.asarray(row_keys(column, self.key_column), dtype=str)

    def batches(self, part: Part, batch_size: int):
        """(first row in the part, img [b, d] float32, txt [b, d] float32, keys) batch by batch."""
        end = part.start + part.count
        common = dict(start=part.start, end=end, show_progress=False, max_ram_usage_in_bytes=2**28)
        for (img, meta), (txt, tmeta) in zip(self.img(batch_size, **common), self.txt(batch_size, **common)):
            if meta["i"].iloc[0] != tmeta["i"].iloc[0] or len(img) != len(txt):
                raise RuntimeError(f"img_emb_{part.name} and text_emb_{part.name} batches out of step")
            yield int(meta["i"].iloc[0]) - part.start, img, txt, row_keys(meta[self.key_column].tolist(),
                                                                           self.key_column)


def row_keys(values, column: str) -> list[str]:
    """The webdataset __key__ of each metadata value: `key` as is, `image_path` as its name up to the first dot."""
    if column == "image_path":
        return [str(v).rsplit("/", 1)[-1].split(".", 1)[0] for v in values]
    return [str(v) for v in values]


def stem_width(stems: list[str]) -> int:
    """The number of leading key characters that name the shard (all stems of data.shards are that long)."""
    widths = {len(s) for s in stems}
    if len(widths) != 1:
        raise ConfigError(f"data.shards: stems of {sorted(widths)} characters; an import joins keys to shards "
                          "by their leading characters, so every stem must have the same length (img2dataset's do)")
    return widths.pop()


def unit_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows as float16 of unit norm, bad rows): rows already unit are kept bit for bit (float16 -> float32
    -> float16 is exact), others divided by their norm; NaN, inf or all-zero rows are bad (zeroed)."""
    x = np.array(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1)
    bad = ~np.isfinite(norm) | (norm == 0)
    off = ~bad & (np.abs(norm - 1) > NORM_TOL)
    x[off] /= norm[off, None]
    x[bad] = 0
    return x.astype(np.float16), bad


def shard_parquet(path: str) -> Path:
    """img2dataset's per-shard table next to the tar (`00042.parquet` for `00042.tar`): key and status."""
    return Path(path).with_name(stem(path) + ".parquet")


def image_keys(path: str) -> set[str]:
    """The keys of the samples with an image in a shard: from img2dataset's S.parquet (status "success")
    when it is there, else from the tar's headers (several times slower, see docs/benchmarks.md)."""
    table = shard_parquet(path)
    try:
        if table.is_file():
            import pyarrow.parquet as pq

            t = pq.read_table(table, columns=["key", "status"]).to_pydict()
            return {str(k) for k, ok in zip(t["key"], t["status"]) if ok == "success"}
        from cluster_job.checks import tar_keys  # headers only

        return tar_keys(path)
    except (tarfile.TarError, OSError, KeyError, ValueError) as e:
        raise OSError(f"{table if table.is_file() else path}: cannot list the shard's keys to join imported rows "
                      f"({type(e).__name__}: {e}); repair or re-download the shard, or leave it out of data.shards") from None


@dataclass
class Plan:
    """Where each row of a part goes: fragment (shard) and row within it, -1 when dropped."""
    shards: list[str]
    keys: dict            # shard -> its fragment's keys, sorted
    frag: np.ndarray      # [part rows] index into shards, -1: dropped
    pos: np.ndarray       # [part rows] row in the fragment
    skipped: dict         # shard -> Counter of rows dropped by reason
    not_in_shards: int


def plan_part(keys: np.ndarray, width: int, wanted: dict[str, str], present=image_keys) -> Plan:
    """Group a part's rows by image shard in key order; drop (and count) rows without an image.
    `present(path)` gives the keys of a shard that have an image."""
    shard = np.asarray([k[:width] for k in keys.tolist()], dtype=str)
    order = np.lexsort((keys, shard))
    frag = np.full(len(keys), -1, np.int64)
    pos = np.zeros(len(keys), np.int64)
    cuts = np.flatnonzero(np.r_[True, shard[order][1:] != shard[order][:-1], True])
    names, kept, skipped, outside = [], {}, {}, 0
    for a, b in zip(cuts[:-1], cuts[1:]):
        rows = order[a:b]
        s = str(shard[rows[0]])
        if s not in wanted:
            outside += len(rows)
            continue
        k = keys[rows]
        first = np.r_[True, k[1:] != k[:-1]]  # sorted: a repeat follows its first
        found = np.isin(k, np.asarray(sorted(present(wanted[s])), dtype=str))
        use = first & found
        skipped[s] = Counter({r: int(c) for r, c in (("duplicate_key", (~first).sum()),
                                                     ("image_absent", (first & ~found).sum())) if c})
        if use.any():
            frag[rows[use]] = len(names)
            pos[rows[use]] = np.arange(int(use.sum()))
            kept[s] = k[use]
            names.append(s)
    return Plan(names, kept, frag, pos, skipped, outside)


def parts_dir(run_dir: str) -> Path:
    return embed_dir(run_dir) / "parts"


def part_marker(run_dir: str, name: str) -> Path:
    return parts_dir(run_dir) / f"{name}.done.json"


def source_record(cfg) -> dict:
    return {"folder": str(cfg.embed.source), "clip": f"{cfg.clip.model} {cfg.clip.pretrained}"}


def import_part(cfg, src: Source, part: Part, wanted: dict[str, str]) -> dict:
    """Write one part's per-shard fragments, then its marker (last). Returns the marker's content."""
    start = time.monotonic()
    out = parts_dir(cfg.run_dir) / part.name
    p = plan_part(src.keys(part), stem_width(list(wanted)), wanted)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {s: {side: out / f".{s}.{side}.npy.tmp" for side in ("img", "txt")} for s in p.shards}
    maps = {s: {side: np.lib.format.open_memmap(path, "w+", np.float16, (len(p.keys[s]), src.dim))
                for side, path in tmp[s].items()} for s in p.shards}
    bad = {s: np.zeros(len(p.keys[s]), bool) for s in p.shards}
    batches = progress(src.batches(part, int(cfg["import"].batch_size)), desc=f"import part {part.name}",
                       mode=cfg.progress, unit="batch", rows=lambda b: len(b[1]))
    for at, img, txt, keys in batches:
        f, r = p.frag[at:at + len(img)], p.pos[at:at + len(img)]
        img, bad_img = unit_rows(img)
        txt, bad_txt = unit_rows(txt)
        for i in np.unique(f[f >= 0]):
            s, m = p.shards[i], f == i
            maps[s]["img"][r[m]] = img[m]
            maps[s]["txt"][r[m]] = txt[m]
            bad[s][r[m]] = (bad_img | bad_txt)[m]
            if not (np.asarray(keys, dtype=str)[m] == p.keys[s][r[m]]).all():
                raise ValueError(f"{part.metadata}: the key column changed while it was read")
    shards = {}
    for s in p.shards:
        for side, path in tmp[s].items():
            maps[s][side].flush()
            os.replace(path, out / f"{s}.{side}.npy")  # a new file each time: links to an old one keep it
        write_text_atomic(out / f"{s}.keys.txt", "".join(k + "\n" for k in p.keys[s].tolist()))
        shards[s] = {"n": len(p.keys[s]), "bad": np.flatnonzero(bad[s]).tolist(), "skipped": dict(p.skipped[s])}
    for s in set(p.skipped) - set(p.shards):  # every row of the shard dropped
        shards[s] = {"n": 0, "bad": [], "skipped": dict(p.skipped[s])}
    marker = {"part": part.name, "rows": part.count, "shards": shards, "shard_not_in_data_shards": p.not_in_shards,
              "config": {**embed_identity(cfg), "import.key_column": src.key_column},
              "seconds": round(time.monotonic() - start, 3)}
    write_json_atomic(part_marker(cfg.run_dir, part.name), marker)
    return marker


def _link(src: Path, dst: Path) -> None:
    """dst as a hard link of src (a copy where the file system has none), replaced atomically."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def merge_shard(run_dir: str, s: str, pieces: list[tuple[str, dict]]) -> tuple[int, Counter]:
    """Write RUN/embed/S.{img,txt}.npy and S.keys.txt from its fragments: linked when one fragment holds the
    whole shard, else merged in key order (a key in two parts keeps its first). Returns (rows, skipped)."""
    out, skipped = embed_dir(run_dir), Counter()
    for _, e in pieces:
        skipped.update(e["skipped"])
    pieces = [(name, e) for name, e in pieces if e["n"]]
    frags = [parts_dir(run_dir) / name for name, _ in pieces]
    if len(pieces) == 1 and not pieces[0][1]["bad"]:
        for suffix in ("img.npy", "txt.npy", "keys.txt"):
            _link(frags[0] / f"{s}.{suffix}", out / f"{s}.{suffix}")
        return pieces[0][1]["n"], skipped
    keys, src = [], []
    for i, (f, (_, e)) in enumerate(zip(frags, pieces)):
        k = np.asarray((f / f"{s}.keys.txt").read_text().splitlines(), dtype=str)
        good = np.ones(len(k), bool)
        good[e["bad"]] = False
        skipped["nonfinite_feature"] += len(e["bad"])
        keys.append(k[good])
        src.append(np.stack([np.full(good.sum(), i), np.flatnonzero(good)], 1))
    keys = np.concatenate(keys) if keys else np.zeros(0, str)
    src = np.concatenate(src) if src else np.zeros((0, 2), np.int64)
    order = np.argsort(keys, kind="stable")
    keys, src = keys[order], src[order]
    first = np.r_[True, keys[1:] != keys[:-1]] if len(keys) else np.zeros(0, bool)
    skipped["duplicate_key"] += int((~first).sum())
    keys, src = keys[first], src[first]
    skipped = Counter({r: c for r, c in skipped.items() if c})
    for side in ("img", "txt"):
        arrays = [np.load(f / f"{s}.{side}.npy", mmap_mode="r") for f in frags]
        d = arrays[0].shape[1] if arrays else 0
        with atomic_path(out / f"{s}.{side}.npy") as tmp:
            dst = np.lib.format.open_memmap(tmp, "w+", np.float16, (len(keys), d))
            for a in range(0, len(keys), MERGE_CHUNK):
                chunk = src[a:a + MERGE_CHUNK]
                for i in np.unique(chunk[:, 0]):
                    m = chunk[:, 0] == i
                    dst[a + np.flatnonzero(m)] = arrays[i][chunk[m, 1]]
            dst.flush()
            del dst
    write_text_atomic(out / f"{s}.keys.txt", "".join(k + "\n" for k in keys.tolist()))
    return len(keys), skipped


def shard_done(cfg, s: str, path: str, n: int, d: int, skipped: Counter, parts: list[str], seconds: float) -> dict:
    done = {"n": n, "d": d, "skipped": dict(sorted(skipped.items())), "damaged": None,
            "config": {**embed_identity(cfg), "data.shard": str(path)},
            "source": {**source_record(cfg), "parts": parts}, "seconds": round(seconds, 3)}
    write_json_atomic(done_path(cfg.run_dir, s), done)
    return done


def finalize(cfg, src: Source, wanted: dict[str, str]) -> list[dict]:
    """Every part done: each shard's fragments -> RUN/embed/S.*, done.json last. Safe to run in several
    tasks at once (each write is atomic and writes the same); shards already done are skipped."""
    pieces = defaultdict(list)
    for part in src.parts:
        marker = read_json(part_marker(cfg.run_dir, part.name))
        for s, e in marker["shards"].items():
            pieces[s].append((part.name, e))
    written = []
    for s in progress(sorted(pieces), total=len(pieces), desc="import: shards", mode=cfg.progress, unit="shard"):
        if done_path(cfg.run_dir, s).is_file():
            continue
        start = time.monotonic()
        n, skipped = merge_shard(cfg.run_dir, s, pieces[s])
        written.append(shard_done(cfg, s, wanted[s], n, src.dim, skipped, [p for p, _ in pieces[s]],
                                  time.monotonic() - start))
    return written


def check_existing(cfg) -> None:
    """Outputs already here must come from this source, this CLIP: part markers and shards' done.json."""
    way_on = ("features of another source or CLIP cannot be mixed with these: use a new run_dir, or delete "
              f"{embed_dir(cfg.run_dir)} to import again here")
    ident = embed_identity(cfg)
    for marker in sorted(parts_dir(cfg.run_dir).glob("*.done.json")):
        recorded = read_json(marker)["config"]
        check_same({k: recorded.get(k) for k in ident}, ident, marker, way_on)
    for done in sorted(embed_dir(cfg.run_dir).glob("*.done.json")):
        recorded = read_json(done).get("config", {})
        keys = set(ident) | {"embed.source"}
        check_same({k: recorded.get(k) for k in keys}, {k: ident.get(k) for k in keys}, done, way_on)


def check_source(cfg) -> Source:
    """The launcher's check of `embed.source`: readable, aligned, keyed, of clip.model's width."""
    from unicom_ds import model_configs

    src = Source(str(cfg.embed.source), str(cfg["import"].key_column))
    model_configs.register()
    import open_clip

    config = open_clip.get_model_config(str(cfg.clip.model)) or {}
    if config.get("embed_dim") not in (None, src.dim):
        raise ConfigError(f"embed.source={cfg.embed.source}: features of d={src.dim}, but clip.model="
                          f"{cfg.clip.model} makes d={config['embed_dim']}; set clip.model and clip.pretrained to "
                          "the CLIP that made them (LAION's: clip.model=ViT-B-32 clip.pretrained=openai)")
    check_existing(cfg)
    return src


def part_names(folder: str) -> list[str]:
    """The parts N of a source folder (from its img_emb file names), in embedding-reader's order."""
    from embedding_reader.get_file_list import get_file_list

    try:
        _, files = get_file_list(f"{str(folder).rstrip('/')}/{FOLDERS['img']}", "npy")
    except (OSError, ValueError) as e:
        raise ConfigError(f"embed.source={folder}: cannot list {FOLDERS['img']}/ ({e})") from None
    names = [_number(f, "img_emb") for f in files]
    if not names or None in names:
        raise ConfigError(f"embed.source={folder}: expected {FOLDERS['img']}/img_emb_N.npy files, found "
                          f"{', '.join(Path(f).name for f in files[:3]) or 'none'}")
    return names


def import_parts(cfg, names: list[str]) -> list[dict]:
    """Job function: import the given parts (skipping finished ones); the task that then finds every part
    done writes the shards. Returns the done.json of the shards it wrote."""
    cfg = as_config(cfg)
    start = time.monotonic()
    check_existing(cfg)
    src = Source(str(cfg.embed.source), str(cfg["import"].key_column))
    wanted = {stem(p): p for p in expand(cfg.data.shards)}
    by_name = {p.name: p for p in src.parts}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ConfigError(f"embed.source={cfg.embed.source}: no part {unknown[0]} (img_emb_{unknown[0]}.npy)")
    todo = [n for n in names if not part_marker(cfg.run_dir, n).is_file()]
    print(f"import: {len(names) - len(todo)} of {count(len(names), 'part')} already done", file=sys.stderr, flush=True)
    markers = [import_part(cfg, src, by_name[n], wanted) for n in todo]
    outside = sum(m["shard_not_in_data_shards"] for m in markers)
    if markers:
        print(f"import: {count(len(markers), 'part')}, {count(sum(m['rows'] for m in markers), 'row')} read"
              + (f", {count(outside, 'row')} of shards outside data.shards dropped" if outside else "")
              + f", {time.monotonic() - start:.1f}s -> {parts_dir(cfg.run_dir)}", file=sys.stderr, flush=True)
    waiting = [p.name for p in src.parts if not part_marker(cfg.run_dir, p.name).is_file()]
    if waiting:
        print(f"import: {count(len(waiting), 'part')} still to import (e.g. {waiting[0]}); the task that "
              "finishes the last one writes the shards", file=sys.stderr, flush=True)
        return []
    written = finalize(cfg, src, wanted)
    done = set(p.name[: -len(".done.json")] for p in embed_dir(cfg.run_dir).glob("*.done.json"))
    empty = sorted(set(wanted) - done)
    skipped = Counter()
    for d in written:
        skipped.update(d["skipped"])
    print(f"import: {count(len(written), 'shard')} written, {count(sum(d['n'] for d in written), 'row')}"
          + (f", {count(sum(skipped.values()), 'row')} dropped ({', '.join(f'{r}: {c:,}' for r, c in sorted(skipped.items()))})"
             if skipped else "")
          + (f"; {count(len(empty), 'shard')} of data.shards without imported rows (e.g. {empty[0]}): their "
             "images get no label" if empty else "") + f" -> {embed_dir(cfg.run_dir)}", file=sys.stderr, flush=True)
    return written
