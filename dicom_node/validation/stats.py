"""Statistics behind the site validation report: discrimination (AUROC with DeLong and bootstrap
intervals), rates at a threshold with Wilson intervals, calibration (ECE and reliability bins),
operating points, and ChestX-ray8 box localisation (IoBB).

Pure functions of numpy arrays for one finding: ``y_true`` holds 0/1 labels and ``y_score``
the model's probabilities.  The report runs many findings on large samples, so the intervals
are vectorised: DeLong by the midrank algorithm of Sun & Xu (2014), O(n log n), and the
stratified bootstrap by weighted counts over the sorted negatives, never one
``roc_auc_score`` call per resample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sps
from sklearn.metrics import roc_auc_score, roc_curve

# Bootstrap working memory per chunk of resamples (index draws, weights, cumulative sums).
_BOOTSTRAP_CHUNK_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Interval:
    """A confidence interval [low, high]."""

    low: float
    high: float

    def as_list(self) -> list[float]:
        """The interval as ``[low, high]`` (for JSON)."""
        return [self.low, self.high]


@dataclass(frozen=True)
class Rate:
    """A proportion ``numerator / denominator`` with its Wilson interval; value and interval are
    None when the denominator is 0 (e.g. the PPV when nothing is called positive)."""

    value: float | None
    ci: Interval | None
    numerator: int
    denominator: int


@dataclass(frozen=True)
class Confusion:
    """The confusion matrix at one threshold (positive means score >= threshold) and its rates."""

    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: Rate
    specificity: Rate
    ppv: Rate
    npv: Rate


@dataclass(frozen=True)
class Reliability:
    """Reliability diagram: per equal-width bin, its count, mean probability and observed
    fraction of positives (None for an empty bin).  ``bin_edges`` has one more entry."""

    bin_edges: tuple[float, ...]
    counts: tuple[int, ...]
    mean_predicted: tuple[float | None, ...]
    fraction_positive: tuple[float | None, ...]


@dataclass(frozen=True)
class OperatingPoint:
    """A chosen threshold, the rule that chose it, and its sensitivity and specificity on the
    validation data; ``sensitivity_ci_low`` is the Wilson lower bound of the sensitivity."""

    rule: str
    threshold: float
    sensitivity: float
    specificity: float
    sensitivity_ci_low: float


# ----------------------------------------------------------------------------- input checks


def _labels_scores(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Labels as int8 0/1 and scores as float64, both 1-D, same length, non-empty, finite."""
    labels = np.asarray(y_true)
    scores = np.asarray(y_score, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1:
        raise ValueError("y_true and y_score must be 1-D arrays")
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(
            f"y_true and y_score differ in length ({labels.shape[0]} != {scores.shape[0]})"
        )
    if labels.shape[0] == 0:
        raise ValueError("y_true and y_score are empty")
    if labels.dtype.kind not in "biuf" or not np.isin(labels, (0, 1)).all():
        found = np.unique(labels)[:5].tolist()
        raise ValueError(f"y_true must hold only 0 and 1 labels (found {found})")
    if not np.isfinite(scores).all():
        raise ValueError("y_score holds NaN or infinite values")
    return labels.astype(np.int8), scores


def _both_classes(
    y_true: Any, y_score: Any, statistic: str, minimum: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Checked (labels, scores, positive scores, negative scores); raises when a class has fewer
    than ``minimum`` cases, since the statistic compares positives with negatives."""
    labels, scores = _labels_scores(y_true, y_score)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if pos.size < minimum or neg.size < minimum:
        raise ValueError(
            f"{statistic} needs at least {minimum} positive and {minimum} negative case(s) "
            f"(got {pos.size} positive, {neg.size} negative)"
        )
    return labels, scores, pos, neg


def _z(level: float) -> float:
    """The two-sided standard normal quantile for a confidence level in (0, 1)."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level}")
    return float(sps.norm.ppf(0.5 + level / 2.0))


# ----------------------------------------------------------------------------- discrimination


def auroc(y_true: Any, y_score: Any) -> float:
    """Area under the ROC curve (sklearn's ``roc_auc_score``); ties count one half."""
    labels, scores, _, _ = _both_classes(y_true, y_score, "AUROC")
    return float(roc_auc_score(labels, scores))


def delong_ci(y_true: Any, y_score: Any, level: float = 0.95) -> Interval:
    """Normal confidence interval of the AUROC with DeLong's variance, clipped to [0, 1].

    Structural components by midranks (Sun & Xu 2014): with m positives X and n negatives Y,
    V10_i = (rank of X_i among all - rank among X) / n and V01_j = 1 - (rank of Y_j among all -
    rank among Y) / m; var = s²(V10)/m + s²(V01)/n.  Needs two cases of each class.
    """
    z = _z(level)
    _, _, pos, neg = _both_classes(y_true, y_score, "The DeLong interval", minimum=2)
    m, n = pos.size, neg.size
    ranks_all = sps.rankdata(np.concatenate([pos, neg]))
    v10 = (ranks_all[:m] - sps.rankdata(pos)) / n
    v01 = 1.0 - (ranks_all[m:] - sps.rankdata(neg)) / m
    auc = float(v10.mean())
    se = math.sqrt(float(np.var(v10, ddof=1)) / m + float(np.var(v01, ddof=1)) / n)
    return Interval(max(0.0, auc - z * se), min(1.0, auc + z * se))


def _draw_resamples(
    rng: np.random.Generator, n_pos: int, n_neg: int, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of ``size`` stratified resamples: (size, n_pos) into the positives and
    (size, n_neg) into the negatives, each drawn with replacement."""
    pos_idx = rng.integers(0, n_pos, size=(size, n_pos), dtype=np.int32)
    neg_idx = rng.integers(0, n_neg, size=(size, n_neg), dtype=np.int32)
    return pos_idx, neg_idx


def _resampled_aucs(
    lt: np.ndarray, le: np.ndarray, pos_idx: np.ndarray, neg_idx: np.ndarray
) -> np.ndarray:
    """AUROC of each resample, from indices into the SORTED positives and SORTED negatives.

    ``lt`` / ``le`` count, per positive, the negatives strictly below / at or below it.  Each
    case's multiplicity in a resample is a bincount of its indices; the cumulative sum C of the
    negatives' multiplicities gives C[lt] negatives below a positive and C[le] - C[lt] tied with
    it, so AUC = sum over positives of multiplicity * (C[lt] + C[le]) / 2, over n1 n0.
    """
    size, n_neg = neg_idx.shape
    n_pos = pos_idx.shape[1]
    neg_weights = np.empty((size, n_neg), dtype=np.int32)
    pos_weights = np.empty((size, n_pos), dtype=np.int64)
    for row in range(size):  # one small bincount per resample stays in cache
        neg_weights[row] = np.bincount(neg_idx[row], minlength=n_neg)
        pos_weights[row] = np.bincount(pos_idx[row], minlength=n_pos)
    cum = np.zeros((size, n_neg + 1), dtype=np.int32)
    np.cumsum(neg_weights, axis=1, out=cum[:, 1:])
    wins_twice = cum[:, lt].astype(np.int64) + cum[:, le]  # lt, le ascending: cache friendly
    return np.einsum("ij,ij->i", wins_twice, pos_weights) / (2.0 * float(n_pos) * float(n_neg))


def _bootstrap_aucs(y_true: Any, y_score: Any, n_resamples: int, seed: int) -> np.ndarray:
    """AUROCs of ``n_resamples`` stratified bootstrap resamples, drawn in chunks that bound the
    working memory; one seeded Generator, chunks drawn in order, each chunk's indices pointing
    into the sorted positive and sorted negative scores."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    _, _, pos, neg = _both_classes(y_true, y_score, "The bootstrap interval")
    neg_sorted = np.sort(neg)
    pos_sorted = np.sort(pos)
    lt = np.searchsorted(neg_sorted, pos_sorted, side="left")
    le = np.searchsorted(neg_sorted, pos_sorted, side="right")
    rng = np.random.default_rng(seed)
    per_resample = 12 * neg.size + 40 * pos.size + 8  # bytes: draws, weights, sums, gathers
    chunk = max(1, min(n_resamples, _BOOTSTRAP_CHUNK_BYTES // per_resample))
    aucs = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, chunk):
        size = min(chunk, n_resamples - start)
        pos_idx, neg_idx = _draw_resamples(rng, pos.size, neg.size, size)
        aucs[start : start + size] = _resampled_aucs(lt, le, pos_idx, neg_idx)
    return aucs


def bootstrap_ci(
    y_true: Any, y_score: Any, n_resamples: int = 2000, seed: int = 0, level: float = 0.95
) -> Interval:
    """Percentile interval of the AUROC over stratified bootstrap resamples (positives and
    negatives resampled separately, so every resample keeps the observed prevalence)."""
    _z(level)
    aucs = _bootstrap_aucs(y_true, y_score, n_resamples, seed)
    low, high = np.quantile(aucs, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return Interval(float(low), float(high))


def roc_points(y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve (fpr, tpr, thresholds) from sklearn's ``roc_curve``."""
    labels, scores, _, _ = _both_classes(y_true, y_score, "The ROC curve")
    fpr, tpr, thresholds = roc_curve(labels, scores)
    return fpr, tpr, thresholds


# ----------------------------------------------------------------------------- rates


def wilson(successes: int, n: int, level: float = 0.95) -> Interval:
    """Wilson score interval of a proportion (scipy's ``binomtest(...).proportion_ci``)."""
    _z(level)
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson needs 0 <= successes <= n and n >= 1 (got {successes}/{n})")
    ci = sps.binomtest(int(successes), int(n)).proportion_ci(
        confidence_level=level, method="wilson"
    )
    return Interval(float(ci.low), float(ci.high))


def _rate(numerator: int, denominator: int, level: float) -> Rate:
    """A rate with its Wilson interval, or value None when the denominator is 0."""
    if denominator == 0:
        return Rate(None, None, numerator, denominator)
    ci = wilson(numerator, denominator, level)
    return Rate(numerator / denominator, ci, numerator, denominator)


def confusion_at(y_true: Any, y_score: Any, threshold: float, level: float = 0.95) -> Confusion:
    """Confusion matrix and rates when a score >= ``threshold`` is called positive."""
    _z(level)
    labels, scores = _labels_scores(y_true, y_score)
    called = scores >= threshold
    actual = labels == 1
    tp = int(np.count_nonzero(called & actual))
    fp = int(np.count_nonzero(called & ~actual))
    tn = int(np.count_nonzero(~called & ~actual))
    fn = int(np.count_nonzero(~called & actual))
    return Confusion(
        threshold=float(threshold),
        tp=tp,
        fp=fp,
        tn=tn,
        fn=fn,
        sensitivity=_rate(tp, tp + fn, level),
        specificity=_rate(tn, tn + fp, level),
        ppv=_rate(tp, tp + fp, level),
        npv=_rate(tn, tn + fn, level),
    )


# ----------------------------------------------------------------------------- calibration


def _or_none(values: np.ndarray, filled: np.ndarray) -> tuple[float | None, ...]:
    """Per-bin values as floats, None where the bin is empty."""
    return tuple(float(v) if f else None for v, f in zip(values, filled, strict=True))


def calibration(y_true: Any, y_prob: Any, n_bins: int = 15) -> tuple[float, Reliability]:
    """Expected calibration error and the reliability bins, over ``n_bins`` equal-width bins.

    ECE = sum_b (n_b / N) |fraction positive_b - mean probability_b|.  Bins follow sklearn's
    ``calibration_curve(strategy="uniform")``: right-closed (lo, hi], the first also holding
    0.0, so a probability of exactly 1.0 falls in the last bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be at least 1, got {n_bins}")
    labels, probs = _labels_scores(y_true, y_prob)
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError("y_prob must hold probabilities in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], probs)
    counts = np.bincount(bins, minlength=n_bins)
    prob_sums = np.bincount(bins, weights=probs, minlength=n_bins)
    positives = np.bincount(bins, weights=labels, minlength=n_bins)
    filled = counts > 0
    mean_pred = np.divide(prob_sums, counts, out=np.zeros(n_bins), where=filled)
    frac_pos = np.divide(positives, counts, out=np.zeros(n_bins), where=filled)
    ece = float(np.sum(counts / probs.size * np.abs(frac_pos - mean_pred)))
    reliability = Reliability(
        bin_edges=tuple(float(e) for e in edges),
        counts=tuple(int(c) for c in counts),
        mean_predicted=_or_none(mean_pred, filled),
        fraction_positive=_or_none(frac_pos, filled),
    )
    return ece, reliability


# ----------------------------------------------------------------------------- operating points


def _sweep(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every distinct observed score t (ascending): the true positives and true negatives
    of the rule score >= t."""
    candidates = np.unique(np.concatenate([pos, neg]))
    tp = pos.size - np.searchsorted(np.sort(pos), candidates, side="left")
    tn = np.searchsorted(np.sort(neg), candidates, side="left")
    return candidates, tp, tn


def _operating_point(
    rule: str, threshold: float, tp: int, tn: int, n_pos: int, n_neg: int
) -> OperatingPoint:
    """An operating point with the Wilson lower bound of its sensitivity."""
    return OperatingPoint(
        rule=rule,
        threshold=float(threshold),
        sensitivity=tp / n_pos,
        specificity=tn / n_neg,
        sensitivity_ci_low=wilson(tp, n_pos).low,
    )


def threshold_for_sensitivity(y_true: Any, y_score: Any, target: float = 0.95) -> OperatingPoint:
    """The highest observed score t whose sensitivity (score >= t) reaches ``target``; the
    lowest observed score always reaches it, so one exists."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
    _, _, pos, neg = _both_classes(y_true, y_score, "An operating point")
    candidates, tp, tn = _sweep(pos, neg)
    # Sensitivity never rises with the threshold; the tolerance absorbs rounding in k / n.
    best = int(np.flatnonzero(tp / pos.size >= target - 1e-12)[-1])
    return _operating_point(
        "sensitivity", candidates[best], int(tp[best]), int(tn[best]), pos.size, neg.size
    )


def threshold_youden(y_true: Any, y_score: Any) -> OperatingPoint:
    """The observed score maximising Youden's J = sensitivity + specificity - 1; among equal
    maxima, the highest threshold (fewest cases called positive)."""
    _, _, pos, neg = _both_classes(y_true, y_score, "An operating point")
    candidates, tp, tn = _sweep(pos, neg)
    youden = tp / pos.size + tn / neg.size - 1.0
    best = int(np.flatnonzero(youden >= youden.max() - 1e-12)[-1])
    return _operating_point(
        "youden", candidates[best], int(tp[best]), int(tn[best]), pos.size, neg.size
    )


# ----------------------------------------------------------------------------- localisation


def _box(values: Sequence[float], what: str) -> tuple[float, float, float, float]:
    """Four finite numbers, or ValueError naming the box."""
    box = tuple(float(v) for v in values)
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"{what} box must be four finite numbers, got {list(values)}")
    return box[0], box[1], box[2], box[3]


def iobb(predicted_xyxy: Sequence[float], truth_xywh: Sequence[float]) -> float:
    """ChestX-ray8 (Wang et al. 2017) IoBB: the intersection area over the area of the
    PREDICTED box.  Predicted [x0, y0, x1, y1], truth [x, y, width, height], same pixels."""
    px0, py0, px1, py1 = _box(predicted_xyxy, "predicted")
    tx, ty, tw, th = _box(truth_xywh, "truth")
    if px1 <= px0 or py1 <= py0:
        raise ValueError(f"predicted box has no area: {list(predicted_xyxy)}")
    if tw <= 0 or th <= 0:
        raise ValueError(f"truth box has no area: {list(truth_xywh)}")
    width = min(px1, tx + tw) - max(px0, tx)
    height = min(py1, ty + th) - max(py0, ty)
    if width <= 0 or height <= 0:
        return 0.0
    return width * height / ((px1 - px0) * (py1 - py0))


def iobb_hit_rates(
    cases: Sequence[tuple[Sequence[Sequence[float]], Sequence[Sequence[float]]]],
    thresholds: Sequence[float] = (0.1, 0.25, 0.5),
) -> dict[str, float | None]:
    """Share of truth boxes hit at each IoBB threshold T, keyed ``str(T)`` ("0.1", ...).

    ``cases`` holds, per (study, finding), (truth boxes xywh, predicted boxes xyxy); a truth box
    is hit at T when any predicted box of its case has IoBB >= T.  None when there are no truth
    boxes at all.
    """
    best: list[float] = []
    for truths, predictions in cases:
        for truth in truths:
            best.append(max((iobb(p, truth) for p in predictions), default=0.0))
    scores = np.asarray(best, dtype=np.float64)
    return {
        str(float(t)): (float(np.mean(scores >= t)) if scores.size else None) for t in thresholds
    }
