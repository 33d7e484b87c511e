"""The analysis of one study revision, stage by stage, in the order the stages run.

select the image (rows only) -> prepare the model input -> classify (one batched forward
for the jobs of a claim) -> localise the positives -> build the outputs -> write them ->
store the result and complete the job, queueing the deliveries in the same transaction.
A job that has nothing to analyse ends instead with its "not analysed" SR
(:func:`not_analysed_outputs`, then :func:`store_outputs` as the job ends).

Each stage is a plain function on frozen values and raises ``dicom_node.errors`` exceptions
on failure; ``jobs.loop.job_state_for`` decides what a failure does to the job.  The worker
(``jobs.worker``) only leases, batches and calls these functions.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import structlog
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.db.models import AnalysisResult, Finding, Instance, Series, Study
from dicom_node.db.session import session_scope
from dicom_node.errors import (
    DicomNodeError,
    InvalidInstanceError,
    JobLeaseLostError,
    StorageError,
    UnsupportedStudyError,
)
from dicom_node.events import record_event
from dicom_node.inference.localization import boxes_from_cams
from dicom_node.inference.preprocess import PreparedImage, prepare
from dicom_node.jobs.cams import cam_path, heatmap_path, write_cams
from dicom_node.jobs.outputs import build_not_analysed, build_result_outputs
from dicom_node.jobs.queue import Lease, complete
from dicom_node.jobs.records import WrittenOutput, queue_deliveries, record_outputs
from dicom_node.outputs.build import BuiltOutput
from dicom_node.results import AlgorithmInfo, Analysis, Box, FindingResult
from dicom_node.selection import Selection, select_image
from dicom_node.validation.features import header_features

if TYPE_CHECKING:  # the model framework is loaded by the worker, not by importers
    from dicom_node.inference.classify import ImageScores
    from dicom_node.inference.models import ModelBundle

log = structlog.get_logger(__name__)
# Errors that are the disk's, not the outputs': they reach the job (wait for space, retry).
_DISK_ERRORS = (OSError, StorageError, JobLeaseLostError)


@dataclass(frozen=True)
class PreparedJob:
    lease: Lease
    selection: Selection
    image: PreparedImage
    features: Mapping[str, float | str | None] = field(default_factory=dict)  # for drift


@dataclass(frozen=True)
class Decision:
    """One label's probability against its operating point (``threshold`` None: no decision)."""

    index: int  # the model output
    label: str
    probability: float
    threshold: float | None
    positive: bool


@dataclass(frozen=True)
class ClassifiedJob:
    prepared: PreparedJob
    decisions: tuple[Decision, ...]
    cams: np.ndarray | None  # (K, h, w) for every model output; None: no heatmap


@dataclass(frozen=True)
class JobResult:
    prepared: PreparedJob
    findings: tuple[FindingResult, ...]  # positives first, then by probability
    cams: np.ndarray | None  # (K, h, w) for every model output; None: no heatmap


def select_for_job(session: Session, lease: Lease, settings: Settings) -> Selection:
    """Choose the image of the job's study revision to analyse (gating), from the rows.

    Images the retention purge removed (a study re-opened after its purge) are not candidates:
    the choice is made among the images still stored, and a skip says how many were purged.
    """
    study = session.get(Study, lease.study_instance_uid)
    if study is None:
        raise InvalidInstanceError(f"study {lease.study_instance_uid} has no rows")
    instances = list(
        session.scalars(
            select(Instance).where(
                Instance.study_instance_uid == lease.study_instance_uid,
                Instance.study_revision <= lease.study_revision,
            )
        )
    )
    series = {
        row.series_instance_uid: row.series_description
        for row in session.scalars(
            select(Series).where(Series.study_instance_uid == lease.study_instance_uid)
        )
    }
    stored = [instance for instance in instances if instance.purged_at is None]
    try:
        return select_image(study, stored, settings.analysis, series)
    except UnsupportedStudyError as exc:
        purged = len(instances) - len(stored)
        if not purged:
            raise
        raise UnsupportedStudyError(
            f"{exc}; {purged} earlier image(s) purged by retention"
        ) from None


def prepare_job(
    lease: Lease, selection: Selection, settings: Settings, resolution: int
) -> PreparedJob:
    """Build the model input (and the heatmaps' display copy) from the selected image, and
    read the header fields the drift monitor compares."""
    path = Path(settings.storage.root) / selection.path
    image = prepare(
        path,
        resolution=resolution,
        max_megapixels=settings.analysis.max_megapixels,
        apply_lut=settings.analysis.apply_voi_lut,
        display_size=settings.outputs.sc_max_size,
    )
    return PreparedJob(lease, selection, image, header_features(path))


def classify_jobs(
    bundle: ModelBundle, jobs: list[PreparedJob], box_threshold: float
) -> list[JobResult]:
    """Classify the jobs in one batched forward, then localise each one's positives."""
    return [localise(job, box_threshold) for job in classify(bundle, jobs)]


def classify(bundle: ModelBundle, jobs: list[PreparedJob]) -> list[ClassifiedJob]:
    """One batched forward; per job each trained label's probability and decision."""
    from dicom_node.inference.classify import classify_batch  # torch: only when a model runs

    scores = classify_batch(bundle, np.stack([job.image.pixels for job in jobs]))
    return [
        ClassifiedJob(job, _decisions(bundle, score), score.cams)
        for job, score in zip(jobs, scores, strict=True)
    ]


def _decisions(bundle: ModelBundle, scores: ImageScores) -> tuple[Decision, ...]:
    decided = []
    for index, label in enumerate(bundle.card.labels):
        if not label:
            continue  # an output this model was not trained on
        probability = float(scores.probabilities[index])
        threshold = bundle.thresholds[index]
        decided.append(
            Decision(
                index,
                label,
                probability,
                threshold,
                threshold is not None and probability >= threshold,
            )
        )
    return tuple(decided)


def localise(job: ClassifiedJob, box_threshold: float) -> JobResult:
    """Boxes (in source pixels) for the positive labels from their CAMs (none for a model
    without heatmaps); the findings."""
    positives = [decision.index for decision in job.decisions if decision.positive]
    boxes: dict[int, tuple[Box, ...]] = {}
    if positives and job.cams is not None:
        found = boxes_from_cams(job.cams[positives], job.prepared.image.geometry, box_threshold)
        boxes = {index: tuple(b) for index, b in zip(positives, found, strict=True)}
    findings = [
        FindingResult(d.label, d.probability, d.threshold, d.positive, boxes.get(d.index, ()))
        for d in job.decisions
    ]
    findings.sort(key=lambda f: (not f.positive, -f.probability))
    return JobResult(job.prepared, tuple(findings), job.cams)


def algorithm_of(bundle: ModelBundle) -> AlgorithmInfo:
    """What the outputs say about the model that produced them."""
    return AlgorithmInfo(
        bundle.model_name,
        bundle.card.version,
        bundle.weights_sha256,
        bundle.weights_status,
        bundle.thresholds_source,
        bundle.warning_label or "",
        card_sha256=bundle.card.card_sha256,
        heatmaps=bundle.runtime.heatmaps,
        runtime=bundle.runtime.kind,
    )


def analysis_of(result: JobResult, bundle: ModelBundle) -> Analysis:
    """The outputs' view of a classified job."""
    prepared = result.prepared
    cams = (
        {}
        if result.cams is None
        else {label: result.cams[i] for i, label in enumerate(bundle.card.labels) if label}
    )
    return Analysis(
        prepared.selection.sop_instance_uid,
        prepared.lease.study_revision,
        algorithm_of(bundle),
        result.findings,
        cams,
        prepared.image.geometry,
        # prepare_job always asks for the display copy (outputs.sc_max_size is 256-8192)
        cast(np.ndarray, prepared.image.display),
        tuple(prepared.selection.notes),
    )


def build_outputs(
    result: JobResult,
    bundle: ModelBundle,
    settings: Settings,
    factory: sessionmaker[Session],
    now: datetime,
) -> list[BuiltOutput]:
    """SR and SCs (and a rejection note when due) of an analysed job.

    Outputs that cannot be built (a source highdicom refuses, say) leave the result standing:
    none are built and an ``outputs.not_built`` event says why.
    """
    prepared = result.prepared
    try:
        return build_result_outputs(
            analysis_of(result, bundle),
            prepared.lease,
            Path(settings.storage.root) / prepared.selection.path,
            settings,
            factory,
            now,
        )
    except _DISK_ERRORS:
        raise
    except Exception as exc:
        return _not_built(prepared.lease, exc, factory, now)


def store_result(
    session: Session,
    result: JobResult,
    bundle: ModelBundle,
    *,
    storage_root: Path,
    now: datetime,
    written: Sequence[WrittenOutput] = (),
    peers: tuple[PeerSettings, ...] = (),
    min_free_mb: int = 0,
) -> None:
    """Write the CAMs; record the result, findings and outputs, queue deliveries, and
    complete the job, all in one transaction (fenced on the lease: ``JobLeaseLostError``).

    The CAM archive keeps the ``[storage] min_free_mb`` reserve (``InsufficientSpaceError``).
    """
    lease = result.prepared.lease
    relative = cam_path(lease.study_instance_uid, lease.job_id, lease.attempt)
    write_cams(
        storage_root,
        relative,
        result.cams,
        bundle.card.labels,
        result.prepared.image.geometry,
        min_free_mb=min_free_mb,
    )
    record_result(session, result, bundle, relative, now)
    store_outputs(session, lease, written, peers, now)
    complete(session, lease, now=now)


def record_result(
    session: Session, result: JobResult, bundle: ModelBundle, cams_path: str, now: datetime
) -> None:
    """The ``analysis_results`` row and one ``findings`` row per label."""
    lease, selection = result.prepared.lease, result.prepared.selection
    notes = list(selection.notes)
    if bundle.warning_label:
        notes.insert(0, bundle.warning_label)
    session.add(
        AnalysisResult(
            job_id=lease.job_id,
            study_instance_uid=lease.study_instance_uid,
            sop_instance_uid=selection.sop_instance_uid,
            model_name=bundle.model_name,
            model_version=bundle.card.version,
            card_sha256=bundle.card.card_sha256,
            runtime=bundle.runtime.kind,
            weights_sha256=bundle.weights_sha256,
            weights_status=bundle.weights_status,
            thresholds_source=bundle.thresholds_source[:64],
            thresholds_version=bundle.thresholds_version or None,
            mode=lease.mode,
            features=json.dumps(dict(result.prepared.features), sort_keys=True),
            notes="; ".join(notes) or None,
            created_at=now,
        )
    )
    session.flush()
    session.execute(
        insert(Finding),
        [
            {  # one executemany, not one ORM object per finding
                "job_id": lease.job_id,
                "label": finding.label,
                "probability": finding.probability,
                "threshold": finding.threshold,
                "positive": finding.positive,
                "boxes": json.dumps([b.as_list() for b in finding.boxes])
                if finding.positive
                else None,
                "heatmap_path": heatmap_path(cams_path, finding.label)
                if result.cams is not None
                else None,
            }
            for finding in result.findings
        ],
    )


def not_analysed_outputs(
    lease: Lease,
    reason: str,
    bundle: ModelBundle,
    settings: Settings,
    factory: sessionmaker[Session],
    now: datetime,
) -> list[BuiltOutput]:
    """The "not analysed" SR naming ``reason`` (and a rejection note when due), when
    ``[outputs] report_not_analysed``; like results, outputs that cannot be built are an
    ``outputs.not_built`` event, not a failure."""
    if not settings.outputs.report_not_analysed:
        return []
    try:
        return build_not_analysed(lease, reason, algorithm_of(bundle), settings, factory, now)
    except _DISK_ERRORS:
        raise
    except Exception as exc:
        return _not_built(lease, exc, factory, now)


def store_outputs(
    session: Session,
    lease: Lease,
    written: Sequence[WrittenOutput],
    peers: tuple[PeerSettings, ...],
    now: datetime,
) -> None:
    """Record the written outputs and queue their deliveries, in the transaction that ends
    the job (nothing is queued when nothing was written)."""
    if written:
        record_outputs(
            session,
            written,
            job_id=lease.job_id,
            study_instance_uid=lease.study_instance_uid,
            study_revision=lease.study_revision,
            now=now,
        )
        queue_deliveries(
            session,
            study_instance_uid=lease.study_instance_uid,
            study_revision=lease.study_revision,
            peers=peers,
            now=now,
        )


def _not_built(
    lease: Lease, exc: Exception, factory: sessionmaker[Session], now: datetime
) -> list[BuiltOutput]:
    error = str(exc) if isinstance(exc, DicomNodeError) else type(exc).__name__
    log.warning("outputs.not_built", job_id=lease.job_id, error=error)
    with session_scope(factory) as session:
        record_event(
            session,
            "outputs.not_built",
            now=now,
            level="warning",
            job_id=lease.job_id,
            study_instance_uid=lease.study_instance_uid,
            error=error,
        )
    return []
