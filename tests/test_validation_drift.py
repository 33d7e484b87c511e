"""Drift statistics: quiet on stationary data, loud and specific on a moved field.

The windows are synthetic, built here from seeded generators: about 25 fields shaped like a
chest X-ray site's (beta-distributed scores, a few image sizes, ages with gaps, exposure
headers, view / manufacturer / sex mixes).
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from scipy import stats

from dicom_node.validation.drift import (
    Columns,
    DriftResult,
    _chi2_null,
    _ks_null,
    drift,
    field_bound,
)

SCORES = (
    *("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema"),
    *("Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pneumothorax"),
)
VIEWS = ("PA", "AP")
MANUFACTURERS = ("GE", "Siemens", "Philips", "Agfa")


def _window(rng: np.random.Generator, n: int, **categorical: list[str | None]) -> Columns:
    """``n`` studies from the site's stationary distributions; ``categorical`` overrides."""
    numeric = {f"score:{name}": rng.beta(2.0, 5.0, n) for name in SCORES}
    numeric["Rows"] = rng.choice([2048.0, 2500.0, 3000.0], n, p=[0.5, 0.3, 0.2])
    numeric["Columns"] = rng.choice([2048.0, 2500.0, 3000.0], n, p=[0.5, 0.3, 0.2])
    age = rng.normal(60.0, 15.0, n)
    age[rng.random(n) < 0.05] = np.nan
    numeric["PatientAge"] = age
    numeric["KVP"] = np.round(rng.normal(120.0, 5.0, n))
    numeric["Exposure"] = rng.gamma(3.0, 2.0, n)
    numeric["SpatialResolution"] = np.full(n, 0.15)  # constant at this site
    sexes: list[str | None] = [str(sex) for sex in rng.choice(["M", "F"], n)]
    sexes = [None if gap else sex for sex, gap in zip(sexes, rng.random(n) < 0.02, strict=True)]
    labels: dict[str, list[str | None]] = {
        "ViewPosition": _draw(rng, VIEWS, n, [0.7, 0.3]),
        "Manufacturer": _draw(rng, MANUFACTURERS, n, [0.4, 0.3, 0.2, 0.1]),
        "ManufacturerModelName": _draw(rng, tuple("abcdefgh"), n, None),
        "PhotometricInterpretation": _draw(rng, ("MONOCHROME1", "MONOCHROME2"), n, [0.1, 0.9]),
        "BitsStored": _draw(rng, ("12", "16"), n, [0.8, 0.2]),
        "PatientSex": sexes,
        "Modality": ["DX"] * n,
        "gating": _draw(rng, ("accepted", "low quality"), n, [0.97, 0.03]),
    }
    return Columns(numeric, {**labels, **categorical})


def _draw(
    rng: np.random.Generator, values: tuple[str, ...], n: int, p: list[float] | None
) -> list[str | None]:
    return [str(value) for value in rng.choice(values, n, p=p)]


def _with(window: Columns, field: str, labels: list[str | None]) -> Columns:
    """``window`` with one categorical column replaced."""
    return Columns(window.numeric, {**window.categorical, field: labels})


def _replace_some(
    rng: np.random.Generator, labels: list[str | None], rows: range, share: float, new: str
) -> list[str | None]:
    """``labels`` with ``share`` of ``rows`` (chosen at random) set to ``new``."""
    changed = list(labels)
    for row in rng.choice(list(rows), round(share * len(rows)), replace=False):
        changed[row] = new
    return changed


def _statistic(result: DriftResult, field: str) -> float:
    return next(statistic.z for statistic in result.statistics if statistic.field == field)


def test_stationary_windows_raise_no_alarm_across_seeds() -> None:
    combined = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        result = drift(_window(rng, 600), _window(rng, 500), seed=seed)
        assert len(result.statistics) == 26
        assert not result.alarm, (seed, result.moved)
        combined.append(result.combined)
    assert max(combined) < 1.5


def test_lateral_views_raise_the_alarm_naming_view_position() -> None:
    rng = np.random.default_rng(1)
    reference, recent = _window(rng, 600), _window(rng, 500)
    views = _replace_some(rng, list(recent.categorical["ViewPosition"]), range(500), 0.2, "LL")
    result = drift(reference, _with(recent, "ViewPosition", views))
    assert result.alarm
    assert result.moved == ("ViewPosition",)


def test_laterals_in_only_the_last_150_studies_still_raise_the_alarm() -> None:
    """30 laterals in 500: against a reference of 2000, z ~ 10 (5.5 to 17 over 20 seeds).

    Against a reference of only 600 the evidence itself is thin (Pearson's p ~ 1e-8 for the
    whole table, a z near 5 against a corrected bound of 3.9) and about 1 window in 4 misses.
    """
    rng = np.random.default_rng(3)
    reference, recent = _window(rng, 2000), _window(rng, 500)
    views = list(recent.categorical["ViewPosition"])
    views = _replace_some(rng, views, range(350, 500), 0.2, "LL")  # 30 laterals of 500
    result = drift(reference, _with(recent, "ViewPosition", views))
    assert result.alarm
    assert result.moved == ("ViewPosition",)


def test_a_new_manufacturer_raises_the_alarm_naming_manufacturer() -> None:
    rng = np.random.default_rng(4)
    reference, recent = _window(rng, 600), _window(rng, 500)
    makers = list(recent.categorical["Manufacturer"])
    makers = _replace_some(rng, makers, range(500), 0.3, "Fujifilm")
    result = drift(reference, _with(recent, "Manufacturer", makers))
    assert result.alarm
    assert result.moved == ("Manufacturer",)


def test_a_shifted_score_raises_the_alarm_naming_that_score() -> None:
    rng = np.random.default_rng(5)
    reference, recent = _window(rng, 600), _window(rng, 500)
    shifted = {**recent.numeric, "score:Effusion": recent.numeric["score:Effusion"] + 0.15}
    result = drift(reference, Columns(shifted, recent.categorical))
    assert result.alarm
    assert result.moved == ("score:Effusion",)


def test_a_single_manufacturer_reference_gives_a_large_finite_z_and_constants_z_zero() -> None:
    rng = np.random.default_rng(6)
    reference = _window(rng, 600, Manufacturer=["GE"] * 600)
    makers = _replace_some(rng, ["GE"] * 500, range(500), 0.3, "Fujifilm")
    result = drift(reference, _window(rng, 500, Manufacturer=makers))
    assert 10 < _statistic(result, "Manufacturer") < math.inf
    assert _statistic(result, "Modality") == 0.0  # "DX" in every study of both windows
    assert _statistic(result, "SpatialResolution") == 0.0
    assert result.moved == ("Manufacturer",)


def test_statistic_values_equal_scipys() -> None:
    rng = np.random.default_rng(7)
    reference, recent = _window(rng, 600), _window(rng, 500)
    result = drift(reference, recent)
    for statistic in result.statistics:
        if statistic.test == "ks":
            x, y = reference.numeric[statistic.field], recent.numeric[statistic.field]
            x, y = x[~np.isnan(x)], y[~np.isnan(y)]
            ks = stats.ks_2samp(x, y)
            scale = math.sqrt(x.size * y.size / (x.size + y.size))
            expected = (ks.statistic * scale, ks.pvalue)
        else:
            counts = [Counter(w.categorical[statistic.field]) for w in (reference, recent)]
            categories = sorted(set(counts[0]) | set(counts[1]), key=str)
            table = [[count[category] for category in categories] for count in counts]
            chi2 = stats.chi2_contingency(table, correction=False) if len(categories) > 1 else None
            expected = (chi2.statistic, chi2.pvalue) if chi2 else (0.0, 1.0)
        assert statistic.value == pytest.approx(expected[0], rel=1e-12)
        assert statistic.p_value == pytest.approx(expected[1], rel=1e-9)
    assert {statistic.test for statistic in result.statistics} == {"ks", "chi2"}


def test_null_statistics_equal_scipys_for_each_subset() -> None:
    rng = np.random.default_rng(8)
    values = np.round(rng.normal(0.0, 2.0, 200))  # integers: many ties
    inside = rng.random((5, 200)) < 0.4
    codes = rng.integers(0, 3, 200)
    totals = np.bincount(codes, minlength=4)  # category 3 absent, as a recent-only one is
    counts = np.array([np.bincount(codes[row], minlength=4) for row in inside], dtype=float)
    chi2, dof = _chi2_null(counts, totals)
    assert dof == 2
    for k, row in enumerate(inside):
        a, b = values[row], values[~row]
        ks = stats.ks_2samp(a, b).statistic * math.sqrt(a.size * b.size / (a.size + b.size))
        assert _ks_null(values, inside)[k] == pytest.approx(ks, rel=1e-12)
        table = np.vstack([counts[k], totals - counts[k]])[:, :3]
        assert chi2[k] == pytest.approx(stats.chi2_contingency(table, correction=False).statistic)


def test_missing_categories_count_as_their_own_category() -> None:
    rng = np.random.default_rng(9)
    reference, recent = _window(rng, 600), _window(rng, 500)
    sexes = list(recent.categorical["PatientSex"])
    sexes[:200] = [None] * 200  # the header stopped being filled in
    result = drift(reference, _with(recent, "PatientSex", sexes))
    counts = [Counter(reference.categorical["PatientSex"]), Counter(sexes)]
    table = [[count[sex] for sex in ("F", "M", None)] for count in counts]
    assert table[1][2] >= 200
    value = next(s.value for s in result.statistics if s.field == "PatientSex")
    assert value == pytest.approx(stats.chi2_contingency(table, correction=False).statistic)
    assert result.moved == ("PatientSex",)


def test_a_numeric_field_with_too_few_values_in_either_window_is_skipped() -> None:
    rng = np.random.default_rng(10)
    reference, recent = _window(rng, 600), _window(rng, 500)
    sparse = np.full(500, np.nan)
    sparse[:29] = rng.normal(120.0, 5.0, 29)  # 29 values: below min_rows = 30
    result = drift(reference, Columns({**recent.numeric, "KVP": sparse}, recent.categorical))
    assert "KVP" not in {statistic.field for statistic in result.statistics}
    sparse[29] = 120.0
    result = drift(reference, Columns({**recent.numeric, "KVP": sparse}, recent.categorical))
    assert "KVP" in {statistic.field for statistic in result.statistics}


def test_too_few_rows_in_either_window_says_nothing() -> None:
    rng = np.random.default_rng(11)
    makers: dict[str, list[str | None]] = {"Manufacturer": ["Fujifilm"] * 29}
    small = drift(_window(rng, 600), _window(rng, 29, **makers))
    assert small == DriftResult((), 0.0, (), False, 600, 29)
    assert drift(_window(rng, 29), _window(rng, 500)).statistics == ()
    assert drift(_window(rng, 600), _window(rng, 29, **makers), min_rows=20).alarm


def test_combined_is_the_rms_of_positive_zs_and_moved_is_ranked() -> None:
    rng = np.random.default_rng(12)
    reference, recent = _window(rng, 600), _window(rng, 500)
    views = _replace_some(rng, list(recent.categorical["ViewPosition"]), range(500), 0.1, "LL")
    numeric = {**recent.numeric, "score:Mass": recent.numeric["score:Mass"] + 0.3}
    result = drift(reference, Columns(numeric, {**recent.categorical, "ViewPosition": views}))
    z = np.array([statistic.z for statistic in result.statistics])
    assert result.combined == pytest.approx(math.sqrt(np.mean(np.maximum(z, 0.0) ** 2)))
    ranked = sorted(z[z > field_bound(3.0, z.size)], reverse=True)
    assert [_statistic(result, field) for field in result.moved] == ranked
    assert set(result.moved) == {"ViewPosition", "score:Mass"}


def test_the_seed_fixes_the_null_and_not_the_statistics() -> None:
    rng = np.random.default_rng(13)
    reference, recent = _window(rng, 600), _window(rng, 500)
    first, again, other = (drift(reference, recent, seed=seed) for seed in (0, 0, 1))
    assert first == again
    assert [s.value for s in first.statistics] == [s.value for s in other.statistics]
    assert [s.z for s in first.statistics] != [s.z for s in other.statistics]


def test_fields_in_only_one_window_are_left_out() -> None:
    rng = np.random.default_rng(14)
    reference, recent = _window(rng, 600), _window(rng, 500)
    numeric = {name: values for name, values in recent.numeric.items() if name != "KVP"}
    result = drift(reference, Columns(numeric, {**recent.categorical, "Laterality": ["L"] * 500}))
    assert {statistic.field for statistic in result.statistics} == (
        set(reference.numeric) | set(reference.categorical)
    ) - {"KVP"}


def test_columns_of_different_lengths_are_refused() -> None:
    assert len(Columns({"Rows": np.zeros(3)}, {"Modality": ["DX"] * 3})) == 3
    with pytest.raises(ValueError, match="different lengths"):
        Columns({"Rows": np.zeros(3)}, {"Modality": ["DX"] * 4})
    with pytest.raises(ValueError, match="one-dimensional"):
        Columns({"Rows": np.zeros((3, 2))})


def test_field_bound_keeps_the_whole_set_as_quiet_as_one_field() -> None:
    assert field_bound(3.0, 1) == 3.0
    for fields in (2, 26, 100):
        threshold = field_bound(3.0, fields)
        assert threshold > field_bound(3.0, fields - 1)
        all_under = stats.norm.cdf(threshold) ** fields
        assert all_under == pytest.approx(stats.norm.cdf(3.0), rel=1e-12)
