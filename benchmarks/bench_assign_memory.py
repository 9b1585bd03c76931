"""Assign's peak memory and speed against the rows of a task and against top-l.

    python benchmarks/bench_assign_memory.py --shards 4 40 --rows 10000 --k 16384 --d 512 --top-l 8
    python benchmarks/bench_assign_memory.py --shards 4 --top-l 1 8 --search exact ivf --rounds 2

Each case writes a run directory of --shards embedded shards (--rows rows each, float16 image and text features,
written as the embed stage does) and --k centroids, then runs the assign job function in a fresh process
(assign.search, assign.top_l) and reports its peak RSS (ru_maxrss) and rows/s. Labels are computed shard by
shard, so the peak should not grow with the shards of a task. Several --top-l and --search values run side by
side on the same run directory, in --rounds alternating rounds (MLCD's top-l against Unicom's top-1).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

TASK = """
import json, resource, sys, time
from cluster_job import assign
from unicom_ds.config import resolve, select
run, k, l, stems, search = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(","), sys.argv[5]
cfg = select(resolve([f"run_dir={run}", "clip.model=ViT-Tiny-16", "clip.pretrained=random", f"kmeans.k={k}",
                      f"assign.search={search}", f"assign.top_l={l}", "assign.gpu=false", "progress=off"]))
start = time.monotonic()
assign.assign_shards(cfg, stems)
print(json.dumps({"seconds": time.monotonic() - start,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_run(run: Path, shards: int, rows: int, k: int, d: int) -> list[str]:
    from embed_fixtures import write_embedded
    from unicom_ds.atomic import write_json_atomic

    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((k, d)).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    (run / "kmeans").mkdir(parents=True)
    np.save(run / "kmeans" / "centroids.npy", centroids)
    write_json_atomic(run / "kmeans" / "summary.json", {"k": k, "d": d, "mode": "joint", "config": {}})
    stems = [f"{i:05d}" for i in range(shards)]
    for stem in stems:
        x = centroids[rng.integers(0, k, rows)] + 0.5 * rng.standard_normal((rows, d)).astype(np.float32) / np.sqrt(d)
        write_embedded(run, stem, x, x)
    return stems


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, nargs="+", default=[4, 40])
    ap.add_argument("--rows", type=int, default=10000)
    ap.add_argument("--k", type=int, default=16384)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--top-l", type=int, nargs="+", default=[8])
    ap.add_argument("--search", nargs="+", default=["ivf"], choices=["ivf", "exact"])
    ap.add_argument("--rounds", type=int, default=1)
    a = ap.parse_args(argv)
    out = []
    for shards in a.shards:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            stems = make_run(run, shards, a.rows, a.k, a.d)
            for rnd in range(a.rounds):
                for search in a.search:
                    for l in a.top_l:
                        shutil.rmtree(run / "labels", ignore_errors=True)  # each case labels afresh
                        proc = subprocess.run([sys.executable, "-c", TASK, str(run), str(a.k), str(l),
                                               ",".join(stems), search], cwd=REPO, capture_output=True, text=True,
                                              check=True)
                        res = json.loads(proc.stdout.strip().splitlines()[-1])
                        row = {"round": rnd, "shards": shards, "rows": shards * a.rows, "k": a.k, "d": a.d,
                               "search": search, "top_l": l, "peak_rss_mb": round(res["peak_rss_mb"]),
                               "rows_per_s": round(shards * a.rows / res["seconds"])}
                        print(json.dumps(row), flush=True)
                        out.append(row)
    return out


if __name__ == "__main__":
    main()
