"""Linear probe with CLIP's protocol (Radford et al. 2021, appendix A.3) on frozen features.

L-BFGS logistic regression (scikit-learn, L2 penalty). The regularisation strength is found on a
validation split by CLIP's parametric binary search: start from C = 1e-6, 1e-4, ..., 1e6, then
repeatedly halve the step around the best value until 8 steps per decade; refit on train+val with
that C and score the test split with the data set's metric.

The official Unicom example (deepglint/unicom `unicom/examples/linear_probe.md`) instead fits once at a
fixed C = 0.601 on the train split; `fixed_c` adds that score beside the sweep's (`fixed_c/<metric>`).
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

COARSE_EXPONENTS = (-6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0)  # log10(C) of the first sweep
FINEST_STEP = 0.125  # 8 steps per decade
FIXED_C = "fixed_c"  # prefix of the fixed-C probe's metrics


def top1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Top-1 accuracy, a fraction in [0, 1]."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred))


def mean_per_class(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean over the classes present in y_true of each class's accuracy, a fraction in [0, 1]."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    classes = np.unique(y_true)
    return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "top1": top1, "mean_per_class": mean_per_class}


def fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int) -> LogisticRegression:
    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
    # Weakly regularised fits (C near 1e6) rarely converge in max_iter; CLIP accepts that too, and
    # the search simply scores what the solver reached.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return clf.fit(x, y)


def search_c(evaluate: Callable[[float], float], lo: float = -6.0, hi: float = 6.0
             ) -> tuple[float, dict[float, float]]:
    """CLIP's coarse-to-fine search over log10(C) in [lo, hi]; returns (best C, {C: score}).

    `evaluate(C)` is the validation score (higher is better). On a tie the smaller C (stronger
    regularisation) wins, so the result does not depend on the order of evaluation.
    """
    scores: dict[float, float] = {}

    def score(e: float) -> float:
        if e not in scores:
            scores[e] = evaluate(10.0 ** e)
        return scores[e]

    def better(a: float, b: float) -> bool:
        return score(a) > score(b) or (score(a) == score(b) and a < b)

    best = None
    for e in COARSE_EXPONENTS:
        if lo <= e <= hi and (best is None or better(e, best)):
            best = e
    step = 2.0
    while step > FINEST_STEP:
        step /= 2
        for e in (best - step, best + step):
            if lo <= e <= hi and better(e, best):
                best = e
    return 10.0 ** best, {10.0 ** e: s for e, s in sorted(scores.items())}


def held_out_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (fit, val) index split of a training set that has no validation split.

    Each class gives round(fraction * n) of its samples to val, keeping at least one for fitting.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval.probe.val_fraction={fraction}: must be in (0, 1)")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        val.append(idx[:min(int(round(fraction * len(idx))), len(idx) - 1)])
    val_idx = np.sort(np.concatenate(val))
    fit_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return fit_idx, val_idx


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                 val_x: np.ndarray | None = None, val_y: np.ndarray | None = None,
                 metric: str = "top1", max_iter: int = 1000, val_fraction: float = 0.2,
                 seed: int = 0, fixed_c: float | None = None) -> dict[str, float]:
    """Search C on val (or a held-out part of train), refit on train+val, score test.

    Returns {metric: test score (fraction), "C": the chosen C, "val_<metric>": its val score}; with
    `fixed_c` also "fixed_c/<metric>": the test score of one fit at that C on the train split alone
    (a given val split is not used), as the official example fits, and "fixed_c/C".
    """
    if metric not in METRICS:
        raise ValueError(f"unknown probe metric {metric!r}; expected one of {sorted(METRICS)}")
    score_fn = METRICS[metric]
    train_x, train_y = np.asarray(train_x, np.float32), np.asarray(train_y)
    if val_x is None:
        fit_idx, val_idx = held_out_split(train_y, val_fraction, seed)
        fit_x, fit_y, val_x, val_y = train_x[fit_idx], train_y[fit_idx], train_x[val_idx], train_y[val_idx]
        all_x, all_y = train_x, train_y
    else:
        val_x, val_y = np.asarray(val_x, np.float32), np.asarray(val_y)
        fit_x, fit_y = train_x, train_y
        all_x, all_y = np.concatenate([train_x, val_x]), np.concatenate([train_y, val_y])

    best_c, scores = search_c(lambda c: score_fn(val_y, fit(fit_x, fit_y, c, max_iter).predict(val_x)))
    final = fit(all_x, all_y, best_c, max_iter)
    test_x = np.asarray(test_x, np.float32)
    out = {metric: score_fn(test_y, final.predict(test_x)), "C": best_c, f"val_{metric}": scores[best_c]}
    if fixed_c is not None:
        out[f"{FIXED_C}/{metric}"] = score_fn(test_y, fit(train_x, train_y, fixed_c, max_iter).predict(test_x))
        out[f"{FIXED_C}/C"] = fixed_c
    return out
