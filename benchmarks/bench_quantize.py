"""Compact codes, measured (docs/benchmarks.md "Compact codes"):

- `map`: mAP@K of PQ, OPQ+PQ and SCQ at 16/32/64 bits side by side (4-bit codebooks; 8-bit where the budget
  allows) on scikit-learn digits: pixel features (L2-normalised 64-d), codes learnt on a random half of the
  1797 images, scored all-against-all on the other half (mAP@K, K = gallery size - 1 capped at 1000).
  SCQ's two views are the same digit shifted by up to one pixel.
  SCQ twice: from OPQ (quantize.scq.init=opq, the default) and from scratch (init=random, the authors' lr).
- `ablation`: SCQ's instance-contrastive weights (embedding and quantised) at 0 (the authors' release) and
  at 0.5, same data, every budget (the default init).
- `projected` (issue 23): what "SCQ beats OPQ" rests on. Per seed (the digits split, SCQ's init order and
  views all drawn from it), at 16/32/64 bits with 4-bit codebooks: OPQ+PQ and float search on the pixel
  features; SCQ (the default, from OPQ) scored by faiss' squared ADC and by the authors' plain ADC
  (quantize.scq.adc=plain); and, on SCQ's own learnt projection of the same images (L2-normalised), float
  search and OPQ+PQ trained there. Then the mean and spread over the seeds.
- `views` (issue 23): SCQ (the default, from OPQ) trained on cached features of V shifted views per digit,
  V = 2 (quantize.views' default) and 100 (more than the 2 x 50 epochs draw: practically fresh views every
  epoch, as the authors' loader augments), `--view-counts`, at `--view-bits` with 4-bit codebooks.
- `speed`: ADC code search (PQ 8x4 = 32 bits, PQ 16x8 = 128 bits, IVF-PQ) against faiss flat float search
  over 1M random 256-d vectors: ms per query (a batch of 100 queries) and bytes per vector.

    python benchmarks/bench_quantize.py [--parts map,ablation,projected,views,speed] [--nbits 4,8] [--seeds 0,1,2]
"""
from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
import torch

from evaluation import metrics
from evaluation.quantize import baselines, scq
from evaluation.quantize.pairs import ViewPairs
from evaluation.retrieval_sets import RetrievalSet, Split
from unicom_ds.arrays import normalize


def digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    d = load_digits()
    order = np.random.default_rng(seed).permutation(len(d.target))
    half = len(order) // 2
    return d.images[order[:half]], d.images[order[half:]], d.target[order[half:]]


def shifted_views(images: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """[count, n, 64]: each 8x8 digit moved by up to one pixel (zero filled), a view per draw."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        moved = np.zeros_like(images)
        for i, (dy, dx) in enumerate(rng.integers(-1, 2, (len(images), 2))):
            moved[i] = np.roll(np.roll(images[i], dy, 0), dx, 1)
        out.append(normalize(moved.reshape(len(images), -1).astype(np.float32)))
    return np.stack(out)


SCQ_MAX_STEPS: int | None = None  # --scq-max-steps: stop every SCQ head early (a quick check of the script)


def train_scq(views: np.ndarray, train: np.ndarray, over: dict, books: int, nbits: int,
              seed: int = 0) -> torch.nn.Module:
    """An SCQ head trained as stage=quantize does (the Trainer, one process), quantize.scq keys `over`ridden."""
    import tempfile
    from pathlib import Path

    from evaluation.quantize import job
    from unicom_ds import config
    if SCQ_MAX_STEPS is not None:
        over = {**over, "max_steps": SCQ_MAX_STEPS}
    with tempfile.TemporaryDirectory() as run:
        cfg = config.resolve(["stage=quantize", f"run_dir={run}", "device=cpu", f"seed={seed}",
                              *(f"quantize.scq.{k}={v}" for k, v in over.items())])
        return job.train_scq(cfg, ViewPairs(views), books, nbits, Path(run) / "quantize" / "scq", train)[0]


def run_map(budgets, nbits_list, ablation: bool) -> None:
    train_img, test_img, labels = digits_split()
    train = normalize(train_img.reshape(len(train_img), -1).astype(np.float32))
    test = normalize(test_img.reshape(len(test_img), -1).astype(np.float32))
    views = shifted_views(train_img, 4)
    ds = RetrievalSet("digits", [str(i) for i in range(len(test))], labels, (1,), {"": Split(np.arange(len(test)))})
    k = min(1000, len(test) - 1)
    flat = metrics.evaluate(test, ds, "cpu", map_k=k)
    print(f"digits: train {len(train)}, test {len(test)}; float (64 x 32 bits) mAP@{k} {100 * flat[f'mAP@{k}']:.1f}")
    variants = {"scq (from OPQ, the default)": {},
                "scq (from scratch, the authors')": dict(init="random", lr=5e-4)} if not ablation else {
        "scq ic=0": dict(w_ic_embedding=0.0, w_ic_quantised=0.0),
        "scq ic=0.5": dict(w_ic_embedding=0.5, w_ic_quantised=0.5)}
    methods = [] if ablation else ["pq", "opq"]
    print("| method | codebooks | " + " | ".join(f"{b} bits" for b in budgets) + " |")
    print("|---|---|" + "---:|" * len(budgets))
    for nbits in nbits_list:
        for name in [*methods, *variants]:
            cells = []
            for bits in budgets:
                if bits % nbits or 64 % (bits // nbits):
                    cells.append("–")
                    continue
                start = time.time()
                if name in variants:
                    head = train_scq(views, train, variants[name], bits // nbits, nbits)
                    search = scq.searcher(head)
                else:
                    search = baselines.searcher(baselines.train(name, train, bits, nbits))
                got = metrics.evaluate(test, ds, "cpu", search=search, map_k=k)[f"mAP@{k}"]
                cells.append(f"{100 * got:.1f}")
                print(f"  {name} {bits} bits {nbits}-bit: {100 * got:.1f} ({time.time() - start:.0f}s)", flush=True)
            print(f"| {name} | {nbits}-bit | " + " | ".join(cells) + " |", flush=True)


def run_projected(budgets, seeds) -> None:
    rows: dict[str, dict[int, list[float]]] = {}

    def add(name, bits, value):
        rows.setdefault(name, {}).setdefault(bits, []).append(100 * value)

    for seed in seeds:
        train_img, test_img, labels = digits_split(seed)
        train = normalize(train_img.reshape(len(train_img), -1).astype(np.float32))
        test = normalize(test_img.reshape(len(test_img), -1).astype(np.float32))
        views = shifted_views(train_img, 4, seed)
        ds = RetrievalSet("digits", [str(i) for i in range(len(test))], labels, (1,), {"": Split(np.arange(len(test)))})
        k = min(1000, len(test) - 1)
        score = lambda x, search=None: metrics.evaluate(x, ds, "cpu", search=search, map_k=k)[f"mAP@{k}"]  # noqa: E731
        for bits in budgets:
            start = time.time()
            add("float, pixel features", bits, score(test))
            add("OPQ+PQ, pixel features", bits, score(test, baselines.searcher(baselines.train("opq", train, bits, 4))))
            head = train_scq(views, train, {}, bits // 4, 4, seed)
            add("SCQ (from OPQ), squared ADC (default)", bits, score(test, scq.searcher(head)))
            add("SCQ (from OPQ), plain ADC (the authors')", bits, score(test, scq.searcher(head, "plain")))
            p_train, p_test = normalize(scq.embed(head, train)), normalize(scq.embed(head, test))
            add("float, SCQ's projection", bits, score(p_test))
            add("OPQ+PQ, SCQ's projection", bits, score(p_test, baselines.searcher(baselines.train("opq", p_train, bits, 4))))
            print(f"  seed {seed}, {bits} bits: " + ", ".join(f"{n} {v[bits][-1]:.1f}" for n, v in rows.items())
                  + f" ({time.time() - start:.0f}s)", flush=True)
    print(f"digits, 4-bit codebooks, mAP@K, mean ± std over seeds {list(seeds)}")
    print("| method | " + " | ".join(f"{b} bits" for b in budgets) + " |\n|---|" + "---:|" * len(budgets))
    for name, by_bits in rows.items():
        print(f"| {name} | " + " | ".join(f"{np.mean(by_bits[b]):.1f} ± {np.std(by_bits[b]):.1f}" for b in budgets)
              + " |")


def run_views(budgets, counts) -> None:
    train_img, test_img, labels = digits_split()
    train = normalize(train_img.reshape(len(train_img), -1).astype(np.float32))
    test = normalize(test_img.reshape(len(test_img), -1).astype(np.float32))
    ds = RetrievalSet("digits", [str(i) for i in range(len(test))], labels, (1,), {"": Split(np.arange(len(test)))})
    k = min(1000, len(test) - 1)
    print("| cached views per image | " + " | ".join(f"{b} bits" for b in budgets) + " |\n|---|" + "---:|" * len(budgets))
    for count in counts:
        views = shifted_views(train_img, count)
        cells = []
        for bits in budgets:
            head = train_scq(views, train, {}, bits // 4, 4)
            cells.append(f"{100 * metrics.evaluate(test, ds, 'cpu', search=scq.searcher(head), map_k=k)[f'mAP@{k}']:.1f}")
        print(f"| {count} | " + " | ".join(cells) + " |", flush=True)


def run_speed(n: int, d: int, queries: int) -> None:
    rng = np.random.default_rng(0)
    x = normalize(rng.standard_normal((n, d)).astype(np.float32))
    q = normalize(rng.standard_normal((queries, d)).astype(np.float32))
    sample = x[rng.choice(n, min(n, 50_000), replace=False)]
    flat = faiss.IndexFlatIP(d)
    flat.add(x)
    rows = [("flat float", 4 * d, baselines.ms_per_query(flat, q, 10))]
    _, exact = flat.search(q, 10)
    for method, bits, nbits in (("pq", 32, 4), ("pq", 128, 8), ("ivfpq", 128, 8)):
        start = time.time()
        index = baselines.filled(baselines.train(method, sample, bits, nbits, nlist=1024), x)
        build = time.time() - start
        if method == "ivfpq":
            for p, r in baselines.nprobe_sweep(index, q, exact, [1, 8, 32]).items():
                rows.append((f"IVF1024,PQ{bits // nbits}x{nbits} nprobe {p} (recall@10 {r['recall']:.2f})",
                             baselines.code_bytes(index), r["ms_per_query"]))
            continue
        _, ids = index.search(q, 10)
        rows.append((f"PQ{bits // nbits}x{nbits} (recall@10 {baselines.neighbour_recall(ids, exact):.2f}, "
                     f"built in {build:.0f}s)", baselines.code_bytes(index), baselines.ms_per_query(index, q, 10)))
    print(f"{n} random {d}-d vectors, {queries} queries, top 10, {faiss.omp_get_max_threads()} thread(s)")
    print("| index | bytes/vector | ms/query |\n|---|---:|---:|")
    for name, size, ms in rows:
        print(f"| {name} | {size} | {ms:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="map,ablation,speed")
    ap.add_argument("--threads", type=int, default=1, help="faiss and torch threads (1 on a shared machine)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--nbits", default="4,8", help="codebook sizes of the map part")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the projected part")
    ap.add_argument("--view-counts", default="2,100", help="cached views per image of the views part")
    ap.add_argument("--view-bits", default="16,64", help="budgets of the views part")
    ap.add_argument("--budgets", default="16,32,64", help="code budgets in bits of the map, ablation and projected parts")
    ap.add_argument("--scq-max-steps", type=int, default=None,
                    help="stop every SCQ head after this many steps (quantize.scq.max_steps; a quick check only)")
    args = ap.parse_args()
    global SCQ_MAX_STEPS
    SCQ_MAX_STEPS = args.scq_max_steps
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    budgets = tuple(int(b) for b in args.budgets.split(","))
    if "map" in parts:
        run_map(budgets, tuple(int(b) for b in args.nbits.split(",")), ablation=False)
    if "ablation" in parts:
        run_map(budgets, (4,), ablation=True)
    if "projected" in parts:
        run_projected(budgets, tuple(int(x) for x in args.seeds.split(",")))
    if "views" in parts:
        run_views(tuple(int(b) for b in args.view_bits.split(",")), tuple(int(c) for c in args.view_counts.split(",")))
    if "speed" in parts:
        run_speed(args.n, args.d, 100)


if __name__ == "__main__":
    main()
