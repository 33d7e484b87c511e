"""``dicom-node validate ...`` and ``dicom-node models promote|demote``: local validation.

Torch-free: a report is computed from the scores the worker stored.  No business logic here,
only calls into ``dicom_node.validation`` and the printing of their results; refusals are
``dicom_node.errors`` exceptions, turned into exit codes by ``cli.main``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.audit.trail import record_audit
from dicom_node.cli.db import command_engine
from dicom_node.cli.exits import ExitStatus
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.errors import ConfigError, PromotionRefusedError, ValidationInputError
from dicom_node.inference.card import model_labels
from dicom_node.validation import promotion
from dicom_node.validation.labels import import_labels
from dicom_node.validation.modes import effective_mode
from dicom_node.validation.report import ReportRequest, build_report, save_report
from dicom_node.validation.thresholds import apply_points

CLI_USER = "cli"


def run_validate_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Run one ``validate`` subcommand."""
    if args.validate_command == "labels":
        return _import_labels(settings, Path(args.file))
    if args.validate_command == "report":
        return _report(settings, args)
    return _apply_thresholds(settings, Path(args.report))


def run_mode_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """``models promote NAME [--force]`` and ``models demote NAME``."""
    with command_engine(settings) as engine:
        factory = make_session_factory(engine)
        try:
            with session_scope(factory) as session:
                if args.models_command == "promote":
                    message = promotion.promote(
                        session, settings, args.name, force=args.force, username=CLI_USER,
                        now=utcnow(),
                    )  # fmt: skip
                else:
                    message = promotion.demote(
                        session, settings, args.name, username=CLI_USER, now=utcnow()
                    )
        except PromotionRefusedError as exc:
            with session_scope(factory) as session:
                promotion.refuse(session, args.name, str(exc), username=CLI_USER, now=utcnow())
            raise
    print(message)
    return ExitStatus.OK


def _read(path: Path) -> bytes:
    """The file's bytes, or a ``ValidationInputError`` naming it."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValidationInputError(f"{path}: cannot be read ({exc.strerror})") from None


def _import_labels(settings: Settings, path: Path) -> ExitStatus:
    data = _read(path)
    findings = {
        label
        for spec in settings.model_specs
        for label in model_labels(spec.catalogue, settings.models_dir) or ()
    }
    with command_engine(settings) as engine, session_scope(make_session_factory(engine)) as session:
        summary = import_labels(session, data, findings, username=CLI_USER, now=utcnow())
        record_audit(
            session,
            event_type="validation.labels_imported",
            now=utcnow(),
            username=CLI_USER,
            file=path.name,
            sha256=summary.sha256,
            rows=summary.rows,
            studies=summary.studies,
            replaced=summary.replaced,
        )
    print(
        f"imported {summary.rows} label rows for {summary.studies} studies from {path.name} "
        f"(replacing {summary.replaced} earlier rows of those studies)"
    )
    return ExitStatus.OK


def _report(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    spec = promotion.configured_spec(settings, args.model)
    if args.target_sensitivity is not None and not 0 < args.target_sensitivity < 1:
        raise ConfigError([f"--target-sensitivity {args.target_sensitivity}: must be in (0, 1)"])
    since, until = _date(args.since, "--since"), _date(args.until, "--until")
    validation = settings.validation
    with command_engine(settings) as engine, session_scope(make_session_factory(engine)) as session:
        request = ReportRequest(
            model_name=spec.name,
            mode=effective_mode(session, spec)[0],
            since=since,
            until=until,
            target_sensitivity=args.target_sensitivity or validation.target_sensitivity,
            rule=args.rule or validation.rule,
            bootstrap_resamples=validation.bootstrap_resamples,
            min_cases=validation.min_cases,
        )
        now = utcnow()
        report = build_report(session, request, now)
        json_path, html_path, sha256 = save_report(
            session, report, Path(args.out), since=since, until=until, now=now
        )
        record_audit(
            session,
            event_type="validation.report",
            now=now,
            username=CLI_USER,
            model=spec.name,
            sha256=sha256,
            studies=report["studies"],
        )
    print(f"wrote {json_path} and {html_path} (report SHA-256 {sha256})")
    for name, finding in report["findings"].items():
        print(f"  {name}: {_summary(finding)}")
    return ExitStatus.OK


def _summary(finding: dict) -> str:
    counts = f"{finding['n_pos']} positive, {finding['n_neg']} negative"
    if finding["status"] != "ok":
        return f"{counts}: {finding['status']}"
    low, high = finding["auroc_ci"]
    proposed = finding["proposed"]
    return (
        f"{counts}; AUROC {finding['auroc']:.3f} [{low:.3f}, {high:.3f}]; proposed threshold "
        f"{proposed['threshold']:.4f} (sensitivity {proposed['sensitivity']:.3f}, "
        f"specificity {proposed['specificity']:.3f})"
    )


def _apply_thresholds(settings: Settings, path: Path) -> ExitStatus:
    data = _read(path)
    try:
        report = json.loads(data)
    except ValueError as exc:
        raise ValidationInputError(f"{path}: not a report.json ({exc})") from None
    if not isinstance(report, dict):
        raise ValidationInputError(f"{path}: not a report.json")
    promotion.configured_spec(settings, str(report.get("model", {}).get("name")))
    sha256 = hashlib.sha256(data).hexdigest()
    with command_engine(settings) as engine, session_scope(make_session_factory(engine)) as session:
        points = apply_points(session, report, sha256, username=CLI_USER, now=utcnow())
        record_audit(
            session,
            event_type="validation.thresholds_applied",
            now=utcnow(),
            username=CLI_USER,
            model=points.model_name,
            version=points.version,
            weights_sha256=points.weights_sha256,
            report_sha256=sha256,
            thresholds=dict(points.thresholds),
        )
    print(f"{points.label} for model {points.model_name} (weights {points.weights_sha256[:16]}…):")
    for name, value in sorted(points.thresholds.items()):
        print(f"  {name}: {value:.6f}")
    print("the worker uses them from its next batch on; every later SR names this version")
    return ExitStatus.OK


def _date(text: str | None, option: str) -> datetime | None:
    """``YYYY-MM-DD`` (UTC midnight) or an ISO 8601 time."""
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationInputError(f"{option} {text!r}: expected YYYY-MM-DD") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
