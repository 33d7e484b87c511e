"""The models a site runs (``[models.NAME]`` tables, or the one ``[model]``), their modes,
and the ``[validation]`` / ``[drift]`` settings of the local validation.

A model is ``live`` (its results go to PACS and the worklist) or ``shadow`` (it analyses the
same studies, its results are stored for validation, nothing of it leaves the node).  The mode
written here is the mode a model starts in; ``dicom-node models promote`` / ``demote`` record
a change in the database (``validation.modes``), which wins over the file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any


class ModelMode(enum.StrEnum):
    LIVE = "live"
    SHADOW = "shadow"


@dataclass(frozen=True)
class ModelSpec:
    """One configured model: the site's name for it and what loads it."""

    name: str  # the site's name (results, commands and the web name it)
    catalogue: str  # the catalogue entry (``dicom-node models list``)
    weights: str = ""  # a weights file instead of the installed release file
    mode: str = ModelMode.LIVE.value
    allow_unverified: bool = False
    allow_untrained: bool = False


@dataclass(frozen=True)
class ValidationSettings:
    target_sensitivity: float = 0.95  # the proposed operating point reaches this sensitivity
    rule: str = "sensitivity"  # or youden: the threshold maximising sensitivity + specificity
    bootstrap_resamples: int = 2000  # the stratified bootstrap that checks the DeLong CI
    min_cases: int = 10  # positives and negatives a finding needs before it gets an AUROC


@dataclass(frozen=True)
class DriftSettings:
    enabled: bool = True
    interval_minutes: float = 60.0  # how often the scheduler recomputes it
    reference: str = "first"  # first: the first reference_studies analysed; validation: the
    # period of the model's latest validation report
    reference_studies: int = 500
    window_days: float = 30.0  # the recent window: the last window_studies within this
    window_studies: int = 500
    min_studies: int = 30  # fewer in either window: nothing is computed
    bound: float = 3.0  # a z-score (per field) or combined score above this raises the alarm


# Keys of a ``[models.NAME]`` table; ``[model]`` keeps what every model shares (device,
# batch size, threads, fp16, models_dir).
_SPEC_KEYS = {"catalogue", "weights", "mode", "allow_unverified", "allow_untrained"}
_SINGLE_KEYS = ("name", "weights", "mode", "allow_unverified", "allow_untrained")
_MODES = tuple(mode.value for mode in ModelMode)


def build_models(raw: dict[str, Any], problems: list[str]) -> tuple[ModelSpec, ...]:
    """``[models.NAME]`` tables, checked: known keys, a known mode, at most one of each name.

    With no ``[models]`` the node runs the one model of ``[model]`` (see :func:`model_specs`).
    """
    table = raw.get("models")
    if table is None:
        return ()
    if not isinstance(table, dict) or not table:
        problems.append("[models] must hold one table per model: [models.NAME]")
        return ()
    single = raw.get("model", {})
    given = [key for key in _SINGLE_KEYS if isinstance(single, dict) and key in single]
    if given:
        problems.append(
            f"[model] {', '.join(given)}: with [models.NAME] tables, set these per model"
        )
    specs = []
    for name, entry in table.items():
        spec = _build_spec(str(name), entry, problems)
        if spec is not None:
            specs.append(spec)
    return tuple(specs)


def _build_spec(name: str, entry: Any, problems: list[str]) -> ModelSpec | None:
    where = f"models.{name}"
    if not isinstance(entry, dict):
        problems.append(f"[{where}] must be a table")
        return None
    unknown = sorted(set(entry) - _SPEC_KEYS)
    if unknown:
        problems.append(
            f"{where}.{unknown[0]}: unknown key (allowed: {', '.join(sorted(_SPEC_KEYS))})"
        )
    mode = entry.get("mode", ModelMode.LIVE.value)
    if mode not in _MODES:
        problems.append(f"{where}.mode = {mode!r}: must be one of {', '.join(_MODES)}")
    values: dict[str, Any] = {"name": name, "catalogue": entry.get("catalogue", name)}
    for key, kind in (("weights", str), ("allow_unverified", bool), ("allow_untrained", bool)):
        if key in entry:
            if not isinstance(entry[key], kind):
                problems.append(f"{where}.{key} = {entry[key]!r}: must be a {kind.__name__}")
            else:
                values[key] = entry[key]
    if not isinstance(values["catalogue"], str):
        problems.append(f"{where}.catalogue must be a string")
        return None
    return ModelSpec(**values, mode=mode if mode in _MODES else ModelMode.SHADOW.value)


def single_spec(name: str, weights: str, mode: str, unverified: bool, untrained: bool) -> ModelSpec:
    """The one model of a ``[model]`` section."""
    return ModelSpec(name, name, weights, mode, unverified, untrained)


def check_validation(values: Any, problems: list[str]) -> None:
    """Ranges of ``[validation]``, reported with the other problems."""
    if not 0 < values.target_sensitivity < 1:
        problems.append("validation.target_sensitivity: must be between 0 and 1")
    if values.rule not in ("sensitivity", "youden"):
        problems.append(f"validation.rule = {values.rule!r}: must be sensitivity or youden")
    if values.bootstrap_resamples < 100:
        problems.append("validation.bootstrap_resamples: must be at least 100")


def check_drift(values: DriftSettings, problems: list[str]) -> None:
    """Ranges of ``[drift]``."""
    if values.reference not in ("first", "validation"):
        problems.append(f"drift.reference = {values.reference!r}: must be first or validation")
    for field in ("reference_studies", "window_studies", "min_studies"):
        if getattr(values, field) < 2:
            problems.append(f"drift.{field}: must be at least 2")
    if values.interval_minutes <= 0 or values.window_days <= 0 or values.bound <= 0:
        problems.append("drift: interval_minutes, window_days and bound must be positive")
