"""The header fields of an analysed image that the drift monitor compares over time.

Read from the stored file's header (no pixels) when the worker analyses it, and kept with
the result as JSON.  None of them identifies a patient: sex and age are compared as
distributions, the way a scanner or protocol change shows (CheXstray, Soin et al. 2022).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

# Numeric fields (a Kolmogorov-Smirnov test each) and categorical ones (chi-squared).
NUMERIC_FIELDS = (
    "Rows",
    "Columns",
    "PatientAge",
    "KVP",
    "Exposure",
    "ExposureTime",
    "XRayTubeCurrent",
    "ExposureIndex",
)
CATEGORICAL_FIELDS = (
    "ViewPosition",
    "Manufacturer",
    "ManufacturerModelName",
    "PhotometricInterpretation",
    "BitsStored",
    "PatientSex",
    "Modality",
)
_TAGS = [*NUMERIC_FIELDS, *CATEGORICAL_FIELDS]


def header_features(path: Path) -> dict[str, float | str | None]:
    """The drift fields of the file at ``path`` (missing or unreadable values are None)."""
    dataset = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    return features_of(dataset)


def features_of(dataset: Dataset) -> dict[str, float | str | None]:
    """The drift fields of a dataset: numbers as floats, the rest as trimmed strings."""
    features: dict[str, float | str | None] = {}
    for name in NUMERIC_FIELDS:
        features[name] = _number(name, dataset.get(name))
    for name in CATEGORICAL_FIELDS:
        value = dataset.get(name)
        features[name] = str(value).strip() or None if value not in (None, "") else None
    return features


def _number(name: str, value: object) -> float | None:
    if value in (None, ""):
        return None
    if name == "PatientAge":
        return age_years(str(value))
    try:
        return float(str(value))
    except ValueError:
        return None


def age_years(text: str) -> float | None:
    """PS3.5 Table 6.2-1 AS ("045Y", "006M", "010W", "003D") in years, or None."""
    text = text.strip().upper()
    per_year = {"Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}
    if len(text) != 4 or text[3] not in per_year or not text[:3].isdigit():
        return None
    return int(text[:3]) / per_year[text[3]]
