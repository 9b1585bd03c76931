"""Linear probe: metrics, CLIP's C search, and the whole protocol on real digits read through a real layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from torchvision.transforms import ToTensor

from evaluation import probe_sets
from evaluation.features import extract
from evaluation.linear_probe import (COARSE_EXPONENTS, held_out_split, linear_probe, mean_per_class,
                                     search_c, top1)
from probe_layouts import digit_images, write_cifar10

torch.set_num_threads(1)
GRID = np.arange(-48, 49) / 8  # log10(C) from -6 to 6, 8 steps per decade: CLIP's resolution


class RawPixels(torch.nn.Module):
    """A fixed feature map: gray 32x32 -> 8x8 average pooled pixels (64 features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4).flatten(1)


@pytest.fixture(scope="module")
def digits_features(tmp_path_factory):
    """400 digits written as CIFAR-10's pickled batches, read by torchvision's CIFAR10 via probe_sets."""
    root = tmp_path_factory.mktemp("probe")
    x, y = digit_images(400)
    write_cifar10(root, x, y)
    ps = probe_sets.load("cifar10", root, transform=ToTensor())
    feats = {s: extract(RawPixels(), getattr(ps, s), batch_size=128, workers=0, device="cpu", progress_mode="off")
             for s in ("train", "test")}
    return ps, feats


def test_metrics_hand_case_and_against_sklearn():
    assert top1([0, 0, 0, 1], [0, 0, 1, 0]) == 0.5
    assert mean_per_class([0, 0, 0, 1], [0, 0, 1, 0]) == pytest.approx((2 / 3 + 0) / 2)
    rng = np.random.default_rng(0)
    y = rng.choice(5, size=300, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    pred = np.where(rng.random(300) < 0.6, y, rng.integers(0, 5, 300))
    assert top1(y, pred) == pytest.approx(accuracy_score(y, pred))
    assert mean_per_class(y, pred) == pytest.approx(balanced_accuracy_score(y, pred))
    assert mean_per_class(y, pred) != pytest.approx(top1(y, pred))  # imbalanced: the two differ


@pytest.mark.parametrize("peak", [-5.93, -1.3, 0.04, 2.3, 4.61, 5.97])
def test_search_finds_the_grid_optimum_of_a_unimodal_score(peak):
    calls = []

    def score(c):
        calls.append(c)
        return -abs(np.log10(c) - peak)

    best, scores = search_c(score)
    brute = GRID[np.argmax([-abs(e - peak) for e in GRID])]
    assert np.log10(best) == pytest.approx(brute)
    assert len(calls) == len(set(calls)) <= len(COARSE_EXPONENTS) + 2 * 4  # each C fitted once
    assert set(scores) == set(calls)


def test_search_breaks_ties_towards_stronger_regularisation():
    best, _ = search_c(lambda c: 1.0 if c >= 1e-2 else 0.0)  # a plateau from C = 1e-2 up
    assert np.log10(best) == pytest.approx(-2.0)


def test_search_on_digits_picks_the_c_of_a_brute_force_sweep(digits_features):
    ps, feats = digits_features
    x, y = feats["train"], ps.train.labels
    fit_idx, val_idx = held_out_split(y, 0.2, seed=0)

    def val_acc(c):
        clf = LogisticRegression(C=c, max_iter=200).fit(x[fit_idx], y[fit_idx])
        return float(np.mean(clf.predict(x[val_idx]) == y[val_idx]))

    sweep = [val_acc(10.0 ** e) for e in GRID]
    brute = GRID[int(np.argmax(sweep))]  # argmax takes the first (smallest C) of equal scores
    result = linear_probe(x, y, feats["test"], ps.test.labels, max_iter=200, val_fraction=0.2, seed=0)
    assert np.log10(result["C"]) == pytest.approx(brute)
    assert result["val_top1"] == pytest.approx(max(sweep))


def test_probe_on_digits_is_far_above_chance_and_refits_on_all_train(digits_features):
    ps, feats = digits_features
    assert feats["train"].shape == (len(ps.train), 64)
    result = linear_probe(feats["train"], ps.train.labels, feats["test"], ps.test.labels, max_iter=200)
    assert result["top1"] > 0.85  # chance is 0.1
    refit = LogisticRegression(C=result["C"], max_iter=200).fit(feats["train"], ps.train.labels)
    assert result["top1"] == pytest.approx(accuracy_score(ps.test.labels, refit.predict(feats["test"])))


def test_given_val_split_is_searched_then_merged_into_the_final_fit(digits_features):
    ps, feats = digits_features
    x, y = feats["train"], ps.train.labels
    tr, va = np.arange(len(y)) < 120, np.arange(len(y)) >= 120
    result = linear_probe(x[tr], y[tr], feats["test"], ps.test.labels, x[va], y[va],
                          metric="mean_per_class", max_iter=200)
    c = result["C"]
    on_train = LogisticRegression(C=c, max_iter=200).fit(x[tr], y[tr])
    assert result["val_mean_per_class"] == pytest.approx(
        balanced_accuracy_score(y[va], on_train.predict(x[va])))
    both = LogisticRegression(C=c, max_iter=200).fit(x, y)
    assert result["mean_per_class"] == pytest.approx(
        balanced_accuracy_score(ps.test.labels, both.predict(feats["test"])))


def test_fixed_c_is_the_official_examples_single_fit_on_the_train_split(digits_features):
    # The official example: LogisticRegression(random_state=0, C=0.601, max_iter=1000) fit on train, scored on test.
    ps, feats = digits_features
    x, y, tx, ty = feats["train"], ps.train.labels, feats["test"], ps.test.labels
    official = LogisticRegression(random_state=0, C=0.601, max_iter=1000).fit(x, y)
    ref = accuracy_score(ty, official.predict(tx))
    result = linear_probe(x, y, tx, ty, max_iter=1000, fixed_c=0.601)
    assert result["fixed_c/top1"] == pytest.approx(ref) and result["fixed_c/C"] == 0.601
    assert result["C"] != 0.601  # the sweep's own choice stays beside it
    # A given val split is not part of the fixed-C fit (the official example has none).
    tr = np.arange(len(y)) < 120
    with_val = linear_probe(x[tr], y[tr], tx, ty, x[~tr], y[~tr], max_iter=1000, fixed_c=0.601)
    alone = LogisticRegression(C=0.601, max_iter=1000).fit(x[tr], y[tr])
    assert with_val["fixed_c/top1"] == pytest.approx(accuracy_score(ty, alone.predict(tx)))
    assert "fixed_c/top1" not in linear_probe(x, y, tx, ty, max_iter=200)


def test_held_out_split_is_stratified_disjoint_and_seeded():
    y = np.repeat([0, 1, 2], [10, 5, 2])
    fit_idx, val_idx = held_out_split(y, 0.2, seed=3)
    assert np.intersect1d(fit_idx, val_idx).size == 0
    assert np.union1d(fit_idx, val_idx).tolist() == list(range(len(y)))
    assert np.bincount(y[val_idx], minlength=3).tolist() == [2, 1, 0]  # round(0.2*n), >=1 kept to fit
    assert np.array_equal(held_out_split(y, 0.2, seed=3)[1], val_idx)
    assert not np.array_equal(held_out_split(y, 0.2, seed=4)[1], val_idx)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="eval.probe.val_fraction=1.5"):
        held_out_split(np.zeros(4), 1.5, 0)
    with pytest.raises(ValueError, match="unknown probe metric 'map'"):
        linear_probe(np.zeros((4, 2)), [0, 1, 0, 1], np.zeros((2, 2)), [0, 1], metric="map")
