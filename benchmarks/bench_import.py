"""Import stage throughput per step and per task, its peak memory, and the LAION-400M projection.

    python benchmarks/bench_import.py --parts 4 --rows 200000 --per-shard 10000 --d 512 --bucket-rows 200000

Writes, in a temporary folder, a release in LAION-400M's layout (`images/ texts/ metadata/`, float16 unit rows,
LAION's metadata columns, each part's rows from many shards) and the user's re-download of the same URLs as
img2dataset leaves it (`S.parquet` beside each shard, other shard numbers and keys, `--failed` of the URLs
failed). With S.parquet present the import reads no tar, so only the tables are written. Then runs the import's
three steps as the job does (cluster_job.import_embeddings): step 1 once per part (one array task each), then
the join bucket by bucket and the shards group by group (the task that finishes last). Prints rows/s of each
step, the process's peak RSS (run it at two sizes: flat memory means the same peak), and the projection for
`--total-rows` in parts of `--part-rows` over `--tasks` tasks.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cluster_job import import_embeddings as imp
from unicom_ds.config import resolve


def urls(n: int) -> list[str]:
    return [f"http://images{i % 997}.example.com/photos/{i:09d}/full.jpg" for i in range(n)]


def write_release(folder: Path, parts: int, rows: int, d: int, rng: np.random.Generator) -> None:
    for sub in ("images", "texts", "metadata"):
        (folder / sub).mkdir(parents=True)
    order = rng.permutation(parts * rows)
    link = urls(parts * rows)
    for n in range(parts):
        r = np.sort(order[n * rows:(n + 1) * rows])  # a part holds rows of many shards, in their order
        for sub, name in (("images", "img_emb"), ("texts", "text_emb")):
            x = rng.standard_normal((rows, d), dtype=np.float32)
            np.save(folder / sub / f"{name}_{n}.npy", (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16))
        pd.DataFrame({"image_path": [f"{i % 10000:09d}" for i in r], "caption": [f"caption {i}" for i in r],
                      "NSFW": "UNLIKELY", "similarity": rng.random(rows), "LICENSE": "?",
                      "url": [link[i] for i in r], "key": r % 10000, "shard_id": r // 10000, "status": "success",
                      "error_message": None, "width": 256, "height": 256, "exif": "{}", "original_width": 640,
                      "original_height": 480}).to_parquet(folder / "metadata" / f"metadata_{n}.parquet")


def write_download(folder: Path, total: int, per_shard: int, failed: float, rng: np.random.Generator) -> int:
    """img2dataset's S.parquet of a re-download: the same URLs from shard 0 on, `failed` of them failed."""
    folder.mkdir(parents=True)
    link = urls(total)
    ok = rng.random(total) >= failed
    shards = math.ceil(total / per_shard)
    for s in range(shards):
        r = np.arange(s * per_shard, min(total, (s + 1) * per_shard))
        pd.DataFrame({"url": [link[i] for i in r], "caption": [f"caption {i}" for i in r],
                      "key": [f"{s:05d}{i - s * per_shard:04d}" for i in r],
                      "status": np.where(ok[r], "success", "failed_to_download")}).to_parquet(
            folder / f"{s:05d}.parquet")
    return shards


def rss_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory; getrusage's ru_maxrss would keep the
    parent's peak across fork + exec."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def task(argv: list[str]) -> None:
    """One array task in its own process, as SLURM runs it: `part AT` (step 1) or `finish` (steps 2 and 3).
    Prints {seconds, peak RSS} of this process as JSON."""
    what, run, src, pattern, bucket_rows = argv[:5]
    cfg = resolve([f"run_dir={run}", f"embed.source={src}", "progress=off", f"data.shards={pattern}",
                   f"import.bucket_rows={bucket_rows}"])
    rel, paths = imp.release_of(cfg), imp.expand(cfg.data.shards)
    buckets = imp.bucket_count(sum(p.count for p in rel.parts), int(bucket_rows))
    out, t = {"base_mb": rss_mb("VmRSS")}, time.monotonic()
    if what == "part":
        imp.import_part(cfg, rel, int(argv[5]), paths, buckets)
        out["step1"] = time.monotonic() - t
    else:
        markers = [imp.read_json(imp.part_marker(run, p.name)) for p in rel.parts]
        groups = min(buckets, len(paths))
        out["summary"] = imp.join_buckets(cfg, rel, markers, groups, len(paths))
        out["step2"], t = time.monotonic() - t, time.monotonic()
        out["rows"] = sum(d["n"] for d in imp.write_shards(cfg, rel, markers, paths, groups))
        out["step3"] = time.monotonic() - t
    out["rss_mb"] = rss_mb()
    print(json.dumps(out))


def run_task(*args) -> dict:
    res = subprocess.run([sys.executable, __file__, "--task", *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if res.returncode:
        raise SystemExit(res.stderr[-3000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    if sys.argv[1:2] == ["--task"]:
        return task(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--rows", type=int, default=200000, help="rows per part")
    ap.add_argument("--per-shard", type=int, default=10000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--failed", type=float, default=0.05, help="share of URLs the re-download lacks")
    ap.add_argument("--bucket-rows", type=int, default=2000000)
    ap.add_argument("--total-rows", type=float, default=400e6)
    ap.add_argument("--part-rows", type=float, default=1e6, help="rows per part of the projected release")
    ap.add_argument("--tasks", type=int, default=64)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    total = a.parts * a.rows
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.monotonic()
        write_release(tmp / "src", a.parts, a.rows, a.d, rng)
        shards = write_download(tmp / "shards", total, a.per_shard, a.failed, rng)
        print(f"setup {time.monotonic() - t0:.1f}s", file=sys.stderr)
        common = (tmp / "run", tmp / "src", f"{tmp / 'shards'}/{{00000..{shards - 1:05d}}}.tar", a.bucket_rows)
        parts = [run_task("part", *common, at) for at in range(a.parts)]
        last = run_task("finish", *common)
    step1 = float(np.mean([p["step1"] for p in parts]))
    rates = [a.rows / step1, total / last["step2"], total / last["step3"]]
    buckets = imp.bucket_count(total, a.bucket_rows)
    print(f"import: {a.parts} parts x {a.rows:,} rows (d={a.d}) joined by URL to {shards} re-downloaded shards: "
          f"{last['summary']['joined']:,} joined, {last['summary']['skipped']}; {buckets} buckets of <= "
          f"{a.bucket_rows:,} rows; {last['rows']:,} rows written")
    print(f"  step 1 (bucket + copy features), per part task: {step1:.2f}s = {rates[0]:,.0f} rows/s, "
          f"peak RSS {max(p['rss_mb'] for p in parts):.0f} MB (the interpreter with its imports: "
          f"{parts[0]['base_mb']:.0f} MB)")
    print(f"  step 2 (join, bucket by bucket): {last['step2']:.2f}s = {rates[1]:,.0f} rows/s")
    print(f"  step 3 (write shards, group by group): {last['step3']:.2f}s = {rates[2]:,.0f} rows/s; steps 2+3 "
          f"peak RSS {last['rss_mb']:.0f} MB")
    n_parts = math.ceil(a.total_rows / a.part_rows)
    waves = math.ceil(n_parts / a.tasks)
    step1_min = waves * a.part_rows / rates[0] / 60
    print(f"  projection, {a.total_rows:,.0f} rows in {n_parts} parts: step 1 {step1_min:.0f} min on {a.tasks} tasks "
          f"({n_parts * a.part_rows / rates[0] / 3600:.1f} task-hours); steps 2+3 in the last task "
          f"{a.total_rows * (1 / rates[1] + 1 / rates[2]) / 3600:.1f} h")


if __name__ == "__main__":
    main()
