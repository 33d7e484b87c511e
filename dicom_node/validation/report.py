"""The local validation report of one model: its stored scores against the site's truth.

For each finding with labels: counts; AUROC with its DeLong 95% CI and a stratified bootstrap
CI as a check; sensitivity, specificity, PPV and NPV at the operating point in force, each
with a Wilson 95% CI; the expected calibration error over 15 equal-width bins and its
reliability diagram; the ROC curve; the share of labelled boxes hit at IoBB 0.1 / 0.25 / 0.5
(ChestX-ray8, Wang et al. 2017); and the proposed operating point (a target sensitivity or
Youden's J).  A finding with fewer than ``[validation] min_cases`` positives or negatives
gets its counts and "too few cases", never an AUROC.

Only results of one set of weights are measured: the weights of the model's latest result
in the period (a report is evidence about those weights, see ``models promote``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dicom_node.db.models import AnalysisResult, Finding, Job, JobState
from dicom_node.db.validation import ValidationReport
from dicom_node.errors import ValidationInputError
from dicom_node.validation import stats
from dicom_node.validation.labels import StudyLabel, study_labels
from dicom_node.validation.thresholds import current_points

TOO_FEW = "too few cases"
IOBB_THRESHOLDS = (0.1, 0.25, 0.5)


@dataclass(frozen=True)
class ReportRequest:
    model_name: str
    mode: str
    since: datetime | None = None
    until: datetime | None = None
    target_sensitivity: float = 0.95
    rule: str = "sensitivity"
    bootstrap_resamples: int = 2000
    min_cases: int = 10


@dataclass(frozen=True)
class Scores:
    """One finding's scores over the measured studies, in study order."""

    studies: list[str]
    probability: np.ndarray
    threshold: float | None  # the latest result's (the operating point in force, unless the
    # site's operating points for these weights say otherwise)
    boxes: list[list[list[float]]]  # predicted boxes (x0, y0, x1, y1) per study


def build_report(session: Session, request: ReportRequest, now: datetime) -> dict[str, Any]:
    """The report as a JSON-ready dict (keys as in the manual)."""
    results = _latest_results(session, request)
    if not results:
        raise ValidationInputError(
            f"no analysis results of model {request.model_name!r} in the period"
        )
    newest = max(results, key=lambda r: r.job_id)
    results = [r for r in results if r.weights_sha256 == newest.weights_sha256]
    points = current_points(session, request.model_name, newest.weights_sha256)
    in_force = dict(points.thresholds) if points else {}
    scores = _scores(session, results)
    truth = study_labels(session, scores)
    labelled = {finding for _, finding in truth}
    findings = {
        name: _finding(values, truth, name, request, in_force.get(name, values.threshold))
        for name, values in sorted(scores.items())
        if name in labelled  # findings with labels only
    }
    return {
        "model": {
            "name": request.model_name,
            "version": newest.model_version,
            "weights_sha256": newest.weights_sha256,
            "weights_status": newest.weights_status,
            "mode": request.mode,
        },
        "generated_at": now.isoformat(),
        "period": {
            "since": request.since.isoformat() if request.since else None,
            "until": request.until.isoformat() if request.until else None,
        },
        "studies": len(results),
        "labelled_studies": len({study for study, _ in truth}),
        "thresholds_version": points.label if points else "model defaults",
        "settings": {
            "target_sensitivity": request.target_sensitivity,
            "rule": request.rule,
            "bootstrap_resamples": request.bootstrap_resamples,
            "ece_bins": 15,
            "min_cases": request.min_cases,
        },
        "findings": findings,
    }


def _latest_results(session: Session, request: ReportRequest) -> list[AnalysisResult]:
    """Each study's latest finished result of the model in the period."""
    conditions = [
        AnalysisResult.model_name == request.model_name,
        Job.state == JobState.DONE.value,
    ]
    if request.since is not None:
        conditions.append(AnalysisResult.created_at >= request.since)
    if request.until is not None:
        conditions.append(AnalysisResult.created_at < request.until)
    latest = (
        select(func.max(AnalysisResult.job_id))
        .join(Job, Job.id == AnalysisResult.job_id)
        .where(*conditions)
        .group_by(AnalysisResult.study_instance_uid)
    )
    return list(
        session.scalars(
            select(AnalysisResult)
            .where(AnalysisResult.job_id.in_(latest))
            .order_by(AnalysisResult.job_id)
        )
    )


def _scores(session: Session, results: list[AnalysisResult]) -> dict[str, Scores]:
    study_of = {r.job_id: r.study_instance_uid for r in results}
    columns: dict[str, tuple[list[str], list[float], list[list[list[float]]]]] = {}
    threshold: dict[str, tuple[int, float | None]] = {}
    ids = sorted(study_of)
    for start in range(0, len(ids), 500):
        for job_id, label, probability, limit, boxes in session.execute(
            select(
                Finding.job_id, Finding.label, Finding.probability, Finding.threshold, Finding.boxes
            ).where(Finding.job_id.in_(ids[start : start + 500]))
        ):
            studies, values, predicted = columns.setdefault(label, ([], [], []))
            studies.append(study_of[job_id])
            values.append(probability)
            predicted.append(json.loads(boxes) if boxes else [])
            if job_id >= threshold.get(label, (-1, None))[0]:
                threshold[label] = (job_id, limit)
    return {
        label: Scores(studies, np.asarray(values, dtype=float), threshold[label][1], boxes)
        for label, (studies, values, boxes) in columns.items()
    }


def _finding(
    scores: Scores,
    truth: Mapping[tuple[str, str], StudyLabel],
    name: str,
    request: ReportRequest,
    threshold: float | None,
) -> dict[str, Any]:
    keep = [i for i, study in enumerate(scores.studies) if (study, name) in truth]
    y_true = np.asarray([truth[(scores.studies[i], name)].label for i in keep], dtype=int)
    y_score = scores.probability[keep]
    n_pos, n_neg = int(y_true.sum()), int(len(y_true) - y_true.sum())
    sources = sorted({truth[(scores.studies[i], name)].source for i in keep})
    base: dict[str, Any] = {"n_pos": n_pos, "n_neg": n_neg, "label_sources": sources}
    if min(n_pos, n_neg) < request.min_cases:
        return {**base, "status": TOO_FEW, "auroc": None}
    return {
        **base,
        "status": "ok",
        **_discrimination(y_true, y_score, request),
        **_at_threshold(y_true, y_score, threshold),
        **_calibration(y_true, y_score),
        **_localization(scores, truth, name, keep),
        "proposed": _proposed(y_true, y_score, request),
    }


def _discrimination(y_true: np.ndarray, y_score: np.ndarray, request: ReportRequest) -> dict:
    fpr, tpr, _ = stats.roc_points(y_true, y_score)
    return {
        "auroc": stats.auroc(y_true, y_score),
        "auroc_ci": stats.delong_ci(y_true, y_score).as_list(),
        "auroc_ci_bootstrap": stats.bootstrap_ci(
            y_true, y_score, n_resamples=request.bootstrap_resamples
        ).as_list(),
        "roc": {"fpr": _rounded(fpr), "tpr": _rounded(tpr)},
    }


def _at_threshold(y_true: np.ndarray, y_score: np.ndarray, threshold: float | None) -> dict:
    if threshold is None:
        names = ("sensitivity", "specificity", "ppv", "npv")
        return {"threshold": None, **{n: None for n in names}, **{f"{n}_ci": None for n in names}}
    confusion = stats.confusion_at(y_true, y_score, threshold)
    values: dict[str, Any] = {"threshold": threshold}
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        rate = getattr(confusion, name)
        values[name] = rate.value
        values[f"{name}_ci"] = rate.ci.as_list() if rate.ci is not None else None
    values.update(tp=confusion.tp, fp=confusion.fp, tn=confusion.tn, fn=confusion.fn)
    return values


def _calibration(y_true: np.ndarray, y_score: np.ndarray) -> dict:
    ece, bins = stats.calibration(y_true, y_score, n_bins=15)
    return {
        "ece": ece,
        "reliability": {
            "bin_edges": list(bins.bin_edges),
            "counts": list(bins.counts),
            "mean_predicted": list(bins.mean_predicted),
            "fraction_positive": list(bins.fraction_positive),
        },
    }


def _localization(
    scores: Scores, truth: Mapping[tuple[str, str], StudyLabel], name: str, keep: list[int]
) -> dict:
    cases = []
    for i in keep:
        label = truth[(scores.studies[i], name)]
        if label.label == 1 and label.boxes:
            cases.append((label.boxes, scores.boxes[i]))
    n_boxes = sum(len(boxes) for boxes, _ in cases)
    rates = stats.iobb_hit_rates(cases, IOBB_THRESHOLDS) if cases else None
    return {"iobb_hit_rate": rates, "n_boxes": n_boxes}


def _proposed(y_true: np.ndarray, y_score: np.ndarray, request: ReportRequest) -> dict:
    if request.rule == "youden":
        point = stats.threshold_youden(y_true, y_score)
    else:
        point = stats.threshold_for_sensitivity(y_true, y_score, request.target_sensitivity)
    return {
        "rule": point.rule,
        "threshold": point.threshold,
        "sensitivity": point.sensitivity,
        "specificity": point.specificity,
        "sensitivity_ci_low": point.sensitivity_ci_low,
    }


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]


def report_bytes(report: Mapping[str, Any]) -> bytes:
    """The report's JSON as written (its SHA-256 identifies the report)."""
    return (json.dumps(report, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def save_report(
    session: Session,
    report: Mapping[str, Any],
    out_dir: Path,
    *,
    since: datetime | None,
    until: datetime | None,
    now: datetime,
) -> tuple[Path, Path, str]:
    """Write ``report.json`` and ``report.html`` into ``out_dir`` and record the report;
    returns both paths and the JSON's SHA-256."""
    from dicom_node.validation.html import render_report_html

    data = report_bytes(report)
    sha256 = hashlib.sha256(data).hexdigest()
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    json_path.write_bytes(data)
    html_path.write_text(render_report_html(report), encoding="utf-8")
    if session.scalar(select(ValidationReport.id).where(ValidationReport.sha256 == sha256)):
        return json_path, html_path, sha256
    session.add(
        ValidationReport(
            model_name=report["model"]["name"],
            weights_sha256=report["model"]["weights_sha256"],
            sha256=sha256,
            generated_at=now,
            period_since=since,
            period_until=until,
            studies=report["studies"],
            body=data.decode(),
        )
    )
    return json_path, html_path, sha256
