"""The validation statistics against independent computations: sklearn and scipy where they
provide the statistic, a slow pairwise DeLong, hand formulas and brute-force searches."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from dicom_node.validation import stats
from dicom_node.validation.stats import Interval


def _sample(n: int, prevalence: float, seed: int, decimals: int | None = None):
    """Labels and logistic scores with a moderate signal; ``decimals`` rounds them (ties)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(int)
    y[:2], y[2:4] = 1, 0  # both classes, at least two of each
    score = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.4 * y - 1.5)))
    if decimals is not None:
        score = np.round(score, decimals)
    return y, score


def _slow_delong(y, score, level):
    """DeLong's interval from structural components by explicit pairwise comparison, O(m n)."""
    pos = [s for s, t in zip(score, y, strict=True) if t == 1]
    neg = [s for s, t in zip(score, y, strict=True) if t == 0]

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    v10 = [sum(psi(x, z) for z in neg) / len(neg) for x in pos]
    v01 = [sum(psi(x, z) for x in pos) / len(pos) for z in neg]
    auc = sum(v10) / len(v10)

    def sample_var(v):
        mean = sum(v) / len(v)
        return sum((a - mean) ** 2 for a in v) / (len(v) - 1)

    se = math.sqrt(sample_var(v10) / len(pos) + sample_var(v01) / len(neg))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    return max(0.0, auc - z * se), min(1.0, auc + z * se)


def _hand_wilson(k, n, level):
    z = NormalDist().inv_cdf(0.5 + level / 2)
    centre = (k + z * z / 2) / (n + z * z)
    half = z / (n + z * z) * math.sqrt(k * (n - k) / n + z * z / 4)
    return centre - half, centre + half


# ----------------------------------------------------------------------------- discrimination


@pytest.mark.parametrize("decimals", [None, 1])
def test_auroc_equals_sklearn_also_with_heavy_ties(decimals):
    y, score = _sample(500, 0.2, seed=1, decimals=decimals)
    if decimals is not None:
        assert len(np.unique(score)) <= 11  # heavy ties
    assert stats.auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


@pytest.mark.parametrize(("decimals", "level"), [(None, 0.95), (1, 0.95), (2, 0.9)])
def test_delong_ci_matches_slow_pairwise_delong(decimals, level):
    y, score = _sample(300, 0.3, seed=2, decimals=decimals)
    ci = stats.delong_ci(y, score, level=level)
    low, high = _slow_delong(y.tolist(), score.tolist(), level)
    assert ci.low == pytest.approx(low, abs=1e-9)
    assert ci.high == pytest.approx(high, abs=1e-9)


def test_delong_and_bootstrap_agree_on_a_realistic_sample():
    y, score = _sample(1000, 0.15, seed=3)
    delong = stats.delong_ci(y, score)
    boot = stats.bootstrap_ci(y, score, n_resamples=2000, seed=0)
    assert abs(delong.low - boot.low) < 0.02
    assert abs(delong.high - boot.high) < 0.02
    assert boot.low < stats.auroc(y, score) < boot.high


@pytest.mark.parametrize("decimals", [None, 1])
def test_vectorised_resample_auc_equals_sklearn_on_explicit_resample(decimals):
    y, score = _sample(200, 0.25, seed=4, decimals=decimals)
    aucs = stats._bootstrap_aucs(y, score, n_resamples=8, seed=11)
    pos, neg = np.sort(score[y == 1]), np.sort(score[y == 0])
    pos_idx, neg_idx = stats._draw_resamples(np.random.default_rng(11), pos.size, neg.size, 8)
    for b in range(8):
        resampled = np.concatenate([pos[pos_idx[b]], neg[neg_idx[b]]])
        labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
        assert aucs[b] == pytest.approx(roc_auc_score(labels, resampled), abs=1e-12)
    assert len(set(aucs.tolist())) > 1  # the resamples really differ


def test_bootstrap_ci_is_the_percentile_interval_of_explicit_resamples():
    y, score = _sample(150, 0.3, seed=5, decimals=2)
    pos, neg = np.sort(score[y == 1]), np.sort(score[y == 0])
    pos_idx, neg_idx = stats._draw_resamples(np.random.default_rng(7), pos.size, neg.size, 60)
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    explicit = [
        roc_auc_score(labels, np.concatenate([pos[pos_idx[b]], neg[neg_idx[b]]])) for b in range(60)
    ]
    low, high = np.percentile(explicit, [5, 95])
    ci = stats.bootstrap_ci(y, score, n_resamples=60, seed=7, level=0.9)
    assert (ci.low, ci.high) == pytest.approx((low, high), abs=1e-12)


def test_bootstrap_ci_is_reproducible_for_a_seed_and_varies_across_seeds():
    y, score = _sample(400, 0.2, seed=6)
    first = stats.bootstrap_ci(y, score, n_resamples=300, seed=1)
    assert stats.bootstrap_ci(y, score, n_resamples=300, seed=1) == first
    assert stats.bootstrap_ci(y, score, n_resamples=300, seed=2) != first


def test_perfect_separation_gives_degenerate_intervals_at_one():
    y = np.array([0, 0, 0, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert stats.auroc(y, score) == 1.0
    assert stats.delong_ci(y, score) == Interval(1.0, 1.0)
    assert stats.bootstrap_ci(y, score, n_resamples=50) == Interval(1.0, 1.0)


def test_roc_points_equal_sklearn_roc_curve():
    y, score = _sample(300, 0.3, seed=8, decimals=2)
    for ours, theirs in zip(stats.roc_points(y, score), roc_curve(y, score), strict=True):
        np.testing.assert_array_equal(ours, theirs)


# ----------------------------------------------------------------------------- rates


@pytest.mark.parametrize(("k", "n"), [(0, 10), (10, 10), (3, 7), (45, 50), (1, 1), (512, 1000)])
@pytest.mark.parametrize("level", [0.95, 0.9])
def test_wilson_matches_the_hand_formula(k, n, level):
    ci = stats.wilson(k, n, level=level)
    low, high = _hand_wilson(k, n, level)
    assert ci.low == pytest.approx(max(0.0, low), abs=1e-12)
    assert ci.high == pytest.approx(min(1.0, high), abs=1e-12)


@pytest.mark.parametrize(("k", "n"), [(0, 0), (5, 4), (-1, 3)])
def test_wilson_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match="wilson"):
        stats.wilson(k, n)


def test_confusion_at_matches_sklearn_and_counts_equal_scores_as_positive():
    y, score = _sample(400, 0.3, seed=9, decimals=2)
    threshold = float(np.median(score))
    assert (score == threshold).any()  # a score exactly at the threshold is called positive
    result = stats.confusion_at(y, score, threshold)
    tn, fp, fn, tp = confusion_matrix(y, (score >= threshold).astype(int), labels=[0, 1]).ravel()
    assert (result.tp, result.fp, result.tn, result.fn) == (tp, fp, tn, fn)
    for rate, num, den in [
        (result.sensitivity, tp, tp + fn),
        (result.specificity, tn, tn + fp),
        (result.ppv, tp, tp + fp),
        (result.npv, tn, tn + fn),
    ]:
        assert (rate.numerator, rate.denominator) == (num, den)
        assert rate.value == pytest.approx(num / den)
        assert rate.ci == stats.wilson(int(num), int(den))


def test_confusion_rate_with_empty_denominator_is_none():
    result = stats.confusion_at([0, 1, 1], [0.2, 0.4, 0.6], threshold=0.9)
    assert (result.tp, result.fp, result.tn, result.fn) == (0, 0, 1, 2)
    assert result.ppv == stats.Rate(None, None, 0, 0)
    assert result.sensitivity.value == 0.0


# ----------------------------------------------------------------------------- calibration


def _hand_ece(y, prob, edges):
    """ECE by an explicit loop; bins (lo, hi], the first also holding 0."""
    total = 0.0
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        inside = [(t, p) for t, p in zip(y, prob, strict=True) if (lo < p or b == 0) and p <= hi]
        if inside:
            frac = sum(t for t, _ in inside) / len(inside)
            mean = sum(p for _, p in inside) / len(inside)
            total += len(inside) / len(y) * abs(frac - mean)
    return total


def test_calibration_matches_sklearn_calibration_curve_and_a_hand_sum():
    rng = np.random.default_rng(10)
    prob = rng.beta(0.7, 2.5, size=600)
    prob = np.where(prob > 0.6, prob / 2, prob)  # leaves the bins above 0.6 empty
    edges = np.linspace(0.0, 1.0, 16)
    prob[:6] = [0.0, 1.0, 1.0, edges[3], edges[7], edges[14]]  # extremes and interior edges
    y = (rng.random(600) < prob**0.8).astype(int)
    ece, rel = stats.calibration(y, prob)
    frac_true, mean_pred = calibration_curve(y, prob, n_bins=15, strategy="uniform")
    filled = [i for i, c in enumerate(rel.counts) if c > 0]
    assert sum(c == 0 for c in rel.counts) >= 3
    assert all(rel.mean_predicted[i] is None for i, c in enumerate(rel.counts) if c == 0)
    ours_true = np.array([rel.fraction_positive[i] for i in filled], dtype=float)
    ours_pred = np.array([rel.mean_predicted[i] for i in filled], dtype=float)
    np.testing.assert_allclose(ours_true, frac_true, atol=1e-12)
    np.testing.assert_allclose(ours_pred, mean_pred, atol=1e-12)
    assert ece == pytest.approx(_hand_ece(y.tolist(), prob.tolist(), edges.tolist()), abs=1e-12)
    assert sum(rel.counts) == 600
    assert rel.bin_edges == tuple(edges.tolist())
    assert rel.counts[-1] >= 2 and rel.counts[0] >= 1  # 1.0 in the last bin, 0.0 in the first


def test_calibration_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        stats.calibration([0, 1], [0.5, 1.2])


# ----------------------------------------------------------------------------- operating points


@pytest.mark.parametrize("target", [0.8, 0.95, 1.0])
def test_threshold_for_sensitivity_reaches_target_and_is_the_highest(target):
    y, score = _sample(500, 0.2, seed=12, decimals=3)
    point = stats.threshold_for_sensitivity(y, score, target=target)
    at = stats.confusion_at(y, score, point.threshold)
    assert point.rule == "sensitivity"
    assert point.threshold in set(score.tolist())
    assert at.sensitivity.value is not None and at.sensitivity.value >= target
    assert point.sensitivity == at.sensitivity.value
    assert point.specificity == at.specificity.value
    assert point.sensitivity_ci_low == stats.wilson(at.tp, at.tp + at.fn).low
    higher = score[score > point.threshold]
    if higher.size:
        next_up = stats.confusion_at(y, score, float(higher.min()))
        assert next_up.sensitivity.value is not None and next_up.sensitivity.value < target


def test_threshold_youden_matches_brute_force_search():
    y, score = _sample(300, 0.3, seed=13, decimals=2)
    best_j, best_t = -2.0, None
    for t in sorted(set(score.tolist())):
        at = stats.confusion_at(y, score, t)
        j = at.sensitivity.value + at.specificity.value - 1.0  # type: ignore[operator]
        if j >= best_j - 1e-12:  # ties go to the higher threshold
            best_j, best_t = max(j, best_j), t
    point = stats.threshold_youden(y, score)
    assert point.rule == "youden"
    assert point.threshold == best_t
    assert point.sensitivity + point.specificity - 1.0 == pytest.approx(best_j, abs=1e-12)


def test_threshold_youden_breaks_ties_toward_the_higher_threshold():
    # J = 0.5 both at 0.3 (sens 1, spec 0.5) and at 0.6 (sens 0.5, spec 1)
    point = stats.threshold_youden([0, 0, 1, 1], [0.1, 0.4, 0.3, 0.6])
    assert (point.threshold, point.sensitivity, point.specificity) == (0.6, 0.5, 1.0)


# ----------------------------------------------------------------------------- localisation


def test_iobb_on_hand_made_boxes():
    truth = [10, 10, 20, 20]  # x, y, w, h: covers [10, 30] x [10, 30]
    assert stats.iobb([15, 15, 25, 25], truth) == 1.0  # prediction inside the truth
    assert stats.iobb([0, 0, 40, 40], truth) == pytest.approx(400 / 1600)  # truth inside it
    assert stats.iobb([40, 40, 50, 50], truth) == 0.0  # disjoint
    assert stats.iobb([30, 10, 40, 30], truth) == 0.0  # touching along an edge
    assert stats.iobb([20, 20, 40, 30], truth) == pytest.approx((10 * 10) / (20 * 10))  # partial


@pytest.mark.parametrize(
    ("pred", "truth"),
    [([5, 5, 5, 10], [0, 0, 1, 1]), ([0, 0, 1, 1], [0, 0, 0, 3]), ([0, 0, 1], [0, 0, 1, 1])],
)
def test_iobb_rejects_degenerate_boxes(pred, truth):
    with pytest.raises(ValueError, match="box"):
        stats.iobb(pred, truth)


def test_iobb_hit_rates_on_a_small_hand_case():
    cases = [
        # truth A covers [0,10]^2; prediction [0,0,10,20]: IoBB 0.5 -> hit at every threshold
        # truth B covers [100,110]^2; prediction [100,100,140,140]: IoBB 100/1600 -> no hit
        ([[0, 0, 10, 10], [100, 100, 10, 10]], [[0, 0, 10, 20], [100, 100, 140, 140]]),
        # truth C; prediction [0,0,20,20] gives 100/400 = 0.25 -> hit at 0.1 and 0.25
        ([[0, 0, 10, 10]], [[0, 0, 20, 20]]),
        # truth D without any prediction -> missed
        ([[50, 50, 5, 5]], []),
        # predictions without truth add no truth box
        ([], [[0, 0, 1, 1]]),
    ]
    rates = stats.iobb_hit_rates(cases)
    assert rates == {"0.1": 2 / 4, "0.25": 2 / 4, "0.5": 1 / 4}


def test_iobb_hit_rates_are_none_without_truth_boxes():
    assert stats.iobb_hit_rates([([], [[0, 0, 5, 5]])]) == {"0.1": None, "0.25": None, "0.5": None}


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "call",
    [
        stats.auroc,
        stats.delong_ci,
        stats.bootstrap_ci,
        stats.roc_points,
        stats.threshold_for_sensitivity,
        stats.threshold_youden,
    ],
)
def test_statistics_needing_both_classes_reject_a_single_class(call):
    with pytest.raises(ValueError, match="positive"):
        call(np.zeros(10, dtype=int), np.linspace(0, 1, 10))


def test_delong_needs_two_cases_of_each_class():
    with pytest.raises(ValueError, match="at least 2"):
        stats.delong_ci([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.9])


@pytest.mark.parametrize(
    ("y", "score", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], "differ in length"),
        ([0, 1, 2], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([0, 1, 0.5], [0.1, 0.2, 0.3], "only 0 and 1"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], "NaN"),
        ([], [], "empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(y, score, message):
    for call in (stats.auroc, lambda a, b: stats.confusion_at(a, b, 0.5), stats.calibration):
        with pytest.raises(ValueError, match=message):
            call(y, score)


def test_result_types_are_frozen_and_interval_serialises_as_list():
    ci = Interval(0.25, 0.75)
    assert ci.as_list() == [0.25, 0.75]
    with pytest.raises(dataclasses.FrozenInstanceError):
        ci.low = 0.0  # type: ignore[misc]
