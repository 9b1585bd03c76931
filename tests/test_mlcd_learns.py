"""What MLCD is for (issue 25, item 5): images that hold two objects, whose single cluster label names only the
dominant one. Trained on the same images and clusters, MLCD's top-l labels (loss.kind=mlcd, assign.top_l=2) make
a backbone that retrieves images sharing EITHER object better than single-label training on the top-1 cluster
(loss.kind=unicom): a multi-label mAP, measured on held-out images.

Where each element comes from, and why the setup isolates that:
- Images: scikit-learn's `load_digits` (1,797 8 x 8 digits, shipped with scikit-learn). Each 64 x 64 image
  (ViT-Tiny-16's input size) holds two digits of different classes side by side, each 8 x 8 digit upscaled to
  fill a 32 x 64 half. Training images take their digits from 1,200 of the digits, held-out ones from the other
  597: retrieval is scored on digit images the backbone never saw.
- Shards: the training images as an img2dataset download (webdataset tars of KEY.jpg / .txt / .json and the
  shard's parquet), written by `release_fixtures.write_download`, 4 shards.
- Clustering features: the cluster stage's embedding import (`embed.source`, issue 22) of a clip-retrieval
  release (`release_fixtures.write_release`: img_emb / text_emb / metadata parquet, joined to the download by
  URL). Each image's released feature is normalize(0.95 e_left + 0.31 e_right + noise), e_d one of 10
  orthonormal random directions (one per digit class), noise N(0, 0.03^2) per dimension: a stand-in for an
  image encoder whose feature is dominated by the larger or more salient object. The real cluster stage
  (k-means at k = 10 with k-means++ seeding, then assign) puts one centroid on each left digit: the top-1
  label names the left digit only, the top-2 labels name both digits. That partition is k-means' to find: on
  15 of 24 data seeds of this generator k-means++ found it, on the others it merged two left digits and split
  another (top-1 purity 0.83-0.93; `test_kmeans_finds_the_left_digit_partition_on_most_data_seeds`). So the
  test runs on two data seeds, one of each kind: 9 (the partition found) and 8 (two left digits merged), and
  asks on each that MLCD retrieves better than single-label training, by a margin, not that either crosses a
  fixed bar. The labels are thus the situation MLCD's paper describes (one cluster label misses the second
  object), and nothing else differs between the two runs of a seed: same images, shards, k-means, seed and
  schedule.
- Training: the real train stage, `deepspeed` on 2 CPU ranks (gloo), ViT-Tiny-16 from scratch; whole-image
  crops without flips (`train.augment.crop_scale_min=0.6`, `train.augment.hflip=0`): the default
  RandomResizedCrop (down to 8% of the area) and flips cut away or swap the digits of a 64-px image.
- Scoring: each held-out image a query against the other 299 by cosine of the exported backbone's features
  (`unicom_ds.load`), average precision over the images that share either digit with it, written as a plain
  loop. Chance is about 0.38 (28 of 45 digit pairs share no digit).
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import unicom_ds
from slurm import submit
from tests.release_fixtures import pairs, write_download, write_release
from tests.test_train_deepspeed import launch
from tests.train_fixtures import ds_config
from unicom_ds import config, train

N_TRAIN, N_HELD, D, K = 800, 300, 64, 10
# Data seeds: 9, where the cluster stage finds one centroid per left digit, and 8, where it merges two of them.
DATA_SEEDS = {9: "partition found", 8: "two left digits merged"}
W_LEFT, W_RIGHT, NOISE = 0.95, 0.31, 0.03
KMEANS = ["kmeans.init=kmeans++"]
TRAIN = ["model=ViT-Tiny-16", "device=cpu", "train.epochs=1", "train.steps_per_epoch=300", "train.lr=2e-3",
         "train.warmup_epochs=0.1", "train.precision=fp32", "train.workers=1", "train.local_processes=2",
         "train.ckpt_every_steps=300", "train.log_every=50", "loss.r1=1.0", "loss.scale=16", "loss.margin=0.1",
         "train.augment.crop_scale_min=0.6", "train.augment.hflip=0", "seed=0"]
# Measured (docs/benchmarks.md, MLCD section; cpu2, these settings): MLCD above unicom by 0.10-0.13 mAP where the
# partition was found (data seeds 9-11, train seeds 0-2; 9 again on 2026-12-07: 0.561 / 0.671), by 0.057 where two
# left digits were merged (data seed 8: 0.566 / 0.623). Asked on each seed: about half the smallest gap.
MARGIN = 0.025


def digit_pairs(rng, pool, n, target):
    """n (i, j) index pairs from `pool` whose digits differ."""
    out = []
    while len(out) < n:
        i, j = rng.choice(pool, 2, replace=False)
        if target[i] != target[j]:
            out.append((int(i), int(j)))
    return out


def picture(images, i, j):
    """Digit i in the left half, digit j in the right half of a 64 x 64 RGB image."""
    def half(x):
        return Image.fromarray((images[x] * (255 / 16)).astype(np.uint8)).resize((32, 64), Image.Resampling.BILINEAR)
    out = Image.new("L", (64, 64))
    out.paste(half(i), (0, 0))
    out.paste(half(j), (32, 0))
    return out.convert("RGB")


def jpeg(image):
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def average_precisions(features, digits):
    """Per query: AP over the other images ranked by cosine, relevant when they share a digit with it."""
    aps = []
    for q in range(len(digits)):
        scores = features @ features[q]
        ranked = [o for o in np.argsort(-scores, kind="stable") if o != q]
        hits, total = 0, 0.0
        for rank, o in enumerate(ranked, start=1):
            if set(digits[o]) & set(digits[q]):
                hits += 1
                total += hits / rank
        aps.append(total / max(1, hits))
    return aps


def generate(seed: int, digits) -> dict:
    """A data seed's training pairs, held-out pairs and released features (float16 unit rows)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.target))
    train_pairs = digit_pairs(rng, order[:1200], N_TRAIN, digits.target)
    held = digit_pairs(rng, order[1200:], N_HELD, digits.target)
    left = np.array([digits.target[i] for i, _ in train_pairs])
    right = np.array([digits.target[j] for _, j in train_pairs])
    e = np.linalg.qr(rng.standard_normal((D, 10)))[0].T  # 10 orthonormal directions, one per digit
    f = W_LEFT * e[left] + W_RIGHT * e[right] + NOISE * rng.standard_normal((N_TRAIN, D))
    f = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float16)
    return {"train_pairs": train_pairs, "held": held, "left": left, "right": right, "features": f}


def left_digit_purity(labels: np.ndarray, left: np.ndarray) -> tuple[float, int]:
    """The share of rows whose label's majority left digit is their own, and how many left digits are named."""
    name = {c: np.bincount(left[labels == c]).argmax() for c in np.unique(labels)}
    return float(np.mean([name[c] == d for c, d in zip(labels, left)])), len(set(name.values()))


def test_kmeans_finds_the_left_digit_partition_on_most_data_seeds():
    """The base rate behind the two data seeds: k-means++ at k = 10 on the generator's features (as the cluster
    stage fits them, in generator order) finds one centroid per left digit on 15 of data seeds 0-23; elsewhere it
    merges two left digits and splits another, top-1 purity 0.83-0.93. Asked: at least half, none below 0.8."""
    from sklearn.datasets import load_digits

    from cluster_job import kmeans
    digits = load_digits()
    purities = []
    for seed in range(24):
        data = generate(seed, digits)
        x = data["features"].astype(np.float32)
        fit = kmeans.spherical_kmeans(x, K, 20, 0, init="kmeans++")
        purity, named = left_digit_purity(kmeans.nearest(fit.centroids, x), data["left"])
        purities.append(purity if named == K else min(purity, 0.98))
    found = sum(p > 0.98 for p in purities)
    assert found >= 12 and min(purities) > 0.8, purities


@pytest.fixture(scope="module", params=list(DATA_SEEDS), ids=list(DATA_SEEDS.values()))
def world(request, tmp_path_factory):
    from sklearn.datasets import load_digits
    seed = request.param
    root = tmp_path_factory.mktemp(f"mlcd_learns_{seed}")
    digits = load_digits()
    data = generate(seed, digits)
    train_pairs, held, left, right, f = (data[key] for key in ("train_pairs", "held", "left", "right", "features"))
    rows, index = pairs(N_TRAIN), np.arange(N_TRAIN)
    write_release(root / "release", "clip_retrieval", rows, f, f, [index[: N_TRAIN // 2], index[N_TRAIN // 2:]],
                  np.zeros(N_TRAIN, np.int64), index)
    per_shard = N_TRAIN // 4
    write_download(root / "download", rows, per_shard=per_shard, failed=set(),
                   image=lambda r: jpeg(picture(digits.images, *train_pairs[r])))
    pattern = str(root / "download" / "{00000..00003}.tar")
    runs = {}
    for kind, top_l in (("unicom", 1), ("mlcd", 2)):
        runs[kind] = root / kind
        assert submit.main(["stage=cluster", f"run_dir={runs[kind]}", f"data.shards={pattern}",
                            f"embed.source={root / 'release'}", "launcher=local", "device=cpu", "progress=off",
                            f"kmeans.k={K}", "clip.model=ViT-Tiny-16", "clip.pretrained=random", "seed=0",
                            f"assign.top_l={top_l}", *KMEANS]) == 0
    return {"root": root, "pattern": pattern, "runs": runs, "left": left, "right": right, "per_shard": per_shard,
            "digits": digits, "held": held, "seed": seed}


def labels_by_row(world):
    """(top-1 [n], top-2 [n, 2]) of the mlcd run and the unicom run's top-1, rows in download order."""
    run, out = world["runs"]["mlcd"], []
    for s in range(4):
        keys = (run / "embed" / f"{s:05d}.keys.txt").read_text().split()
        out += [(s * world["per_shard"] + int(k[5:]), s) for k in keys]
    rows = np.array([r for r, _ in out])
    top1 = np.concatenate([np.load(run / "labels" / f"{s:05d}.npy") for s in range(4)])
    top2 = np.concatenate([np.load(run / "labels" / f"{s:05d}.topl.npy") for s in range(4)])
    single = np.concatenate([np.load(world["runs"]["unicom"] / "labels" / f"{s:05d}.npy") for s in range(4)])
    return rows, top1, top2, single


def test_top1_names_the_left_digit_and_top2_both(world):
    """Both runs of a seed share the top-1 labels; they name the left digit (all of them where the partition was
    found, all but a merged pair's elsewhere), and the second label mostly names the right digit."""
    rows, top1, top2, single = labels_by_row(world)
    assert sorted(rows.tolist()) == list(range(N_TRAIN))
    left, right = world["left"][rows], world["right"][rows]
    assert np.array_equal(single, top1) and np.array_equal(top2[:, 0], top1)
    purity, named = left_digit_purity(top1, left)
    name = {c: np.bincount(left[top1 == c]).argmax() for c in np.unique(top1)}  # each centroid's left digit
    second = np.mean([name.get(c, -1) == d for c, d in zip(top2[:, 1], right)])
    if DATA_SEEDS[world["seed"]] == "partition found":
        assert named == K and purity > 0.98 and second > 0.98, (purity, named, second)
    else:
        assert named == K - 1 and 0.8 < purity < 0.98 and second > 0.7, (purity, named, second)


@pytest.mark.slow
def test_mlcd_retrieves_images_sharing_either_digit_better(world):
    ds = ds_config(world["root"] / "ds.json", batch=32, micro=16, bf16=None)
    digits, held = world["digits"], world["held"]
    mAP = {}
    for kind, run in world["runs"].items():
        cfg = config.resolve([f"run_dir={run}", f"data.shards={world['pattern']}", "stage=train",
                              f"train.deepspeed_config={ds}", f"loss.kind={kind}", *TRAIN])
        launch(train.local_command(cfg), world["root"] / f"{kind}.log")
        model, preprocess = unicom_ds.load("ViT-Tiny-16", checkpoint=run / "train" / "backbone.pt")
        with torch.no_grad():
            z = model(torch.stack([preprocess(picture(digits.images, i, j)) for i, j in held])).float()
        z = torch.nn.functional.normalize(z, dim=1).numpy()
        pair_digits = [(digits.target[i], digits.target[j]) for i, j in held]
        mAP[kind] = float(np.mean(average_precisions(z, pair_digits)))
    print(f"data seed {world['seed']}: multi-label mAP on {N_HELD} held-out images: unicom {mAP['unicom']:.3f}, "
          f"mlcd {mAP['mlcd']:.3f}")
    assert mAP["mlcd"] > mAP["unicom"] + MARGIN, mAP
