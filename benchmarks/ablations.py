"""Does training with this repository behave like the paper's? The ablations of Unicom (Tab. 5, 6, 8) and MLCD,
each a run of the real pipeline (cluster -> train -> eval through slurm/submit.py, launcher=local), several seeds,
at a scale a 2-core machine runs in an hour. Writes docs/ablations.md and its plots.

    python benchmarks/ablations.py                      # the suite: every table, 3 seeds, 51 runs (docs/benchmarks.md)
    python benchmarks/ablations.py --tiny --only r1 --out /tmp/abl --doc /tmp/abl/ablations.md   # 4 tiny runs, ~2 min

Finished runs are kept under --out and skipped by a rerun, which then only rewrites the report.

The data (benchmarks/ablation_data.py) and how it maps onto the paper's setting:
- LAION's image-text pairs -> 3,000 images of 64 x 64, each two scikit-learn digits side by side on one of 4
  background styles, and a caption. The concept of an image, what the downstream sets ask about, is the ordered
  digit pair (100 concepts); the background is visible but no part of it. The caption names the two digits
  (each wrong 10% of the time, as web alt-text is) and one of 10 sources the image does not show. So captions
  carry what images do not (the source; the digit's name where its shape is ambiguous), and images carry what
  captions do not (the background; the true digit where the caption names a wrong one).
- CLIP's image and text features -> a clip-retrieval release replica (tests/release_fixtures.py) that the cluster
  stage imports (`embed.source`, joined by URL), as a user clusters LAION's released embeddings. Nothing can be
  downloaded, and a random-init CLIP's features say nothing, so the two towers are stand-ins in one shared
  space, as CLIP's are aligned: the image side is what a digit recogniser (logistic regression on the pixels,
  fit on 300 labelled digits, about 95% right) sees in each half, as class probabilities over the digit
  directions, plus the background style (weight 0.7); the text side is the caption's words: the two named
  digits plus the source (weight 0.7). Both nuisances weigh the same; the image side is the less decisive one
  (a recogniser's spread probabilities against named digits), which is Tab. 5's premise, that CLIP's text
  features cluster more semantically than its image features. The measured label purities are in the tables.
- The 1M pseudo classes -> k-means at k = 100 (the number of concepts) by default, the other k for Tab. 5.
  LAION's 400 images per class are out of reach (3,000 images); what the cluster number trades, classes merged
  below the number of concepts and split above it, is kept.
- Downstream sets -> held-out digits (597 of the 1,797 never appear in training images) composed the same way:
  a retrieval set in SOP's layout (2,000 images, 20 per pair; Recall@1, and at 32, 16, 8 of the 64 dimensions
  for Tab. 6's compact features, the official protocol) and a linear-probe set in EuroSAT's layout (2,700 images,
  27 per pair, of which EuroSAT's split takes 1,000 to train and 500 to test; CLIP's C sweep), read by the eval
  stage's own readers.
- The model and recipe -> ViT-Tiny-16 from scratch on 2 DeepSpeed ranks (gloo), global batch 32, 3 epochs (279
  steps), the settings tests/test_mlcd_learns.py found to learn at this size (lr 2e-3, scale 16, margin 0.1, crops
  of at least 60% of the image, no flips: a flip swaps the digits), r1 = 0.1 as the paper. One recipe for every
  variant: each changes only the key its row names (no tuning per variant).
- Tab. 8's CLIP init -> no CLIP can be had offline. Stand-in: a backbone pre-trained by the pipeline on another
  draw of the same kind of collection (`other`), supervised by its captions (text-side clusters, as CLIP learns
  from captions), with the base recipe; then continued (`train.continue_from`) on this collection's own joint
  clusters with the scratch run's recipe. The stand-in's prototypes stay frozen at their random start
  (`train.prototype_lr_mult=0`), so the continuation, which carries them over, starts with random prototypes as
  the paper's CLIP init does: only the backbone's starting weights differ from the scratch run.
- MLCD -> `loss.kind=mlcd` over each image's l nearest centres (`assign.top_l`); the paper's l = 1 row is
  Unicom's single-label loss here, as the pipeline's MLCD loss needs assign.top_l >= 2.
Seed s draws the data (digits split, captions, features, eval images), k-means and the training.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread a process: 2 ranks on 2 cores (as demo.sh)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from benchmarks.ablation_data import World, make_world  # noqa: E402

SCALES = {  # full: the suite; tiny: the test's smoke run (numbers mean nothing there)
    "full": dict(n=3000, shards=4, epochs=3, seeds=3, retrieval=20, probe=27, k=(25, 100, 400, 1600)),
    "tiny": dict(n=320, shards=2, epochs=1, seeds=1, retrieval=2, probe=6, k=(25, 100, 160)),
}
BATCH, MICRO = 32, 16
CLUSTER = {"kmeans.k": 100, "kmeans.mode": "joint", "kmeans.init": "kmeans++", "assign.top_l": 1}
TRAIN = {"model": "ViT-Tiny-16", "train.lr": 2e-3, "train.warmup_epochs": 0.1, "train.precision": "fp32",
         "train.workers": 1, "train.local_processes": 2, "train.ckpt_every_steps": 100000, "train.log_every": 10,
         "loss.kind": "unicom", "loss.r1": 0.1, "loss.r2": 1.0, "loss.scale": 16, "loss.margin": 0.1,
         "train.augment.crop_scale_min": 0.6, "train.augment.hflip": 0}
DIMS = (32, 16, 8)  # truncated retrieval: 32 of 64 is the paper's 256 of 512
EVAL = {"eval.datasets": "[sop,eurosat]", "eval.workers": 0, "eval.batch_size": 256,
        "eval.dims": "[" + ",".join(map(str, DIMS)) + "]", "eval.probe.max_iter": 300, "eval.probe.fixed_c": "null"}


@dataclass
class Run:
    keys: dict = field(default_factory=dict)   # what differs from CLUSTER and TRAIN
    pretrain: bool = False                      # the CLIP stand-in: trained on the other collection
    init_from: str | None = None                # continue from this run of the same seed


def runs(k_values) -> dict[str, Run]:
    """Every run, by name; `k_values[-1]` is the over-split k, where r1 and MLCD are also tried."""
    return {"base": Run(),
            "image": Run({"kmeans.mode": "image"}), "text": Run({"kmeans.mode": "text"}),
            **{f"k{k}": Run({"kmeans.k": k}) for k in k_values if k != CLUSTER["kmeans.k"]},
            **{f"r1-{r}": Run({"loss.r1": r}) for r in (1.0, 0.3, 0.05)},
            f"k{k_values[-1]}-r1-1.0": Run({"kmeans.k": k_values[-1], "loss.r1": 1.0}),
            "r2-0.5": Run({"loss.r2": 0.5}), "r3-0.5": Run({"loss.r3": 0.5}),
            "clip": Run({"kmeans.mode": "text", "train.prototype_lr_mult": 0}, pretrain=True),
            "clip-init": Run(init_from="clip"),
            "mlcd-l8": Run({"assign.top_l": 8, "loss.kind": "mlcd"}),
            "mlcd-l8-r1": Run({"assign.top_l": 8, "loss.kind": "mlcd", "loss.r1": 1.0}),
            f"k{k_values[-1]}-mlcd-l8": Run({"kmeans.k": k_values[-1], "assign.top_l": 8, "loss.kind": "mlcd"})}


@dataclass
class Table:
    key: str
    title: str
    paper: str                  # the paper's finding, in words
    rows: list[tuple[str, str]]  # (row label, run name)


def tables(k_values) -> list[Table]:
    base_k = CLUSTER["kmeans.k"]
    return [
        Table("encoder", "Tab. 5: the features clustered", "text-based clustering beats image-based; joint (image + "
              "text) beats both", [("image", "image"), ("text", "text"), ("joint (image + text)", "base")]),
        Table("k", "Tab. 5: the cluster number", "100K < 1M > 10M: an interior optimum (about 400 images per class)",
              [(f"k = {k}", "base" if k == base_k else f"k{k}") for k in k_values]),
        Table("r1", "Tab. 6: random class selection r1", "r1 = 1.0 clearly worst; 0.3 and 0.1 better; 0.05 drops "
              "slightly", [("r1 = 1.0", "r1-1.0"), ("r1 = 0.3", "r1-0.3"), ("r1 = 0.1", "base"),
                           ("r1 = 0.05", "r1-0.05"),
                           # the paper's reason for r1, inter-class conflict, where k splits every concept
                           (f"r1 = 1.0 at k = {k_values[-1]}", f"k{k_values[-1]}-r1-1.0"),
                           (f"r1 = 0.1 at k = {k_values[-1]}", f"k{k_values[-1]}")]),
        Table("r2", "Tab. 6: random feature selection r2", "r2 < 1 slightly lowers full-dimension results; r2 = 0.5 "
              "improves half-dimension retrieval (256 of 512: +0.4 R@1); dropout (r3) does not improve "
              "dimension-constrained retrieval", [("r2 = 1.0", "base"), ("r2 = 0.5", "r2-0.5"),
                                                  ("dropout r3 = 0.5", "r3-0.5")]),
        Table("init", "Tab. 8: initialisation", "from scratch beats CLIP init (+0.7 linear probe); CLIP init converges "
              "faster but to a higher loss", [("from scratch", "base"), ("CLIP stand-in init", "clip-init")]),
        Table("mlcd", "MLCD: positives l and negative ratio r", "l = 8 beats l = 1; r = 0.1 beats r = 1.0",
              [("l = 1 (Unicom loss)", "base"), ("l = 8, r = 0.1", "mlcd-l8"), ("l = 8, r = 1.0", "mlcd-l8-r1"),
               # MLCD's own regime: clusters much finer than the concepts
               (f"l = 1 (Unicom loss) at k = {k_values[-1]}", f"k{k_values[-1]}"),
               (f"l = 8, r = 0.1 at k = {k_values[-1]}", f"k{k_values[-1]}-mlcd-l8")]),
    ]


def needed(runs_: dict[str, Run], table_list: list[Table]) -> list[str]:
    """The runs the tables name, each after the run it continues from."""
    names = []
    for t in table_list:
        for _, name in t.rows:
            for n in ([runs_[name].init_from] if runs_[name].init_from else []) + [name]:
                if n not in names:
                    names.append(n)
    return names


def submit(args: list[str], log: Path) -> None:
    """python slurm/submit.py ARGS, in this process; its output into `log` (the run's own logs keep it too)."""
    from slurm import submit as launcher
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        code = launcher.main(args)
    if code:
        sys.exit(f"python slurm/submit.py {' '.join(args)} failed (exit {code}); its output: {log}")


def kv(keys: dict) -> list[str]:
    return [f"{k}={v}" for k, v in keys.items()]


def run_one(name: str, run: Run, seed: int, world: World, out: Path, scale: dict) -> dict:
    """cluster -> train -> eval of one run and seed; returns its numbers (read back when done before)."""
    run_dir = out / f"seed{seed}" / name
    done = run_dir / "ablation.json"
    if done.is_file():
        return json.loads(done.read_text())
    start = time.time()
    keys = {**CLUSTER, **TRAIN, **run.keys}
    data = world.other if run.pretrain else world.train
    common = [f"run_dir={run_dir}", "launcher=local", "device=cpu", "progress=off", f"seed={seed}"]
    cluster = {k: v for k, v in keys.items() if k.startswith(("kmeans.", "assign."))}
    submit(["stage=cluster", *common, f"data.shards={data.shards}", f"embed.source={data.release}",
            "clip.model=ViT-Tiny-16", "clip.pretrained=random", f"kmeans.seed={seed}", *kv(cluster)],
           run_dir / "ablation.log")
    train = {k: v for k, v in keys.items() if k not in cluster}
    if run.init_from:
        train["train.continue_from"] = out / f"seed{seed}" / run.init_from
    submit(["stage=train", *common, f"train.deepspeed_config={out / 'ds.json'}", f"train.epochs={scale['epochs']}",
            *kv(train)], run_dir / "ablation.log")
    result = {"labels": label_quality(run_dir, data)}
    if not run.pretrain:
        submit(["stage=eval", *common, f"eval.data_root={world.eval_root}", *kv(EVAL)], run_dir / "ablation.log")
        scores = json.loads((run_dir / "eval" / "results.json").read_text())["run"]
        result |= {"R@1": scores["sop"]["R@1"], "probe": scores["eurosat"]["top1"],
                   **{f"R@1/{d}": scores["sop"][f"dim{d}/R@1"] for d in DIMS}}
    result |= {"loss": loss_curve(run_dir), "seconds": round(time.time() - start, 1), "load": os.getloadavg()[0]}
    done.write_text(json.dumps(result))
    return result


def label_quality(run_dir: Path, data) -> dict:
    """How well the top-1 pseudo labels follow the concepts: purity (share of images in their cluster's most
    common concept) and normalised mutual information."""
    from sklearn.metrics import normalized_mutual_info_score
    rows, labels = [], []
    for keys in sorted((run_dir / "embed").glob("*.keys.txt")):
        stem = keys.name.split(".")[0]
        rows.append(data.rows(keys.read_text().split()))
        labels.append(np.load(run_dir / "labels" / f"{stem}.npy"))
    concept, labels = data.concept[np.concatenate(rows)], np.concatenate(labels)
    purity = sum(np.bincount(concept[labels == c]).max() for c in np.unique(labels)) / len(labels)
    return {"purity": float(purity), "nmi": float(normalized_mutual_info_score(concept, labels))}


LOSS_LINE = re.compile(r"\[train\] step (\d+)/\d+ .*? loss ([0-9.]+)")


def loss_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of the train stage's progress lines (every train.log_every steps)."""
    text = (run_dir / "logs" / "local_train.log").read_text()
    return [(int(s), float(v)) for s, v in LOSS_LINE.findall(text)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "ablations"), help="run directories (kept: a rerun "
                        "skips finished runs)")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "ablations.md"), help="the report; plots beside it")
    parser.add_argument("--tiny", action="store_true", help="a smoke run: tiny data, one seed, one epoch")
    parser.add_argument("--only", nargs="*", help="tables to run (encoder k r1 r2 init mlcd); default all")
    parser.add_argument("--seeds", type=int, help="seeds 0..N-1 (default 3, tiny 1)")
    parser.add_argument("--machine", default=f"{os.cpu_count()} cores", help="how the report names the machine "
                        "(docs/benchmarks.md's names: cpu2, ...)")
    args = parser.parse_args(argv)
    scale = SCALES["tiny" if args.tiny else "full"]
    seeds = list(range(args.seeds or scale["seeds"]))
    all_runs, all_tables = runs(scale["k"]), tables(scale["k"])
    chosen = [t for t in all_tables if not args.only or t.key in args.only]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ds.json").write_text(json.dumps({
        "train_batch_size": BATCH, "train_micro_batch_size_per_gpu": MICRO, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 2, "elastic_checkpoint": True}, "steps_per_print": 10**6}))
    start = time.time()
    results: dict[str, list[dict]] = {}
    world_seconds: list[float] = []
    names = needed(all_runs, chosen)
    for seed in seeds:
        world = make_world(out / f"seed{seed}" / "data", scale["n"], scale["shards"], seed, scale["retrieval"],
                           scale["probe"])
        world_seconds.append(world.seconds)
        for i, name in enumerate(names):
            t = time.time()
            results.setdefault(name, []).append(run_one(name, all_runs[name], seed, world, out, scale))
            print(f"seed {seed} [{i + 1}/{len(names)}] {name}: {time.time() - t:.0f}s "
                  f"({(time.time() - start) / 60:.1f} min so far)", flush=True)
    # The suite's time: every run's and data set's own wall time, kept with them, so that a rerun that only
    # rewrites the report still states what the runs took.
    minutes = (sum(x["seconds"] for rs in results.values() for x in rs) + sum(world_seconds)) / 60
    (out / "summary.json").write_text(json.dumps({"minutes": minutes, "seeds": seeds, "results": results}))
    from benchmarks.ablation_report import write_report
    write_report(Path(args.doc), chosen, results, seeds, minutes, args)
    print(f"wrote {args.doc} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
