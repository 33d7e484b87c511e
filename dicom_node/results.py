"""The contract between analysis and outputs: plain frozen values, no torch, no database.

The worker turns a classified job into an :class:`Analysis`; the output builders
(``outputs/sr``, ``outputs/sc``, ``outputs/pm``) read nothing else.  The finding labels each
catalogue model reports live here too: ``config`` checks ``[thresholds]`` and ``[web]
critical_findings`` against them at load (a misspelled critical finding would silently never
flag a study), and the web filter offers them, neither at the cost of a torch import.
"""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only names a field type: importing config costs no numpy
    import numpy as np

# The words every output of a result from such weights carries (AlgorithmInfo.warning_label).
UNTRAINED_LABEL = "UNTRAINED DEMO MODEL"
UNVERIFIED_LABEL = "UNVERIFIED WEIGHTS"

# The pinned torchxrayvision release's ``model_urls[...]["labels"]`` in output order ("" where
# a model was not trained on that output); a test compares them with the installed package,
# so they cannot drift unnoticed when torchxrayvision is upgraded.
_ALL = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
_NIH = _ALL[:14] + ("", "", "", "")
_PC = _ALL[:14] + ("", "Fracture", "", "")
_CHEX = (
    "Atelectasis",
    "Consolidation",
    "",
    "Pneumothorax",
    "Edema",
    "",
    "",
    "Effusion",
    "Pneumonia",
    "",
    "Cardiomegaly",
    "",
    "",
    "",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
_RSNA = ("",) * 8 + ("Pneumonia",) + ("",) * 7 + ("Lung Opacity", "")

MODEL_LABELS: dict[str, tuple[str, ...]] = {
    "densenet121-res224-all": _ALL,
    "densenet121-res224-nih": _NIH,
    "densenet121-res224-pc": _PC,
    "densenet121-res224-chex": _CHEX,
    "densenet121-res224-rsna": _RSNA,
    "densenet121-res224-mimic_nb": _CHEX,
    "densenet121-res224-mimic_ch": _CHEX,
    "resnet50-res512-all": _ALL,
}


@dataclass(frozen=True)
class Geometry:
    """Where the model's square input came from in the source image."""

    source_rows: int
    source_columns: int
    crop_top: int
    crop_left: int
    crop_size: int
    resolution: int


@dataclass(frozen=True)
class Box:
    """A box in source pixel coordinates: columns [x0, x1), rows [y0, y1)."""

    x0: int
    y0: int
    x1: int
    y1: int

    def as_list(self) -> list[int]:
        return [self.x0, self.y0, self.x1, self.y1]


@dataclass(frozen=True)
class FindingResult:
    """One label's probability, its operating point, the decision and (when positive) boxes."""

    label: str
    probability: float
    threshold: float | None
    positive: bool
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class AlgorithmInfo:
    """Which model produced a result (PS3.16 TID 4019 Algorithm Identification)."""

    name: str
    version: str
    weights_sha256: str
    weights_status: str  # verified, unverified or untrained
    thresholds_source: str
    warning_label: str = ""  # non-empty for untrained or unverified weights
    card_sha256: str = ""  # the model card's SHA-256 (part of the model's identity)
    heatmaps: bool = True  # False: the model gives no heatmap (no CAM path)
    runtime: str = "torch"  # torch or onnxruntime

    @property
    def untrained(self) -> bool:
        return self.weights_status == "untrained"


NO_HEATMAP = "No heatmap from this model"


@dataclass(frozen=True)
class Analysis:
    """Everything the outputs of one analysed image are built from."""

    sop_instance_uid: str  # the analysed image
    study_revision: int
    algorithm: AlgorithmInfo
    findings: tuple[FindingResult, ...]  # positives first, then by probability
    cams: dict[str, np.ndarray]  # label -> CAM on the model's feature grid
    geometry: Geometry
    display: np.ndarray  # uint8 MONOCHROME2, long side <= outputs.max_size
    notes: tuple[str, ...] = ()


def reported_labels(model_name: str) -> tuple[str, ...]:
    """The findings ``model_name`` reports, sorted; empty for a name not in the catalogue."""
    return tuple(sorted(label for label in MODEL_LABELS.get(model_name, ()) if label))


def label_problems(
    labels_of: Mapping[str, Sequence[str] | None],
    thresholds: tuple[tuple[str, float], ...],
    critical_findings: tuple[str, ...],
) -> list[str]:
    """One config error line per unknown model name, or finding no configured model reports.

    ``labels_of``: each configured model name and the findings it reports (None: no such
    model, in the catalogue or installed with a card).  Finding names must match the models'
    labels exactly (case included): they are compared with the labels results carry, so a near
    miss would never match anything.  With several models a finding need only be one model's
    (each model uses the overrides it reports).
    """
    names = list(labels_of)
    unknown = [name for name in names if labels_of[name] is None]
    if unknown:
        return [
            f"model.name = {name!r}: must be one of {', '.join(MODEL_LABELS)}, or a model "
            "installed with its card (`dicom-node models list`)"
            for name in unknown
        ]
    labels = tuple(dict.fromkeys(label for name in names for label in labels_of[name] or ()))
    which = " and ".join(names)
    problems = []
    for label, _ in thresholds:
        if label not in labels:
            problems.append(
                f"thresholds.{label}: {which} reports no finding of that name"
                f"{_suggestion(label, labels)}"
            )
    for label in critical_findings:
        if label not in labels:
            problems.append(
                f"web.critical_findings: {label!r} is not a finding {which} "
                f"reports, so no study would ever be flagged for it"
                f"{_suggestion(label, labels)}"
            )
    return problems


def _suggestion(label: str, labels: tuple[str, ...]) -> str:
    """`` (did you mean 'X'?)`` for the closest label, or the full list when none is close."""
    close = difflib.get_close_matches(label, labels, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (allowed: {', '.join(labels)})"


class OutputKind(enum.StrEnum):
    """What kind of object an output is; the value is what an ``outputs.kind`` row stores."""

    SR = "sr"  # the Comprehensive SR report (or its "not analysed" form)
    SC = "sc"  # a heatmap Secondary Capture
    PM = "pm"  # a Parametric Map
    KOS = "kos"  # the IOCM rejection note withdrawing superseded results (PS3.3 A.35.4)
