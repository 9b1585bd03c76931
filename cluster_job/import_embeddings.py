"""Import stage: released CLIP features (LAION's, or any clip-retrieval output; layouts in cluster_job.release)
joined to the user's own image shards -> RUN/embed/S.{img,txt}.npy, S.keys.txt, S.done.json, in place of embed.

The join (cluster_job.url_join): by URL by default, url + caption where both sides have captions, ambiguous
and missing rows counted and dropped; `import.key_column=key|image_path` with the release's shard_id for LAION's
own download. A join holding for fewer than `import.min_join` of the released rows stops the stage before
k-means (ConfigError naming the share and likely causes), with nothing written to RUN/embed/S.*.

Out of core, in three steps, each restartable from its marker (a task finds each done one and skips it):
1. per part N (the launcher's array, one or more parts a task): the part's match values, hash-partitioned
   into B buckets (`parts/N/release.parquet`, row groups never spanning two); the download shards of its share
   (shard j goes to the part at position j mod P) likewise (`parts/N/download.parquet`); its features as
   float16 unit rows in part order (`parts/N/{img,txt}.npy`); then `parts/N.done.json`.
2. the task that finds every part done (on a rerun where all were done before: the last part's task) joins
   bucket by bucket (`parts/join/b.parquet`, grouped by group of shards), checks the share, writes
   `parts/join.json`.
3. the same task writes each shard from its group's rows, in key order, gathered from the parts' features;
   `S.done.json` last. Memory: one bucket or one group of shards (about import.bucket_rows rows), whatever the
   number of rows.
Rows already of unit norm (clip-retrieval stores them so) are kept bit for bit; others are normalised; rows
holding NaN, inf or zeros are dropped ("nonfinite_feature").
"""
from __future__ import annotations

import contextlib
import math
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cluster_job import release, url_join
from cluster_job.features import done_path, embed_dir, embed_identity
from cluster_job.release import Release, describe
from unicom_ds.atomic import atomic_path, read_json, write_json_atomic, write_text_atomic
from unicom_ds.config import ConfigError, as_config, check_same, undo_save
from unicom_ds.progress import count, progress
from unicom_ds.shards import expand, stem

# |norm - 1| within which a stored row counts as unit: float16 rounding of a unit row stays far inside it.
NORM_TOL = 2e-3
ROW_GROUP = 2**20  # rows per parquet row group (pyarrow's default cap)
DOWNLOAD = pa.schema([("match", pa.string()), ("caption", pa.string()), ("key", pa.string()), ("shard", pa.int32())])


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


def parts_dir(run_dir: str) -> Path:
    return embed_dir(run_dir) / "parts"


def part_marker(run_dir: str, name: str) -> Path:
    return parts_dir(run_dir) / f"{name}.done.json"


def identity(cfg) -> dict:
    """What the parts' and the join's files depend on: a rerun with other values is refused."""
    return {**embed_identity(cfg), "data.shards": str(cfg.data.shards), "import.key_column": join_of(cfg),
            "import.bucket_rows": int(cfg["import"].bucket_rows)}


def join_of(cfg) -> str:
    """import.key_column: url, key or image_path (`auto`, the value of runs made before the URL join, is url)."""
    value = str(cfg["import"].key_column)
    return "url" if value == "auto" else value


def bucket_count(rows: int, bucket_rows: int) -> int:
    return max(1, math.ceil(rows / bucket_rows))


def shard_group(shard: np.ndarray, shards: int, groups: int) -> np.ndarray:
    """The group of each shard index: contiguous runs of shards, `groups` of them."""
    return np.asarray(shard, np.int64) * groups // max(1, shards)


def write_grouped(path: Path, table: pa.Table, group: np.ndarray, groups: int) -> list[list[int]]:
    """Write `table` sorted by group, row groups never spanning two groups; returns [first row group, count]
    of each group, so that one group is read without the others."""
    order = np.argsort(group, kind="stable")
    table, group = table.take(pa.array(order)), group[order]
    cuts = np.searchsorted(group, np.arange(groups + 1))
    index, written = [], 0
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, table.schema) as writer:
        for g in range(groups):
            chunks = range(cuts[g], cuts[g + 1], ROW_GROUP)
            for a in chunks:
                writer.write_table(table.slice(a, min(ROW_GROUP, cuts[g + 1] - a)), row_group_size=ROW_GROUP)
            index.append([written, len(chunks)])
            written += len(chunks)
    return index


def read_group(path: Path, index: list[list[int]], g: int) -> pa.Table | None:
    first, n = index[g]
    return pq.ParquetFile(path).read_row_groups(list(range(first, first + n))) if n else None


def bucket_release(rel: Release, part, at: int, join: str, out: Path, buckets: int) -> tuple[list, bool, bool]:
    """A part's match values (url [+ caption], or shard_id/key) -> out/release.parquet, one row group set per
    bucket. Returns (its bucket index, whether it has captions, whether its keys are integers)."""
    captions = join == "url" and "caption" in rel.columns
    meta = rel.metadata(part, url_join.RELEASE_COLUMNS[join] + (["caption"] if captions else []))
    match, integer = url_join.release_match(meta, join, part.metadata)
    released = pa.table({"match": pa.array(match, pa.string()),
                         "caption": meta.column("caption").cast(pa.string()) if captions
                         else pa.nulls(len(match), pa.string()),
                         "part": pa.array(np.full(len(match), at, np.int32)),
                         "row": pa.array(np.arange(len(match), dtype=np.int64))})
    return write_grouped(out / "release.parquet", released, url_join.bucket_of(match, buckets), buckets), \
        captions, integer


def bucket_download(cfg, paths: list[str], share: list[int], join: str, integer: bool, out: Path, buckets: int,
                    desc: str) -> tuple[list, int, bool]:
    """The samples of the download shards `share` (indexes into paths) -> out/download.parquet, bucketed.
    Returns (its bucket index, samples, whether every sample has a caption)."""
    tables = []
    for j in progress(share, desc=desc, mode=cfg.progress, unit="shard"):
        t = url_join.download_table(paths[j], join, integer)
        tables.append(t.append_column("shard", pa.array(np.full(t.num_rows, j, np.int32))))
    downloaded = pa.concat_tables(tables) if tables else DOWNLOAD.empty_table()
    index = write_grouped(out / "download.parquet", downloaded,
                          url_join.bucket_of(downloaded.column("match").to_pylist(), buckets), buckets)
    return index, downloaded.num_rows, downloaded.column("caption").null_count == 0


def copy_features(cfg, rel: Release, part, out: Path) -> list[int]:
    """A part's image and text rows -> out/{img,txt}.npy, float16 unit rows in part order. Returns bad rows."""
    bad = np.zeros(part.count, bool)
    with atomic_path(out / "img.npy") as img_tmp, atomic_path(out / "txt.npy") as txt_tmp:
        maps = [np.lib.format.open_memmap(p, "w+", np.float16, (part.count, rel.dim)) for p in (img_tmp, txt_tmp)]
        batches = progress(rel.batches(part, int(cfg["import"].batch_size)), desc=f"import part {part.name}",
                           mode=cfg.progress, unit="batch", rows=lambda b: len(b[1]))
        for first, img, txt in batches:
            for m, x in zip(maps, (img, txt)):
                rows, b = unit_rows(x)
                m[first:first + len(rows)] = rows
                bad[first:first + len(rows)] |= b
        for m in maps:
            m.flush()
        del maps
    return np.flatnonzero(bad).tolist()


def import_part(cfg, rel: Release, at: int, paths: list[str], buckets: int) -> dict:
    """Step 1 for the part at position `at`: its buckets, its share of the download (shard j goes to the part at
    position j mod P), its features; the marker last."""
    start, part, join = time.monotonic(), rel.parts[at], join_of(cfg)
    out = parts_dir(cfg.run_dir) / part.name
    out.mkdir(parents=True, exist_ok=True)
    release_groups, captions, integer = bucket_release(rel, part, at, join, out, buckets)
    share = list(range(at, len(paths), len(rel.parts)))
    download_groups, samples, download_captions = bucket_download(
        cfg, paths, share, join, integer, out, buckets, desc=f"import part {part.name}: download shards")
    bad = copy_features(cfg, rel, part, out)
    marker = {"part": part.name, "at": at, "rows": part.count, "buckets": buckets, "release_groups": release_groups,
              "download_groups": download_groups, "download_shards": len(share), "download_rows": samples,
              "download_captions": download_captions, "release_captions": captions, "bad": bad,
              "config": identity(cfg), "seconds": round(time.monotonic() - start, 3)}
    write_json_atomic(part_marker(cfg.run_dir, part.name), marker)
    return marker


def join_buckets(cfg, rel: Release, markers: list[dict], groups: int, n_shards: int) -> dict:
    """Step 2: every bucket joined (skipping those done); the totals checked against import.min_join."""
    buckets, folder = markers[0]["buckets"], parts_dir(cfg.run_dir)
    bad = {m["at"]: np.asarray(m["bad"], np.int64) for m in markers}
    on = ["match", "caption"] if all(m["release_captions"] and m["download_captions"] for m in markers) else ["match"]
    (folder / "join").mkdir(exist_ok=True)
    totals = Counter()
    for b in progress(range(buckets), total=buckets, desc="import: join buckets", mode=cfg.progress, unit="bucket"):
        done = folder / "join" / f"{b}.done.json"
        if not done.is_file():
            sides = []
            for kind in ("release", "download"):
                tables = [read_group(folder / m["part"] / f"{kind}.parquet", m[f"{kind}_groups"], b) for m in markers]
                sides.append(pa.concat_tables([t for t in tables if t is not None]) if any(
                    t is not None for t in tables) else None)
            if sides[0] is None:
                write_json_atomic(done, {"joined": 0, "nonfinite": 0, "skipped": {}, "groups": [[0, 0]] * groups})
            else:
                download = sides[1] if sides[1] is not None else DOWNLOAD.empty_table()
                joined, skipped = url_join.join_bucket(sides[0], download, on)
                index = write_grouped(folder / "join" / f"{b}.parquet", joined,
                                      shard_group(joined.column("shard").to_numpy(), n_shards, groups), groups)
                write_json_atomic(done, {"joined": joined.num_rows, "nonfinite": nonfinite_rows(joined, bad),
                                         "skipped": dict(skipped), "groups": index})
        record = read_json(done)
        totals["joined"] += record["joined"]
        totals["nonfinite"] += record.get("nonfinite", 0)
        totals.update(record["skipped"])
    rows = sum(m["rows"] for m in markers)
    summary = {"rows": rows, "joined": totals.pop("joined", 0), "nonfinite": totals.pop("nonfinite", 0),
               "skipped": dict(totals), "on": on, "join": join_of(cfg), "buckets": buckets}
    try:  # rows that join but hold no finite feature are dropped later: they count as not joined
        url_join.check_share(summary["joined"] - summary["nonfinite"], rows, float(cfg["import"].min_join),
                             summary["join"], str(cfg.embed.source), str(cfg.data.shards), summary["nonfinite"])
    except ConfigError:
        shutil.rmtree(folder)  # the import's own scratch, nothing finished: the refused run keeps none of it
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # RUN/embed, where the import made it (a folder holding finished shards stays)
        undo_save(cfg)  # on SLURM the command was saved at submission, hours ago
        raise
    write_json_atomic(folder / "join.json", summary)
    return summary


def nonfinite_rows(joined: pa.Table, bad: dict) -> int:
    """Joined rows whose released features are NaN, inf or zero (`bad`: part position -> its bad rows)."""
    part, row = joined.column("part").to_numpy(), joined.column("row").to_numpy()
    return int(sum(np.isin(row[part == p], bad[p]).sum() for p in np.unique(part) if len(bad[p])))


def write_shard(cfg, s: str, path: str, rows: pa.Table, features: dict, bad: dict, names: list[str], dim: int) -> dict:
    """Step 3 for one shard: its joined rows (part, row, key), sorted by key -> RUN/embed/S.*, done.json last."""
    start = time.monotonic()
    part, row = rows.column("part").to_numpy(), rows.column("row").to_numpy()
    good = np.ones(len(row), bool)
    for p in np.unique(part):
        if len(bad[p]):
            m = part == p
            good[m] = ~np.isin(row[m], bad[p])
    part, row = part[good], row[good]
    keys = rows.column("key").to_numpy(zero_copy_only=False)[good]
    out = embed_dir(cfg.run_dir)
    for side in ("img", "txt"):
        x = np.zeros((len(row), dim), np.float16)
        for p in np.unique(part):
            m = part == p
            x[m] = features[p][side][row[m]]
        with atomic_path(out / f"{s}.{side}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, x)
    write_text_atomic(out / f"{s}.keys.txt", "".join(k + "\n" for k in keys.tolist()))
    skipped = {"nonfinite_feature": int((~good).sum())} if (~good).any() else {}
    done = {"n": len(row), "d": dim, "skipped": skipped, "damaged": None,
            "config": {**embed_identity(cfg), "data.shard": str(path)},
            "source": {"folder": str(cfg.embed.source), "clip": f"{cfg.clip.model} {cfg.clip.pretrained}",
                       "join": join_of(cfg), "parts": sorted(names[p] for p in np.unique(part))},
            "seconds": round(time.monotonic() - start, 3)}
    write_json_atomic(done_path(cfg.run_dir, s), done)
    return done


def write_shards(cfg, rel: Release, markers: list[dict], paths: list[str], groups: int) -> list[dict]:
    """Step 3: each group of shards read from every bucket's join, each shard not yet done written."""
    folder = parts_dir(cfg.run_dir)
    buckets = markers[0]["buckets"]
    index = [read_json(folder / "join" / f"{b}.done.json")["groups"] for b in range(buckets)]
    bad = {m["at"]: np.asarray(m["bad"], np.int64) for m in markers}
    stems = [stem(p) for p in paths]
    group = shard_group(np.arange(len(paths)), len(paths), groups)
    written = []
    for g in progress(range(groups), total=groups, desc="import: shards", mode=cfg.progress, unit="group"):
        todo = [j for j in np.flatnonzero(group == g) if not done_path(cfg.run_dir, stems[j]).is_file()]
        if not todo:
            continue
        tables = [read_group(folder / "join" / f"{b}.parquet", index[b], g) for b in range(buckets)]
        tables = [t for t in tables if t is not None]
        if not tables:
            continue
        rows = pa.concat_tables(tables).sort_by([("shard", "ascending"), ("key", "ascending")])
        cuts = np.searchsorted(rows.column("shard").to_numpy(), np.arange(len(paths) + 1))
        # mapped anew for each group: the pages a group touched leave this process's memory with it
        features = {m["at"]: {side: np.load(folder / m["part"] / f"{side}.npy", mmap_mode="r")
                              for side in ("img", "txt")} for m in markers}
        for j in todo:
            if cuts[j + 1] > cuts[j]:
                written.append(write_shard(cfg, stems[j], paths[j], rows.slice(cuts[j], cuts[j + 1] - cuts[j]),
                                           features, bad, [p.name for p in rel.parts], rel.dim))
        del features
    return written


def check_existing(cfg) -> None:
    """Outputs already here must come from this source, CLIP, download and join: parts' and shards' markers."""
    way_on = ("features of another source, CLIP, download or join cannot be mixed with these: use a new run_dir, "
              f"or delete {embed_dir(cfg.run_dir)} to import again here")
    ident = identity(cfg)
    for marker in sorted(parts_dir(cfg.run_dir).glob("*.done.json")):
        recorded = read_json(marker)["config"]
        check_same({k: recorded.get(k) for k in ident}, ident, marker, way_on)
    shard_ident = embed_identity(cfg)
    keys = set(shard_ident) | {"embed.source"}
    for done in sorted(embed_dir(cfg.run_dir).glob("*.done.json")):
        recorded = read_json(done).get("config", {})
        check_same({k: recorded.get(k) for k in keys}, {k: shard_ident.get(k) for k in keys}, done, way_on)


def release_of(cfg) -> Release:
    return Release(str(cfg.embed.source), dict(cfg["import"].folders))


def check_source(cfg) -> Release:
    """The launcher's check of `embed.source`: its folders found, parts paired and aligned, the join's columns
    there, the features of clip.model's width, nothing of another import in the run."""
    from unicom_ds import model_configs

    rel = release_of(cfg)
    join = join_of(cfg)
    missing = [c for c in url_join.RELEASE_COLUMNS[join] if c not in rel.columns]
    if missing:
        hint = "; LAION's own download needs shard_id: with a download of your own, keep import.key_column=url"
        raise ConfigError(f"import.key_column={join}: {rel.parts[0].metadata} has no {missing[0]} column (columns: "
                          f"{', '.join(rel.columns)})" + (hint if join != "url" else ""))
    model_configs.register()
    import open_clip

    config = open_clip.get_model_config(str(cfg.clip.model)) or {}
    if config.get("embed_dim") not in (None, rel.dim):
        raise ConfigError(f"embed.source={cfg.embed.source}: features of d={rel.dim}, but clip.model="
                          f"{cfg.clip.model} makes d={config['embed_dim']}; set clip.model and clip.pretrained to "
                          "the CLIP that made them (LAION's: clip.model=ViT-B-32 clip.pretrained=openai)")
    check_existing(cfg)
    print(f"import: embed.source={rel.folder}: {count(len(rel.parts), 'part')} in {describe(rel.folders)}, joined by "
          f"import.key_column={join}", file=sys.stderr, flush=True)
    return rel


def part_names(folder: str) -> list[str]:
    """The parts N of a source folder: every N of an img_emb_N.npy in its subfolders. The launcher lists them
    knowing only the folder, so import.folders.img is applied by each task (a name it lacks is refused)."""
    fs, root = release.fs_of(folder)
    try:
        names = {n for sub in fs.ls(root, detail=False) if fs.isdir(sub)
                 for n in release.numbered(fs.ls(sub, detail=False), "img")}
    except OSError as e:
        raise ConfigError(f"embed.source={folder}: cannot list it ({e})") from None
    if not names:
        raise ConfigError(f"embed.source={folder}: no img_emb_N.npy in any of its folders")
    return sorted(names)


def import_parts(cfg, names: list[str]) -> list[dict]:
    """Job function: step 1 for the given parts (skipping finished ones); the task that then finds every part
    done runs steps 2 and 3 (on a rerun with every part done before: the task of the last part), skipping
    buckets and shards already done. Returns the done.json of the shards it wrote."""
    cfg = as_config(cfg)
    start = time.monotonic()
    check_existing(cfg)
    rel = release_of(cfg)
    paths = expand(cfg.data.shards)
    at = {p.name: i for i, p in enumerate(rel.parts)}
    unknown = [n for n in names if n not in at]
    if unknown:
        raise ConfigError(f"embed.source={cfg.embed.source}: no part {unknown[0]} (img_emb_{unknown[0]}.npy)")
    buckets = bucket_count(sum(p.count for p in rel.parts), int(cfg["import"].bucket_rows))
    todo = [n for n in names if not part_marker(cfg.run_dir, n).is_file()]
    print(f"import: {len(names) - len(todo)} of {count(len(names), 'part')} already done", file=sys.stderr, flush=True)
    made = [import_part(cfg, rel, at[n], paths, buckets) for n in todo]
    if made:
        print(f"import: {count(len(made), 'part')}, {count(sum(m['rows'] for m in made), 'row')} read, "
              f"{count(sum(m['download_rows'] for m in made), 'downloaded sample')} listed, "
              f"{time.monotonic() - start:.1f}s -> {parts_dir(cfg.run_dir)}", file=sys.stderr, flush=True)
    waiting = [p.name for p in rel.parts if not part_marker(cfg.run_dir, p.name).is_file()]
    if waiting:
        print(f"import: {count(len(waiting), 'part')} still to import (e.g. {waiting[0]}); the task that "
              "finishes the last one joins and writes the shards", file=sys.stderr, flush=True)
        return []
    if not made and rel.parts[-1].name not in names:  # a rerun: one task (the last part's) finishes, not all
        print("import: every part was done before; the task of the last part joins and writes the shards",
              file=sys.stderr, flush=True)
        return []
    markers = [read_json(part_marker(cfg.run_dir, p.name)) for p in rel.parts]
    groups = min(buckets, len(paths))
    summary = join_buckets(cfg, rel, markers, groups, len(paths))
    written = write_shards(cfg, rel, markers, paths, groups)
    done = {p.name[: -len(".done.json")] for p in embed_dir(cfg.run_dir).glob("*.done.json")}
    empty = sorted({stem(p) for p in paths} - done)
    dropped = summary["skipped"]
    print(f"import: {summary['joined']:,} of {summary['rows']:,} released rows joined by {summary['join']} "
          f"(on {' + '.join(summary['on'])})"
          + (f", {sum(dropped.values()):,} dropped ({', '.join(f'{r}: {c:,}' for r, c in sorted(dropped.items()))})"
             if dropped else "")
          + f"; {count(len(written), 'shard')} written"
          + (f"; {count(len(empty), 'shard')} of data.shards without imported rows (e.g. {empty[0]}): their "
             "images get no label" if empty else "") + f" -> {embed_dir(cfg.run_dir)}", file=sys.stderr, flush=True)
    return written
