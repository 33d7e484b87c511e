"""The contract between analysis and outputs: plain frozen values, no torch, no database.

The worker turns a classified job into an :class:`Analysis`; the output builders
(``outputs/sr``, ``outputs/sc``, ``outputs/pm``) read nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.inference.preprocess import Geometry
from dicom_node.inference.localization import Box


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
    weights_status: str          # verified, unverified or untrained
    thresholds_source: str
    warning_label: str = ""      # non-empty for untrained or unverified weights

    @property
    def untrained(self) -> bool:
        return self.weights_status == "untrained"


@dataclass(frozen=True)
class Analysis:
    """Everything the outputs of one analysed image are built from."""

    sop_instance_uid: str                 # the analysed image
    study_revision: int
    algorithm: AlgorithmInfo
    findings: tuple[FindingResult, ...]   # positives first, then by probability
    cams: dict[str, np.ndarray]           # label -> CAM on the model's feature grid
    geometry: Geometry
    display: np.ndarray                   # uint8 MONOCHROME2, long side <= outputs.max_size
    notes: tuple[str, ...] = ()
