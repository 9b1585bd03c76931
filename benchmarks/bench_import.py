"""Import stage throughput (rows/s per task) and the LAION-400M projections it gives.

    python benchmarks/bench_import.py --parts 2 --rows 200000 --per-shard 10000 --d 512

Writes, in a temporary folder, img2dataset-style tars (keys only: the import reads tar headers, never
images) and a clip-retrieval folder of `--parts` parts (float16 unit rows, LAION's metadata columns, the
rows of each part's shards interleaved as clip-retrieval's readers leave them), then runs the import job
function one part per task, as the launcher's array does, and times each part and the final linking.
Prints rows/s per task and the projection for `--total-rows` over `--tasks` tasks, and the k-means +
assign projection from the per-row rates measured by bench_kmeans.py (passed in; see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import io
import math
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cluster_job import import_embeddings as imp
from unicom_ds.config import resolve, select


def write_tars(folder: Path, shards: int, per_shard: int, tables: bool) -> None:
    """Tars of 3 members per sample (jpg, txt, json, as img2dataset's); with `tables`, its S.parquet too."""
    folder.mkdir(parents=True)
    for s in range(shards):
        if tables:
            keys = [f"{s:05d}{i:04d}" for i in range(per_shard)]
            pd.DataFrame({"key": keys, "status": ["success"] * per_shard, "url": ["u"] * per_shard}).to_parquet(
                folder / f"{s:05d}.parquet")
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                for ext in ("jpg", "txt", "json"):
                    info = tarfile.TarInfo(f"{s:05d}{i:04d}.{ext}")
                    info.size = 1
                    tar.addfile(info, io.BytesIO(b"x"))


def write_source(folder: Path, parts: int, rows: int, per_shard: int, d: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for sub in ("img_emb", "text_emb", "metadata"):
        (folder / sub).mkdir(parents=True)
    for n in range(parts):
        first = n * rows
        keys = [f"{(first + i) // per_shard:05d}{(first + i) % per_shard:04d}" for i in rng.permutation(rows)]
        for side, sub in (("img", "img_emb"), ("text", "text_emb")):
            x = rng.standard_normal((rows, d), dtype=np.float32)
            np.save(folder / sub / f"{sub}_{n}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        pd.DataFrame({"image_path": [f"{k[:5]}/{k}.jpg" for k in keys], "caption": ["a caption"] * rows,
                      "url": [f"http://example.com/{k}.jpg" for k in keys], "key": keys,
                      "status": ["success"] * rows, "width": [256] * rows, "height": [256] * rows,
                      "similarity": rng.random(rows)}).to_parquet(folder / "metadata" / f"metadata_{n}.parquet")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=2)
    ap.add_argument("--rows", type=int, default=200000, help="rows per part")
    ap.add_argument("--per-shard", type=int, default=10000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=65536)
    ap.add_argument("--total-rows", type=float, default=400e6)
    ap.add_argument("--part-rows", type=float, default=1e6, help="rows per part of the projected source")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--no-parquet", action="store_true", help="no img2dataset S.parquet: keys from tar headers")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        write_tars(tmp / "shards", a.parts * a.rows // a.per_shard, a.per_shard, not a.no_parquet)
        write_source(tmp / "src", a.parts, a.rows, a.per_shard, a.d)
        print(f"setup {time.monotonic() - t0:.1f}s", file=sys.stderr)
        n_shards = a.parts * a.rows // a.per_shard
        cfg = select(resolve([f"run_dir={tmp / 'run'}", f"embed.source={tmp / 'src'}", "progress=off",
                              f"data.shards={tmp / 'shards'}/{{00000..{n_shards - 1:05d}}}.tar",
                              f"import.batch_size={a.batch_size}"]))
        from cluster_job import checks  # noqa: F401  (its torch import, once per task, is not the import's rate)
        names = imp.part_names(str(tmp / "src"))
        times = []
        for name in names:
            t = time.monotonic()
            written = imp.import_parts(cfg, [name])
            times.append(time.monotonic() - t)
        # the last task also linked every shard: its time minus the others' mean is the linking
        part_s = float(np.mean(times[:-1])) if len(times) > 1 else times[0]
        link_s = max(0.0, times[-1] - part_s)
        rows = sum(d["n"] for d in written)
    rate = a.rows / part_s
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_parts = math.ceil(a.total_rows / a.part_rows)
    per_part = a.part_rows / rate
    waves = math.ceil(n_parts / a.tasks)
    print(f"import: {a.parts} parts x {a.rows:,} rows (d={a.d}), {rows:,} rows written into {n_shards} shards, "
          f"image keys from {'tar headers' if a.no_parquet else 'img2dataset S.parquet'}")
    print(f"  per part: {part_s:.2f}s = {rate:,.0f} rows/s per task; linking {n_shards} shards: {link_s:.2f}s; "
          f"peak RSS {rss:.0f} MB")
    print(f"  projection: {a.total_rows:,.0f} rows in {n_parts} parts of {a.part_rows:,.0f}: {per_part:.0f}s per part, "
          f"{waves} waves over {a.tasks} tasks = {waves * per_part / 60:.1f} min "
          f"({n_parts * per_part / 3600:.1f} CPU-task-hours)")


if __name__ == "__main__":
    main()
