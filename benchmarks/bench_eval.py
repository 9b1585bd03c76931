"""Evaluation speed: feature extraction vs the bare forward pass, and kNN evaluation vs bare faiss.

1. Feature extraction (`evaluation.features.extract`: JPEG decoding, the model's preprocess, a
   DataLoader, autocast on CUDA) in images/s, against the same model's forward-only images/s on
   ready-made tensors. Model: the official Unicom architecture (random init), `--model`.
2. kNN evaluation (`evaluation.metrics.evaluate` on a single set: the official protocol's exact L2 search of
   the normalised features with self excluded, Recall@K and MAP@R) on `--knn-n` x `--knn-d` random features,
   against calling faiss directly (IndexFlatL2 of the normalised rows, add, search with the same k).
   Target: ratio <= 1.1.

    python benchmarks/bench_eval.py --device cuda                       # 100k x 512, ViT-B/32
    python benchmarks/bench_eval.py --device cpu --knn-n 20000 --images 64
    python benchmarks/bench_eval.py --device cpu --skip extract --knn-n 20000 --rounds 3   # alternating, medians
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch
from PIL import Image

from evaluation import features, metrics
from evaluation.retrieval_sets import RetrievalSet, Split
from unicom_ds import unicom_vit
from unicom_ds.arrays import torch_device
from unicom_ds.loading import clip_transform


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_extraction(args, device: torch.device) -> dict:
    model = unicom_vit.build(args.model).to(device)
    preprocess = clip_transform(model.image_size)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.images):  # photo-sized JPEGs, so decoding and resizing cost what they do
            path = Path(tmp) / f"{i:05d}.jpg"
            Image.fromarray(rng.integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(str(path))
        images = features.ImageFiles(paths, preprocess)
        features.extract(model, features.ImageFiles(paths[:args.batch_size], preprocess), args.batch_size,
                         args.workers, str(device), progress_mode="off")  # warm-up
        sync(device)
        start = time.perf_counter()
        features.extract(model, images, args.batch_size, args.workers, str(device), progress_mode="off")
        sync(device)
        extract_s = time.perf_counter() - start

    batch = torch.randn(args.batch_size, 3, model.image_size, model.image_size, device=device)
    steps = max(1, args.images // args.batch_size)
    with torch.no_grad(), features._autocast(device):
        model(batch)
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            model(batch)
        sync(device)
    forward_s = time.perf_counter() - start
    return {"extract_img_s": args.images / extract_s, "forward_img_s": steps * args.batch_size / forward_s}


def bench_knn(args, device: str) -> dict:
    rng = np.random.default_rng(0)
    n, d = args.knn_n, args.knn_d
    classes = n // args.per_class
    labels = rng.integers(0, classes, n)
    centres = 0.25 * rng.normal(size=(classes, d)).astype(np.float32)
    x = metrics.normalize(rng.normal(size=(n, d)).astype(np.float32) + centres[labels])  # clustered, like features
    ks = tuple(int(k) for k in args.ks.split(","))
    ds = RetrievalSet("bench", [""] * n, labels, ks, {"": Split(np.arange(n))})
    warm = RetrievalSet("warm", [""] * 2000, labels[:2000], ks, {"": Split(np.arange(2000))})
    metrics.evaluate(x[:2000], warm, device)  # GPU resources and BLAS threads start up here

    r_max = int(np.bincount(labels).max()) - 1
    k = max(max(ks), r_max) + 1  # the same search: top k plus the query itself
    ours, direct, ours_cpu, direct_cpu = [], [], [], []
    for _ in range(args.rounds):  # alternating, so that a change of load on a shared machine hits both
        start, cpu = time.perf_counter(), time.process_time()
        result = metrics.evaluate(x, ds, device)
        ours.append(time.perf_counter() - start)
        ours_cpu.append(time.process_time() - cpu)

        start, cpu = time.perf_counter(), time.process_time()
        unit = metrics.normalize(x)  # evaluate's labelled-set protocol: L2 on normalised (truncated) rows
        index = metrics._index(d, device, k, "l2")
        index.add(unit)
        index.search(unit, k)
        direct.append(time.perf_counter() - start)
        direct_cpu.append(time.process_time() - cpu)
    ratios = [a / b for a, b in zip(ours, direct)]
    cpu_ratios = [a / b for a, b in zip(ours_cpu, direct_cpu)]
    return {"evaluate_s": float(np.median(ours)), "faiss_s": float(np.median(direct)),
            "ratio": float(np.median(ratios)), "ratios": [round(r, 3) for r in ratios],
            "cpu_ratio": float(np.median(cpu_ratios)), "cpu_ratios": [round(r, 3) for r in cpu_ratios], "k": k,
            "R@1": result[f"R@{ks[0]}"], "faiss_gpu": metrics.use_gpu(device, faiss.get_num_gpus(), k)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--model", default="ViT-B/32", help="Unicom architecture for the extraction benchmark")
    p.add_argument("--images", type=int, default=2048, help="images extracted")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--knn-n", type=int, default=100_000)
    p.add_argument("--knn-d", type=int, default=512)
    p.add_argument("--per-class", type=int, default=10, help="mean images per class in the kNN set")
    p.add_argument("--ks", default="1,10,100,1000", help="Recall@K (SOP's by default)")
    p.add_argument("--skip", choices=["extract", "knn"], help="leave one benchmark out")
    p.add_argument("--rounds", type=int, default=1, help="kNN: alternating rounds of evaluate and faiss (medians)")
    p.add_argument("--threads", type=int, default=0, help="torch and faiss CPU threads (0: their defaults)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    device = torch_device(args.device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"torch threads {torch.get_num_threads()}, faiss GPUs {faiss.get_num_gpus()}")
    if args.skip != "extract":
        r = bench_extraction(args, device)
        print(f"extraction {args.model} {args.images} images, batch {args.batch_size}, {args.workers} workers: "
              f"extract {r['extract_img_s']:.1f} img/s, forward only {r['forward_img_s']:.1f} img/s "
              f"({r['extract_img_s'] / r['forward_img_s']:.2f}x)")
    if args.skip != "knn":
        r = bench_knn(args, args.device)
        print(f"kNN evaluation {args.knn_n} x {args.knn_d}, k={r['k']}, faiss GPU {r['faiss_gpu']}: "
              f"evaluate {r['evaluate_s']:.2f} s, faiss direct {r['faiss_s']:.2f} s, ratio {r['ratio']:.3f} "
              f"(R@1 {r['R@1']:.3f}); process CPU time ratio {r['cpu_ratio']:.3f}"
              + (f"; medians of {args.rounds} rounds, ratios {r['ratios']}, CPU time ratios {r['cpu_ratios']}"
                 if args.rounds > 1 else ""))


if __name__ == "__main__":
    main()
