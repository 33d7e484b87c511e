"""The site's operating points: versions written from a validation report, never by the node.

``dicom-node validate thresholds apply REPORT`` writes the thresholds a report proposes as a
new version for that model, tied to the weights (SHA-256) the report measured and to the
report's own SHA-256.  The worker uses the latest version whose weights are the ones it
loaded; results, SRs and the admin page name that version.  Weights that were not validated
keep the model's (or ``[thresholds]``') values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.db.validation import OperatingPoints
from dicom_node.errors import ValidationInputError


@dataclass(frozen=True)
class SitePoints:
    """One version of a model's operating points."""

    model_name: str
    version: int
    weights_sha256: str
    report_sha256: str
    thresholds: Mapping[str, float]

    @property
    def label(self) -> str:
        """How outputs name the version (fits ``thresholds_source``)."""
        return f"site operating points v{self.version} (report {self.report_sha256[:12]})"


def current_points(session: Session, model_name: str, weights_sha256: str) -> SitePoints | None:
    """The latest version for these weights, or None."""
    row = session.scalars(
        select(OperatingPoints)
        .where(
            OperatingPoints.model_name == model_name,
            OperatingPoints.weights_sha256 == weights_sha256,
        )
        .order_by(OperatingPoints.version.desc())
        .limit(1)
    ).first()
    return _points(row) if row is not None else None


def _points(row: OperatingPoints) -> SitePoints:
    return SitePoints(
        row.model_name,
        row.version,
        row.weights_sha256,
        row.report_sha256,
        json.loads(row.thresholds),
    )


def proposed_thresholds(report: Mapping[str, Any]) -> dict[str, float]:
    """The thresholds a report proposes, per finding with enough cases."""
    proposed = {}
    for finding, values in report.get("findings", {}).items():
        point = values.get("proposed") if isinstance(values, Mapping) else None
        if isinstance(point, Mapping) and isinstance(point.get("threshold"), (int, float)):
            proposed[str(finding)] = float(point["threshold"])
    return proposed


def apply_points(
    session: Session,
    report: Mapping[str, Any],
    report_sha256: str,
    *,
    username: str | None,
    now: datetime,
) -> SitePoints:
    """Write the report's proposed thresholds as the model's next version."""
    model = report.get("model")
    if not isinstance(model, Mapping) or not model.get("name") or not model.get("weights_sha256"):
        raise ValidationInputError("the report names no model and weights: not a report file")
    thresholds = proposed_thresholds(report)
    if not thresholds:
        raise ValidationInputError(
            "the report proposes no operating point (every finding had too few cases)"
        )
    name = str(model["name"])
    latest = session.scalar(
        select(func.max(OperatingPoints.version)).where(OperatingPoints.model_name == name)
    )
    row = OperatingPoints(
        model_name=name,
        version=(latest or 0) + 1,
        weights_sha256=str(model["weights_sha256"]),
        report_sha256=report_sha256,
        thresholds=json.dumps(thresholds, sort_keys=True),
        applied_at=now,
        applied_by=username,
    )
    session.add(row)
    session.flush()
    return _points(row)
