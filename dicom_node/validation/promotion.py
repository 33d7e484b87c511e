"""Going live, and back: ``dicom-node models promote NAME`` / ``demote NAME``.

A model goes live only on evidence: a validation report of its current weights (the same
SHA-256) written after those weights were installed.  ``--force`` promotes without one and
says so in the audit trail.  Either way an audit event (``model.promoted``, ``model.demoted``
or ``model.promotion_refused``) names the model, its weights and the report.  The node never
changes a model's mode by itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.audit.trail import FAILURE, record_audit
from dicom_node.clock import as_utc
from dicom_node.config.models import ModelMode, ModelSpec
from dicom_node.config.settings import Settings
from dicom_node.db.validation import ValidationReport
from dicom_node.errors import ConfigError, ModelError, PromotionRefusedError
from dicom_node.inference.registry import read_registry
from dicom_node.store import file_sha256
from dicom_node.validation.modes import record_mode_change

UNTRAINED_SHA256 = "0" * 64


@dataclass(frozen=True)
class Weights:
    sha256: str
    installed_at: datetime | None  # None: unknown (untrained)


def configured_spec(settings: Settings, name: str) -> ModelSpec:
    """The configured model called ``name`` (``ConfigError`` naming the configured ones)."""
    for spec in settings.model_specs:
        if spec.name == name:
            return spec
    names = ", ".join(spec.name for spec in settings.model_specs)
    raise ConfigError([f"no configured model is called {name!r} (configured: {names})"])


def current_weights(settings: Settings, spec: ModelSpec) -> Weights:
    """The SHA-256 of the weights the worker loads for ``spec`` (as ``load_bundle`` finds
    them), and when they were installed; without loading the network."""
    if spec.weights:
        path = Path(spec.weights)
        if not path.is_file():
            raise ModelError(f"model {spec.name}: weights file {path} does not exist")
        return Weights(file_sha256(path), datetime.fromtimestamp(os.path.getmtime(path), UTC))
    record = read_registry(settings.models_dir).get(spec.catalogue)
    if record is not None:
        return Weights(record.sha256, datetime.fromisoformat(record.recorded_at))
    if spec.allow_untrained:
        return Weights(UNTRAINED_SHA256, None)
    raise ModelError(f"model {spec.name}: no weights installed for {spec.catalogue}")


def evidence(session: Session, name: str, weights: Weights) -> ValidationReport | None:
    """The latest report of these weights written after they were installed."""
    query = select(ValidationReport).where(
        ValidationReport.model_name == name, ValidationReport.weights_sha256 == weights.sha256
    )
    reports = list(session.scalars(query.order_by(ValidationReport.id.desc())))
    installed = weights.installed_at
    for report in reports:
        if installed is None or as_utc(report.generated_at) >= installed:
            return report
    return None


def promote(
    session: Session,
    settings: Settings,
    name: str,
    *,
    force: bool,
    username: str | None,
    now: datetime,
) -> str:
    """Make ``name`` live; ``PromotionRefusedError`` (audited) without evidence or force."""
    spec = configured_spec(settings, name)
    weights = current_weights(settings, spec)
    report = evidence(session, name, weights)
    if report is None and not force:
        raise PromotionRefusedError(
            f"model {name} has no validation report of its current weights "
            f"(SHA-256 {weights.sha256[:16]}…): run `dicom-node validate report --model "
            f"{name} --out DIR` first, or promote with --force"
        )
    record_mode_change(
        session,
        model_name=name,
        mode=ModelMode.LIVE,
        weights_sha256=weights.sha256,
        report_sha256=report.sha256 if report else None,
        forced=report is None,
        username=username,
        now=now,
    )
    record_audit(
        session,
        event_type="model.promoted",
        now=now,
        username=username,
        model=name,
        weights_sha256=weights.sha256,
        report_sha256=report.sha256 if report else None,
        forced=report is None,
    )
    basis = f"report {report.sha256[:12]}" if report else "FORCED, no validation report"
    return f"model {name} is live from the next study on ({basis})"


def refuse(
    session: Session, name: str, reason: str, *, username: str | None, now: datetime
) -> None:
    """The audit event of a refused promotion (the caller writes it in its own transaction:
    the refused one was rolled back)."""
    record_audit(
        session,
        event_type="model.promotion_refused",
        now=now,
        outcome=FAILURE,
        username=username,
        model=name,
        reason=reason,
    )


def demote(
    session: Session, settings: Settings, name: str, *, username: str | None, now: datetime
) -> str:
    """Put ``name`` in shadow mode (audited)."""
    spec = configured_spec(settings, name)
    try:
        sha256 = current_weights(settings, spec).sha256
    except ModelError:
        sha256 = ""  # weights gone: demoting must still work
    record_mode_change(
        session,
        model_name=name,
        mode=ModelMode.SHADOW,
        weights_sha256=sha256,
        report_sha256=None,
        forced=False,
        username=username,
        now=now,
    )
    record_audit(session, event_type="model.demoted", now=now, username=username, model=name)
    return f"model {name} is in shadow mode from the next study on"
