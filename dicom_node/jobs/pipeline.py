"""The analysis stages in their one fixed order: select, prepare, classify, localize, store.

``prepare_job`` runs per job (selection and preprocessing); ``classify_jobs`` runs one
batched forward over the prepared jobs of a claim; ``store_result`` writes each job's result
and completes the job in one transaction, fenced on its lease.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from dicom_node.config.settings import PeerSettings, Settings
from dicom_node.db.models import AnalysisResult, Finding, Instance, Series, Study
from dicom_node.errors import InvalidInstanceError, UnsupportedStudyError
from dicom_node.inference.classify import ImageScores, classify_batch
from dicom_node.inference.models import ModelBundle
from dicom_node.inference.preprocess import Geometry, PreparedImage, prepare
from dicom_node.jobs.queue import Lease, complete
from dicom_node.jobs.space import require_free_space
from dicom_node.inference.localization import boxes_from_cams
from dicom_node.outputs.records import WrittenOutput, record_outputs
from dicom_node.results import AlgorithmInfo, Analysis, FindingResult
from dicom_node.selection import Selection, select_image
from dicom_node.store import write_atomic

RESULTS_DIR = "results"


@dataclass(frozen=True)
class PreparedJob:
    lease: Lease
    selection: Selection
    image: PreparedImage


@dataclass(frozen=True)
class JobResult:
    prepared: PreparedJob
    findings: tuple[FindingResult, ...]   # positives first, then by probability
    cams: np.ndarray                      # (K, h, w) for every reported label


def select_for_job(session: Session, lease: Lease, settings: Settings) -> Selection:
    """Choose the image of the job's study revision to analyse (gating), from the rows.

    Images the retention purge removed (a study re-opened after its purge) are not candidates:
    the choice is made among the images still stored, and a skip says how many were purged.
    """
    study = session.get(Study, lease.study_instance_uid)
    if study is None:
        raise InvalidInstanceError(f"study {lease.study_instance_uid} has no rows")
    instances = list(session.scalars(select(Instance).where(
        Instance.study_instance_uid == lease.study_instance_uid,
        Instance.study_revision <= lease.study_revision)))
    series = {row.series_instance_uid: row.series_description for row in session.scalars(
        select(Series).where(Series.study_instance_uid == lease.study_instance_uid))}
    stored = [instance for instance in instances if instance.purged_at is None]
    try:
        return select_image(study, stored, settings.analysis, series)
    except UnsupportedStudyError as exc:
        purged = len(instances) - len(stored)
        if not purged:
            raise
        raise UnsupportedStudyError(
            f"{exc}; {purged} earlier image(s) purged by retention") from None


def prepare_job(lease: Lease, selection: Selection, settings: Settings,
                resolution: int) -> PreparedJob:
    """Build the model input (and the heatmaps' display copy) from the selected image."""
    image = prepare(Path(settings.storage.root) / selection.path, resolution=resolution,
                    max_megapixels=settings.analysis.max_megapixels,
                    apply_lut=settings.analysis.apply_voi_lut,
                    display_size=settings.outputs.sc_max_size)
    return PreparedJob(lease, selection, image)


def classify_jobs(bundle: ModelBundle, jobs: list[PreparedJob], box_threshold: float
                  ) -> list[JobResult]:
    """One batched forward; then per job the findings, decisions and boxes."""
    scores = classify_batch(bundle, np.stack([job.image.pixels for job in jobs]))
    return [_job_result(bundle, job, score, box_threshold) for job, score in zip(jobs, scores)]


def _job_result(bundle: ModelBundle, job: PreparedJob, scores: ImageScores,
                box_threshold: float) -> JobResult:
    decided = []
    for index, label in enumerate(bundle.entry.labels):
        if not label:
            continue  # an output this model was not trained on
        probability = float(scores.probabilities[index])
        threshold = bundle.thresholds[index]
        decided.append((index, label, probability, threshold,
                        threshold is not None and probability >= threshold))
    positives = [index for index, *_, positive in decided if positive]
    boxes = dict(zip(positives, boxes_from_cams(scores.cams[positives], job.image.geometry,
                                                box_threshold))) if positives else {}
    findings = [FindingResult(label, probability, threshold, positive,
                              tuple(boxes.get(index, ())))
                for index, label, probability, threshold, positive in decided]
    findings.sort(key=lambda f: (not f.positive, -f.probability))
    return JobResult(job, tuple(findings), scores.cams)


def algorithm_of(bundle: ModelBundle) -> AlgorithmInfo:
    """What the outputs say about the model that produced them."""
    return AlgorithmInfo(bundle.entry.name, bundle.entry.version, bundle.weights_sha256,
                         bundle.weights_status, bundle.thresholds_source,
                         bundle.warning_label or "")


def analysis_of(result: JobResult, bundle: ModelBundle) -> Analysis:
    """The outputs' view of a classified job."""
    prepared = result.prepared
    cams = {label: result.cams[i] for i, label in enumerate(bundle.entry.labels) if label}
    return Analysis(prepared.selection.sop_instance_uid, prepared.lease.study_revision,
                    algorithm_of(bundle), result.findings, cams, prepared.image.geometry,
                    prepared.image.display, tuple(prepared.selection.notes))


def store_result(session: Session, result: JobResult, bundle: ModelBundle, *,
                 storage_root: Path, now: datetime, written: list[WrittenOutput] = (),
                 peers: tuple[PeerSettings, ...] = (), min_free_mb: int = 0) -> None:
    """Write the CAMs; record the result, findings and outputs, queue deliveries, and
    complete the job, all in one transaction.

    The CAM archive keeps the ``[storage] min_free_mb`` reserve (``InsufficientSpaceError``).
    """
    lease, selection = result.prepared.lease, result.prepared.selection
    relative = (f"{RESULTS_DIR}/{lease.study_instance_uid}/"
                f"job-{lease.job_id}-attempt-{lease.attempt}.npz")
    archive = _cam_archive(result.cams, result.prepared.image.geometry, bundle)
    require_free_space(storage_root, min_free_mb, len(archive))
    write_atomic(storage_root, storage_root / relative, [archive])
    notes = list(selection.notes)
    if bundle.warning_label:
        notes.insert(0, bundle.warning_label)
    session.add(AnalysisResult(
        job_id=lease.job_id, study_instance_uid=lease.study_instance_uid,
        sop_instance_uid=selection.sop_instance_uid, model_name=bundle.entry.name,
        model_version=bundle.entry.version, weights_sha256=bundle.weights_sha256,
        weights_status=bundle.weights_status, thresholds_source=bundle.thresholds_source,
        notes="; ".join(notes) or None, created_at=now))
    session.flush()
    session.execute(insert(Finding), [{  # one executemany, not one ORM object per finding
        "job_id": lease.job_id, "label": finding.label, "probability": finding.probability,
        "threshold": finding.threshold, "positive": finding.positive,
        "boxes": json.dumps([b.as_list() for b in finding.boxes]) if finding.positive else None,
        "heatmap_path": f"{relative}#{_slug(finding.label)}"} for finding in result.findings])
    record_outputs(session, written, job_id=lease.job_id,
                   study_instance_uid=lease.study_instance_uid,
                   study_revision=lease.study_revision, peers=peers, now=now)
    complete(session, lease, now=now)


def _cam_archive(cams: np.ndarray, geometry: Geometry, bundle: ModelBundle) -> bytes:
    """CAMs on the feature grid plus the geometry: ``heatmap_in_source`` rebuilds the source map exactly."""
    buffer = io.BytesIO()
    arrays = {_slug(label): cams[i] for i, label in enumerate(bundle.entry.labels) if label}
    np.savez_compressed(buffer, geometry=np.array([
        geometry.source_rows, geometry.source_columns, geometry.crop_top, geometry.crop_left,
        geometry.crop_size, geometry.resolution]), **arrays)
    return buffer.getvalue()


def load_cam(storage_root: Path, heatmap_path: str) -> tuple[np.ndarray, Geometry]:
    """The CAM and geometry behind a finding's ``heatmap_path`` (``file.npz#label``)."""
    relative, key = heatmap_path.split("#", 1)
    with np.load(storage_root / relative) as archive:
        return archive[key], Geometry(*(int(v) for v in archive["geometry"]))


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
