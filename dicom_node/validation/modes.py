"""Which mode each configured model is in now: the configuration's, unless ``models
promote`` / ``demote`` recorded a change since (the latest change wins).

A change records the weights it was made for (and the report that allowed it), so the
admin page and the audit trail can say which weights went live on which evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config.models import ModelMode, ModelSpec
from dicom_node.db.validation import ModelModeChange


@dataclass(frozen=True)
class ModelTarget:
    """What an analysis job is queued for: the model's name and its mode at that moment."""

    name: str
    mode: str


def latest_change(session: Session, model_name: str) -> ModelModeChange | None:
    """The model's latest recorded mode change, if any."""
    return session.scalars(
        select(ModelModeChange)
        .where(ModelModeChange.model_name == model_name)
        .order_by(ModelModeChange.id.desc())
        .limit(1)
    ).first()


def effective_mode(session: Session, spec: ModelSpec) -> tuple[str, str]:
    """The model's mode and where it comes from ("configuration" or "promoted/demoted at
    ... by ...")."""
    change = latest_change(session, spec.name)
    if change is None:
        return spec.mode, "configuration"
    verb = "promoted" if change.mode == ModelMode.LIVE else "demoted"
    by = f" by {change.changed_by}" if change.changed_by else ""
    return change.mode, f"{verb} {change.changed_at:%Y-%m-%d %H:%M} UTC{by}"


def model_targets(session: Session, specs: Sequence[ModelSpec]) -> list[ModelTarget]:
    """The jobs a closing study gets: one per configured model, in its current mode."""
    return [ModelTarget(spec.name, effective_mode(session, spec)[0]) for spec in specs]


def record_mode_change(
    session: Session,
    *,
    model_name: str,
    mode: str,
    weights_sha256: str,
    report_sha256: str | None,
    forced: bool,
    username: str | None,
    now: datetime,
) -> ModelModeChange:
    """Record a promote or demote (the caller writes the audit event in the same
    transaction)."""
    change = ModelModeChange(
        model_name=model_name,
        mode=mode,
        weights_sha256=weights_sha256,
        report_sha256=report_sha256,
        forced=forced,
        changed_at=now,
        changed_by=username,
    )
    session.add(change)
    session.flush()
    return change
