"""The join of released rows to the user's image shards, pure and bucket-sized.

`import.key_column=url` (the default): a released row joins the sample of the user's img2dataset download with the
same URL, the one identifier that survives a re-download (shard numbers, keys and failed URLs all differ).
The download's URLs come from img2dataset's `S.parquet` next to each tar (rows with status "success"), else
from the `.json` of each sample that has an image in the tar.

Duplicates (LAION has repeated URLs, some with other captions): the match is on url + caption when both sides
have a caption, else on the url alone. A match value held by more than one row on either side is ambiguous:
every row holding it is dropped and counted ("duplicate_url"), never guessed.

`import.key_column=key | image_path` (for LAION's own download): the row's shard is the metadata's `shard_id`
column, read, never guessed; its sample is `key` (an integer matches the tar key of that value,
`33` <-> `000000033`) or `image_path`'s file name up to its first dot.

Both sides are hash-partitioned by match value into buckets (`bucket_of`), so a bucket of each side holds
every row that can match, and one bucket is joined at a time: memory is one bucket's rows, whatever the total.
"""
from __future__ import annotations

import json
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster_job.wds_reader import IMAGE_EXTS
from unicom_ds.config import ConfigError
from unicom_ds.shards import stem

RELEASE_COLUMNS = {"url": ["url"], "key": ["shard_id", "key"], "image_path": ["shard_id", "image_path"]}


def bucket_of(values: list[str], buckets: int) -> np.ndarray:
    """The bucket of each match value: crc32, the same in every process (Python's hash() is salted)."""
    return np.fromiter((zlib.crc32(v.encode()) for v in values), np.uint64, len(values)) % np.uint64(buckets)


def sample_key(value, integer: bool) -> str:
    """A sample's key as matched: digits as their integer when the release keys are integers."""
    return str(int(value)) if integer else str(value)


def path_key(value) -> str:
    """image_path's sample key: `00042/000420017.jpg` -> `000420017`."""
    return str(value).rsplit("/", 1)[-1].split(".", 1)[0]


def release_match(table: pa.Table, join: str, metadata: str) -> tuple[list[str], bool]:
    """(match value of each released row, whether keys are integers) for `import.key_column`."""
    missing = [c for c in RELEASE_COLUMNS[join] if c not in table.column_names]
    if missing:
        raise ConfigError(f"{metadata}: no {missing[0]} column (columns: {', '.join(table.column_names)}); "
                          f"import.key_column={join} needs {' and '.join(RELEASE_COLUMNS[join])}")
    if join == "url":
        return [str(u) for u in table.column("url").to_pylist()], False
    if table.column("shard_id").null_count:
        raise ConfigError(f"{metadata}: shard_id is empty on some rows; import.key_column={join} cannot place them")
    shards = [int(s) for s in table.column("shard_id").to_pylist()]
    column = table.column(join)
    integer = pa.types.is_integer(column.type)
    keys = [path_key(v) if join == "image_path" else sample_key(v, integer) for v in column.to_pylist()]
    return [f"{s}/{k}" for s, k in zip(shards, keys)], integer


def _tar_samples(path: str) -> list[dict]:
    """{key, url, caption} of each sample with an image in an img2dataset tar, from its `.json` members."""
    meta, images = {}, set()
    with tarfile.open(path) as tar:
        for m in tar:
            base, _, ext = m.name.partition(".")
            if ext.lower() in IMAGE_EXTS:
                images.add(base)
            elif ext == "json":
                record = json.loads(tar.extractfile(m).read())
                meta[base] = {"key": base, "url": record.get("url"), "caption": record.get("caption")}
    return [meta.get(k, {"key": k, "url": None, "caption": None}) for k in sorted(images)]


def download_table(path: str, join: str, integer_keys: bool = False) -> pa.Table:
    """The samples with an image in one shard of the user's download: match, caption, key (its __key__).
    From img2dataset's S.parquet (status "success") when it is there, else from the tar's `.json` members."""
    import pyarrow.parquet as pq

    table_path = Path(path).with_name(stem(path) + ".parquet")
    source = table_path if table_path.is_file() else Path(path)
    try:
        if table_path.is_file():
            names = pq.read_schema(table_path).names
            wanted = [c for c in ("key", "status", "url", "caption") if c in names]
            t = pq.read_table(table_path, columns=wanted)
            if "status" in names:
                t = t.filter(pc.equal(t.column("status"), "success"))
            rows = t.to_pydict()
        else:
            samples = _tar_samples(path)
            rows = {c: [s[c] for s in samples] for c in ("key", "url", "caption")}
    except (tarfile.TarError, OSError, ValueError, pa.ArrowException) as e:
        raise OSError(f"{source}: cannot list the shard's samples to join released rows "
                      f"({type(e).__name__}: {e}); repair or re-download it, or leave it out of data.shards") from None
    keys = [str(k) for k in rows.get("key", [])]
    if join == "url":
        if "url" not in rows or any(u is None for u in rows["url"]):
            raise OSError(f"{source}: samples without a url (img2dataset writes it into S.parquet and each "
                          "sample's .json); import.key_column=url cannot place them")
        match = [str(u) for u in rows["url"]]
    else:
        shard = int(stem(path)) if stem(path).isdigit() else None
        if shard is None:
            raise ConfigError(f"data.shards: {path} is not named by a shard number; import.key_column={join} matches "
                              "the release's shard_id to the tar's number")
        match = [f"{shard}/{sample_key(k, integer_keys and k.isdigit())}" for k in keys]
    caption = rows.get("caption") or [None] * len(keys)
    return pa.table({"match": pa.array(match, pa.string()), "caption": pa.array(caption, pa.string()),
                     "key": pa.array(keys, pa.string())})


def _counts(table: pa.Table, on: list[str]) -> pa.Table:
    return table.group_by(on).aggregate([("match", "count")]).rename_columns([*on, "n"])


def join_bucket(release: pa.Table, download: pa.Table, on: list[str]) -> tuple[pa.Table, Counter]:
    """Released rows (match, caption, part, row) x downloaded samples (match, caption, shard, key) of one
    bucket -> (part, row, shard, key) of every row joined, and Counter of the rest: "duplicate_url" (its match
    value not unique on one side), "not_in_download" (no sample has it)."""
    rel_n = release.join(_counts(release, on), on, join_type="left outer")
    rel_dup = pc.greater(rel_n.column("n"), 1)
    unique = rel_n.filter(pc.invert(rel_dup)).drop_columns(["n"])
    matched = unique.join(_counts(download, on), on, join_type="left outer")  # one row per released row
    found = pc.is_valid(matched.column("n"))
    ok = pc.and_(found, pc.equal(matched.column("n"), 1))
    skipped = Counter({"duplicate_url": int(pc.sum(rel_dup).as_py() or 0)
                       + int(pc.sum(pc.and_(found, pc.invert(ok))).as_py() or 0),
                       "not_in_download": int(pc.sum(pc.invert(found)).as_py() or 0)})
    joined = matched.filter(ok).join(download.select([*on, "shard", "key"]), on, join_type="inner")
    joined = joined.select(["part", "row", "shard", "key"])
    return joined, +skipped


def check_share(joined: int, rows: int, min_join: float, join: str, folder: str, shards: str,
                nonfinite: int = 0) -> None:
    """Refuse a join that holds for fewer than `min_join` of the released rows, naming the likely causes;
    `joined` counts only rows with finite features (`nonfinite` more joined without)."""
    share = joined / rows if rows else 0.0
    if share >= min_join:
        return
    causes = {"url": "data.shards is another download or another subset than embed.source (different URLs), or "
                     "captions differ between the two",
              "key": "data.shards is not LAION's own download (re-downloaded shards have other numbers and "
                     "keys: use import.key_column=url), or the wrong key column (try import.key_column=image_path)",
              "image_path": "data.shards is not LAION's own download (use import.key_column=url), or the wrong key "
                            "column (try import.key_column=key)"}
    unusable = (f" ({nonfinite:,} more joined, with NaN, inf or zero features: damaged release files?)"
                if nonfinite else "")
    raise ConfigError(f"import: only {joined:,} of {rows:,} released rows ({share:.1%}) joined an image of "
                      f"data.shards={shards} by import.key_column={join} with finite features{unusable}, below "
                      f"import.min_join={min_join:g}; likely {causes[join]}. Nothing was labelled; "
                      f"embed.source={folder}. A partial download on purpose: lower import.min_join")
