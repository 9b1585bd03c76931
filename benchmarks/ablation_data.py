"""The data of benchmarks/ablations.py: small web collections whose structure makes the paper's ablations
meaningful (how each choice maps onto the paper's setting: ablations.py's docstring).

Every image holds two scikit-learn digits side by side on one of a few background styles; its concept (what the
downstream sets ask) is the ordered digit pair. Its "web caption" names the two digits, not always correctly, and
a source that the image does not show. The released "CLIP" features are an image side (a recogniser's view of each
digit, and the background) and a text side (the caption's words) in one shared space, written as a clip-retrieval
release (tests/release_fixtures.py) that the cluster stage imports (`embed.source`), joined by URL to the images
written as an img2dataset download.
"""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.demo_sets import write_eurosat, write_sop
from tests.release_fixtures import pairs, write_download, write_release

D = 64                 # the released features' width (clip-retrieval's float16 unit rows)
STYLES = 4             # background styles: visible, not part of the concept
BACKGROUND = 0.45      # a background's brightest grey, below the digits' strokes (1.0): both stay visible
STYLE_WEIGHT = 0.7     # the style's weight in the image side, next to about 1 for each recognised digit
SOURCES = 10           # caption sources: named by the caption, invisible in the image
SOURCE_WEIGHT = 0.7    # the source word's weight in the text side, next to 1 for each digit's name
WRONG_NAME = 0.1       # the chance that the caption names a wrong digit, per digit
NOISE = 0.2            # per-dimension noise of both sides
RECOGNISER_DIGITS = 300  # labelled digits the image side's recogniser is fit on (about 95% right on the others)
TRAIN_DIGITS = 1200    # digits of load_digits the training images are made of; the other 597 make the eval sets


@dataclass
class Collection:
    """One web collection: the img2dataset download of its images and the release of its features."""
    shards: str               # brace pattern of the download's tars (data.shards)
    release: Path             # the clip-retrieval release (embed.source)
    concept: np.ndarray       # [n] the ordered pair a * 10 + b of each row, in download order
    per_shard: int

    def rows(self, keys: list[str]) -> np.ndarray:
        """Download rows of img2dataset keys SSSSSIIII (shard, row in the shard)."""
        return np.array([int(k[:5]) * self.per_shard + int(k[5:]) for k in keys])


@dataclass
class World:
    train: Collection         # what the ablations train on
    other: Collection         # another draw of the same kind (the "CLIP" stand-in is pre-trained on it)
    eval_root: Path           # eval.data_root: sop/ (retrieval) and eurosat/ (linear probe), held-out digits
    seconds: float            # what writing it took


def _digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images / 16.0, d.target


def _backgrounds(size: int = 64) -> np.ndarray:
    """STYLES backgrounds in [0, 1]: plain black, a left-right ramp, a top-down ramp, a plain grey."""
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    return np.stack([np.zeros((size, size), np.float32), np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                     np.full((size, size), 0.6, np.float32)])[:STYLES]


def compose(images: np.ndarray, left: int, right: int, style: int) -> np.ndarray:
    """A 64 x 64 grey image in [0, 1]: digit `left` upscaled into the left half, `right` into the right half,
    on background `style`."""
    def half(x):
        small = Image.fromarray((images[x] * 255).astype(np.uint8))
        return np.asarray(small.resize((32, 64), Image.Resampling.BILINEAR), np.float32) / 255
    digits = np.concatenate([half(left), half(right)], axis=1)
    return np.maximum(digits, BACKGROUND * _backgrounds()[style])


def _rgb(x: np.ndarray) -> np.ndarray:
    return np.repeat((x * 255).round().astype(np.uint8)[..., None], 3, axis=2)


def _jpeg(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_rgb(x)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _draw(rng, by_digit, n):
    """n (left index, right index, style, concept) rows: uniform pairs of digit classes, digits of each class
    drawn from `by_digit`."""
    a, b, style = rng.integers(0, 10, n), rng.integers(0, 10, n), rng.integers(0, STYLES, n)
    left = np.array([rng.choice(by_digit[c]) for c in a])
    right = np.array([rng.choice(by_digit[c]) for c in b])
    return left, right, style, a * 10 + b


class Encoders:
    """The two towers of the "CLIP" whose released features the cluster stage imports, in one shared space (as
    CLIP's are aligned): a direction per left digit, per right digit, per background style and per source."""

    def __init__(self, rng, images: np.ndarray, target: np.ndarray, labelled: np.ndarray):
        from sklearn.linear_model import LogisticRegression
        self.left, self.right, self.style, self.source = (_unit(rng.standard_normal((m, D)))
                                                          for m in (10, 10, STYLES, SOURCES))
        flat = images.reshape(len(images), -1)
        self.recogniser = LogisticRegression(max_iter=1000).fit(flat[labelled], target[labelled])
        self.flat, self.rng = flat, rng

    def image(self, left: np.ndarray, right: np.ndarray, style: np.ndarray) -> np.ndarray:
        """What the picture shows: each half's digit as a recogniser of its pixels sees it (its class
        probabilities over the digit directions: similar digits get confused) and the background."""
        p_left, p_right = (self.recogniser.predict_proba(self.flat[x]) for x in (left, right))
        return _unit(p_left @ self.left + p_right @ self.right + STYLE_WEIGHT * self.style[style]
                     + NOISE * self.rng.standard_normal((len(left), D)))

    def text(self, concept: np.ndarray, source: np.ndarray) -> np.ndarray:
        """What the caption says: the two digits' names (each wrong with probability WRONG_NAME, as web alt-text
        is) and its source."""
        n, rng = len(concept), self.rng
        a = np.where(rng.random(n) < WRONG_NAME, rng.integers(0, 10, n), concept // 10)
        b = np.where(rng.random(n) < WRONG_NAME, rng.integers(0, 10, n), concept % 10)
        return _unit(self.left[a] + self.right[b] + SOURCE_WEIGHT * self.source[source]
                     + NOISE * rng.standard_normal((n, D)))


def _collection(root: Path, rng, images, pool, encoders: Encoders, n: int, shards: int) -> Collection:
    left, right, style, concept = _draw(rng, pool, n)
    source = rng.integers(0, SOURCES, n)
    img, txt = encoders.image(left, right, style), encoders.text(concept, source)
    rows, index = pairs(n), np.arange(n)
    write_release(root / "release", "clip_retrieval", rows, img.astype(np.float16), txt.astype(np.float16),
                  [index[: n // 2], index[n // 2:]], np.zeros(n, np.int64), index)
    per_shard = -(-n // shards)
    write_download(root / "download", rows, per_shard=per_shard, failed=set(),
                   image=lambda r: _jpeg(compose(images, left[r], right[r], style[r])))
    return Collection(str(root / "download" / f"{{00000..{shards - 1:05d}}}.tar"), root / "release", concept,
                      per_shard)


def make_world(root: Path, n_train: int, shards: int, seed: int, retrieval_per_class: int = 10,
               probe_per_class: int = 27) -> World:
    """Two training collections (root/train, root/other) made of TRAIN_DIGITS digits, and the eval sets
    (root/eval) made of the other digits: 100 ordered pairs, random backgrounds. Written once: a later call
    reads root/world.json back."""
    made = root / "world.json"
    if made.is_file():
        w = json.loads(made.read_text())
        return World(*(Collection(c["shards"], Path(c["release"]), np.load(root / f"{name}.concept.npy"),
                                  c["per_shard"]) for name, c in w["collections"].items()), Path(w["eval_root"]),
                     w["seconds"])
    start = time.time()
    images, target = _digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(target))
    train_digits, held = order[:TRAIN_DIGITS], order[TRAIN_DIGITS:]
    pool = [train_digits[target[train_digits] == c] for c in range(10)]
    encoders = Encoders(rng, images, target, train_digits[:RECOGNISER_DIGITS])
    train, other = (_collection(root / name, rng, images, pool, encoders, n_train, shards)
                    for name in ("train", "other"))
    eval_root = root / "eval"
    held_pool = [held[target[held] == c] for c in range(10)]
    for write, per_class in ((write_sop, retrieval_per_class), (write_eurosat, probe_per_class)):
        ev = np.repeat(np.arange(100), per_class)
        left = [rng.choice(held_pool[c // 10]) for c in ev]
        right = [rng.choice(held_pool[c % 10]) for c in ev]
        style = rng.integers(0, STYLES, len(ev))
        write(eval_root, np.stack([_rgb(compose(images, *x)) for x in zip(left, right, style)]), ev)
    for name, c in (("train", train), ("other", other)):
        np.save(root / f"{name}.concept.npy", c.concept)
    made.write_text(json.dumps({"collections": {name: {"shards": c.shards, "release": str(c.release),
                                                       "per_shard": c.per_shard}
                                                for name, c in (("train", train), ("other", other))},
                                "eval_root": str(eval_root), "seconds": time.time() - start}))
    return World(train, other, eval_root, time.time() - start)
