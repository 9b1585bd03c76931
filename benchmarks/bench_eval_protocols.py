"""What the official Unicom scoring changes against this project's earlier protocols, on a finished run's
cached eval features (RUN/eval/features/run/, written by the eval stage; `./demo.sh` makes one).

1. Truncated dimensions (Fig. 1a): Recall@1 and MAP@R on SOP at each dimension, official (normalise, cut,
   Euclidean, no re-normalisation) against re-normalised prefixes.
2. GLDv2-style mAP@100 on raw dot products (official) against cosine similarity. The demo has no GLDv2, so
   its SOP features stand in: every 5th image a query, the rest the index, relevant = same class.
3. Linear probe on EuroSAT: CLIP's C sweep against the official example's fixed C = 0.601.

    python benchmarks/bench_eval_protocols.py --run runs/demo
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from evaluation import metrics, probe_sets, retrieval_sets
from evaluation.linear_probe import linear_probe
from evaluation.retrieval_sets import RetrievalSet, Split
from omegaconf import OmegaConf


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/demo")
    ap.add_argument("--data-root", default=None, help="default: the run's eval.data_root")
    args = ap.parse_args()
    start = time.perf_counter()
    cfg = OmegaConf.load(Path(args.run) / "config.yaml")
    data_root = Path(args.data_root or str(cfg.eval.data_root))
    feats = Path(args.run) / "eval" / "features" / "run"

    sop = retrieval_sets.read("sop", data_root / "sop")
    x = np.load(feats / "sop.npy")
    print(f"SOP: {len(x)} images, {x.shape[1]}-d features of {args.run}")
    print("| dim | R@1 official | R@1 re-normalised | MAP@R official | MAP@R re-normalised |")
    for dim in sorted({x.shape[1], 32, 16, 8, 4}, reverse=True):
        a = metrics.evaluate(x, sop, "cpu", dim=dim)
        b = metrics.evaluate(x, sop, "cpu", dim=dim, renormalize=True)
        print(f"| {dim} | {100 * a['R@1']:.1f} | {100 * b['R@1']:.1f} | {100 * a['MAP@R']:.1f} | "
              f"{100 * b['MAP@R']:.1f} |")

    rows = np.arange(len(x))
    query, index = rows[::5], np.setdiff1d(rows, rows[::5])
    relevant = [index[sop.labels[index] == sop.labels[q]] for q in query]
    keep = [i for i, r in enumerate(relevant) if len(r)]
    as_gld = RetrievalSet("gldv2", sop.paths, sop.labels, (),
                          {"sop-as-gldv2": Split(query[keep], index, [relevant[i] for i in keep])})
    raw = metrics.evaluate(x, as_gld, "cpu")["sop-as-gldv2/mAP@100"]
    cos = metrics.evaluate(x, as_gld, "cpu", cosine=True)["sop-as-gldv2/mAP@100"]
    norms = np.linalg.norm(x, axis=1)
    print(f"GLDv2-style mAP@100 on SOP ({len(keep)} queries, feature norms {norms.min():.2f}..{norms.max():.2f}): "
          f"raw dot products {100 * raw:.1f}, cosine {100 * cos:.1f}")

    ps = probe_sets.load("eurosat", data_root, seed=int(cfg.seed))
    tr, te = np.load(feats / "eurosat.train.npy"), np.load(feats / "eurosat.test.npy")
    out = linear_probe(tr, ps.train.labels, te, ps.test.labels, metric=ps.metric,
                       max_iter=int(cfg.eval.probe.max_iter), seed=int(cfg.seed), fixed_c=0.601)
    print(f"EuroSAT probe ({len(tr)} train, {len(te)} test): CLIP sweep {100 * out[ps.metric]:.1f} "
          f"(C={out['C']:.3g}), fixed C=0.601 {100 * out['fixed_c/' + ps.metric]:.1f}")
    print(f"{time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
