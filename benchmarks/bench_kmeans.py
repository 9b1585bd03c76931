"""K-means + assign stage vs faiss called directly, and k-means peak memory vs data size.

    python benchmarks/bench_kmeans.py time --shards 8 --rows 25000 --d 256 --k 1000 --mppc 64 [--rounds 3]
    python benchmarks/bench_kmeans.py rss  --rows 20000 --d 256 --k 100 --mppc 200
    (add --gpu true on a GPU machine with faiss-gpu)

time: synthetic embedded shards (float16, unit rows, a mixture of directions) in a temporary RUN;
the stage (run_kmeans + assign_shards over all shards) against faiss.Kmeans on the same sample
already in RAM plus one IndexFlatIP search over all rows in RAM (target: stage <= 1.1 x direct).
rss: one subprocess per data size (1x and 10x the training sample k * mppc), each running run_kmeans
and reporting its peak RSS (target: flat).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from cluster_job import assign, features, kmeans
from unicom_ds.atomic import write_json_atomic
from unicom_ds.config import resolve, select


CLIP = ["clip.model=ViT-B-32", "clip.pretrained=random"]  # what the shards' done.json say made them


def write_shards(run_dir: Path, shards: int, rows: int, d: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((512, d)).astype(np.float32)
    out = run_dir / "embed"
    out.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        stem = f"{s:05d}"
        base = centers[rng.integers(0, len(centers), rows)]
        for side in ("img", "txt"):
            x = base + 0.5 * rng.standard_normal((rows, d), dtype=np.float32)
            np.save(out / f"{stem}.{side}.npy", features.normalize(x).astype(np.float16))
        (out / f"{stem}.keys.txt").write_text("".join(f"{stem}{i:06d}\n" for i in range(rows)))
        write_json_atomic(out / f"{stem}.done.json", {"n": rows, "skipped": {}, "damaged": None, "config": {
            **features.embed_identity(resolve(CLIP + [f"run_dir={run_dir}"])), "data.shard": f"{stem}.tar"}})


def cfg_for(run_dir: Path, a) -> dict:
    return select(resolve([f"run_dir={run_dir}", *CLIP, f"kmeans.k={a.k}", f"kmeans.max_points_per_centroid={a.mppc}", f"kmeans.niter={a.niter}",
                           f"kmeans.gpu={a.gpu}", f"assign.gpu={a.gpu}", "kmeans.two_level=false", "progress=off"]))


def bench_time(a) -> None:
    run_dir = Path(tempfile.mkdtemp(prefix="bench_kmeans_"))
    write_shards(run_dir, a.shards, a.rows, a.d)
    cfg = cfg_for(run_dir, a)
    stems = features.embedded_stems(str(run_dir))
    t = time.perf_counter()
    import matplotlib.pyplot  # noqa: F401  one-off imports of the summary (PNG, TensorBoard), reported apart
    import unicom_ds.tblog  # noqa: F401
    imports = time.perf_counter() - t
    gpu = kmeans.use_gpu(a.gpu)
    rows = []
    for _ in range(a.rounds):  # alternating, so that a change of load on a shared machine hits both
        for made in ("kmeans", "labels", "tensorboard"):  # the stage skips what it finds done
            shutil.rmtree(run_dir / made, ignore_errors=True)
        t0 = time.perf_counter()
        summary = kmeans.run_kmeans(cfg)
        t1 = time.perf_counter()
        assign.assign_shards(cfg, stems)
        t2 = time.perf_counter()

        # Direct: the embedded arrays already in RAM; the joint feature, faiss k-means with the same
        # parameters on a same-size sample, one search of every row.
        img = np.concatenate([np.load(run_dir / "embed" / f"{s}.img.npy") for s in stems])
        txt = np.concatenate([np.load(run_dir / "embed" / f"{s}.txt.npy") for s in stems])
        t3 = time.perf_counter()
        pick = np.sort(np.random.default_rng(0).choice(len(img), summary["points_used"], replace=False))
        x = features.joint(img[pick], txt[pick])
        km = faiss.Kmeans(a.d, a.k, niter=a.niter, seed=0, spherical=True, max_points_per_centroid=a.mppc,
                          min_points_per_centroid=1, gpu=gpu or False, init_method=kmeans.init_method("afkmc2"))
        km.train(x)
        t4 = time.perf_counter()
        index = kmeans.search_index(km.centroids, gpu)
        index.search(features.joint(img, txt), 1)
        t5 = time.perf_counter()
        rows.append((t1 - t0, t2 - t1, t4 - t3, t5 - t4, summary, km))

    print(f"\n{a.shards} shards x {a.rows} rows, d={a.d}, k={a.k}, sample={summary['points_used']}, "
          f"niter={a.niter}, {'%d GPU' % gpu if gpu else 'CPU'}, faiss threads={faiss.omp_get_max_threads()}\n")
    print("| round | step | stage (s) | faiss direct (s) |\n| --- | --- | --- | --- |")
    ratios = []
    for r, (km_s, as_s, km_d, as_d, summary, km) in enumerate(rows):
        print(f"| {r} | k-means | {km_s:.2f} | {km_d:.2f} |")
        print(f"| {r} | k-means iterations, objective | {summary['iterations']}, {summary['objective']:.1f} | "
              f"{len(km.obj)}, {km.obj[-1]:.1f} |")
        print(f"| {r} | assign | {as_s:.2f} | {as_d:.2f} |")
        print(f"| {r} | total | {km_s + as_s:.2f} | {km_d + as_d:.2f} |")
        ratios.append((km_s + as_s) / (km_d + as_d))
        print(f"| {r} | ratio stage / direct (target <= 1.1) | {ratios[-1]:.2f} | |")
    if len(ratios) > 1:
        print(f"| all | median ratio stage / direct of {len(ratios)} rounds | {float(np.median(ratios)):.2f} | |")
    print(f"| | one-off imports of the summary (matplotlib, torch TensorBoard), not in the ratio | {imports:.2f} | |")


def child_rss(run_dir: str, a) -> None:
    kmeans.run_kmeans(cfg_for(Path(run_dir), a))
    print(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_rss(a) -> None:
    sample = a.k * a.mppc
    print(f"\nrun_kmeans peak RSS, d={a.d}, k={a.k}, sample k*mppc={sample} rows, shards of {a.rows} rows\n")
    print("| embedded rows | x sample | embedding files (MB) | peak RSS (MB) |\n| --- | --- | --- | --- |")
    for mult in (1, 10):
        run_dir = Path(tempfile.mkdtemp(prefix="bench_rss_"))
        write_shards(run_dir, max(1, sample * mult // a.rows), a.rows, a.d)
        size_mb = sum(p.stat().st_size for p in (run_dir / "embed").glob("*.npy")) / 2 ** 20
        cmd = [sys.executable, __file__, "child", str(run_dir), f"--k={a.k}", f"--mppc={a.mppc}", f"--d={a.d}",
               f"--niter={a.niter}", f"--gpu={a.gpu}"]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        rows = features.row_counts(str(run_dir), features.embedded_stems(str(run_dir))).sum()
        print(f"| {rows} | {rows / sample:.0f} | {size_mb:.0f} | {json.loads(out)['maxrss_mb']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["time", "rss", "child"])
    ap.add_argument("run_dir", nargs="?", help="child only")
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--rows", type=int, default=25000, help="rows per shard")
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--mppc", type=int, default=64, help="kmeans.max_points_per_centroid")
    ap.add_argument("--niter", type=int, default=20)
    ap.add_argument("--gpu", default="false", help="kmeans.gpu / assign.gpu: auto | true | false")
    ap.add_argument("--rounds", type=int, default=1, help="time: alternating rounds of the stage and faiss")
    a = ap.parse_args()
    {"time": bench_time, "rss": bench_rss}.get(a.what, lambda a: child_rss(a.run_dir, a))(a)


if __name__ == "__main__":
    main()
