"""Build the Comprehensive 3D SR (PS3.16 TID 1500 Measurement Report) of one analysis.

The observer is a device: the node and its model (TID 1004).  Every finding the model reports
becomes one image-level group (TID 1501) holding the coded finding, the probability and the
decision at the operating point; each box of a positive finding becomes a planar ROI group
(TID 1410) with a closed SCOORD POLYLINE on the analysed image (PS3.3 C.18.6).  A findings
summary closes the report as text.  A study that was not analysed gets a report holding only
the reason.  This module builds data sets; it does not write files or touch the database.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    ImageRegion,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.errors import OutputBuildError
from dicom_node.outputs import codes as node_codes
from dicom_node.outputs.charset import declare, without_character_set
from dicom_node.outputs.source import COPIED, clip_text
from dicom_node.results import NO_HEATMAP, AlgorithmInfo, Analysis, FindingResult

AI_NOTICE = "AI result – decision support"


@dataclass(frozen=True)
class ReportIdentity:
    """Who writes the report and under which UIDs (all deterministic, from ``outputs.uids``)."""

    series_instance_uid: str
    sop_instance_uid: str
    device_uid: str
    node_name: str
    series_number: int = 9901
    series_description: str = "AI CXR findings (decision support)"


def build_sr(
    source: Dataset, analysis: Analysis, identity: ReportIdentity, now: datetime
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of ``analysis`` on the image ``source`` (a header suffices).

    Raises
    ------
    OutputBuildError
        When highdicom refuses a value (for example a source without a valid Study UID).
    """
    try:
        groups: list = []
        for finding in analysis.findings:
            algorithm = _algorithm_identification(analysis.algorithm, finding)
            groups.append(_finding_group(source, finding, algorithm))
            groups.extend(_region_groups(source, finding, algorithm))
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputBuildError(
            f"SR could not be built ({type(exc).__name__}); a source attribute may be invalid"
        ) from None
    summary = findings_summary(analysis)
    return _report(source, [source], identity, groups, summary, analysis.algorithm, now)


def build_not_analysed_sr(
    sources: Sequence[Dataset],
    reason: str,
    algorithm: AlgorithmInfo,
    identity: ReportIdentity,
    now: datetime,
) -> hd.sr.Comprehensive3DSR:
    """A report that says the study was looked at and why it was not analysed."""
    text = f"{AI_NOTICE}. Study not analysed by {algorithm.name}: {reason}."
    try:
        # TID 1500 needs one measurement group: one with no measurement, naming the images.
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(identifier="study not analysed"),
            source_images=[SourceImageForMeasurementGroup.from_source_image(s) for s in sources],
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputBuildError(
            f"SR could not be built ({type(exc).__name__}); a source attribute may be invalid"
        ) from None
    return _report(sources[0], sources, identity, [group], text, algorithm, now)


def findings_summary(analysis: Analysis) -> str:
    """One paragraph a radiologist reads in the viewer: positives, then what stayed below."""
    parts = [f"{AI_NOTICE}."]
    if analysis.algorithm.warning_label:
        parts.append(f"{analysis.algorithm.warning_label}.")
    if not analysis.algorithm.heatmaps:
        parts.append(f"{NO_HEATMAP} (it has no CAM output), so no regions are marked.")
    positives = [f for f in analysis.findings if f.positive]
    if positives:
        parts.append("Above threshold: " + "; ".join(_describe(f) for f in positives) + ".")
    else:
        parts.append("No finding above threshold.")
    below = [f for f in analysis.findings if not f.positive and f.threshold is not None]
    if below:
        parts.append("Below threshold: " + "; ".join(_describe(f) for f in below) + ".")
    parts.append(
        f"Model {analysis.algorithm.name} {analysis.algorithm.version}, "
        f"weights SHA-256 {analysis.algorithm.weights_sha256}"
        + (
            f", card SHA-256 {analysis.algorithm.card_sha256}."
            if analysis.algorithm.card_sha256
            else "."
        )
    )
    parts.extend(f"Note: {note}." for note in analysis.notes)
    return " ".join(parts)


def _describe(finding: FindingResult) -> str:
    return (
        f"{finding.label} {number_text(finding.probability)} "
        f"(threshold {number_text(finding.threshold)})"
    )


def number_text(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits and at least two decimals, no exponent.

    Operating points can be small (0.0042): two fixed decimals would print it as 0.00.
    """
    if value is None:
        return "none"
    if value == 0 or not math.isfinite(value):
        return f"{value:.2f}"
    decimals = max(2, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:.{decimals}f}"
    whole, _, fraction = text.partition(".")
    fraction = fraction[:2] + fraction[2:].rstrip("0")  # 0.00420 -> 0.0042, 0.500 -> 0.50
    return f"{whole}.{fraction}"


def _algorithm_identification(
    algorithm: AlgorithmInfo, finding: FindingResult
) -> AlgorithmIdentification:
    """TID 4019: name, version (with the weights' SHA-256) and the finding's operating point.

    Each group carries the threshold of its own finding, which keeps the report small (the
    full table of thresholds in every group would repeat it once per finding).
    """
    parameters = [
        f"weights sha256 {algorithm.weights_sha256}",
        f"weights {algorithm.weights_status}",
        f"thresholds from {algorithm.thresholds_source}",
        f"runtime {algorithm.runtime}",
    ]
    if algorithm.card_sha256:  # the model card is part of the model's identity
        parameters.insert(1, f"card sha256 {algorithm.card_sha256}")
    if not algorithm.heatmaps:
        parameters.append(NO_HEATMAP.lower())
    if finding.threshold is not None:
        parameters.append(f"threshold {finding.label} {finding.threshold:.4f}")
    version = f"{algorithm.version} sha256:{algorithm.weights_sha256[:16]}"
    return AlgorithmIdentification(
        name=algorithm.name[:64], version=version[:64], parameters=parameters
    )


def _finding_group(
    source: Dataset, finding: FindingResult, algorithm: AlgorithmIdentification
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501: the coded finding, its probability and the decision at the operating point."""
    code = node_codes.finding_code(finding.label)
    evaluations = []  # the coded finding itself is the group's Finding row (finding_type)
    if finding.threshold is not None:
        decision = node_codes.PRESENT if finding.positive else node_codes.ABSENT
        evaluations.append(QualitativeEvaluation(code, decision))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(identifier=finding.label[:64]),
        finding_type=code,
        algorithm_id=algorithm,
        measurements=[_probability(finding, algorithm)],
        qualitative_evaluations=evaluations or None,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )


def _probability(finding: FindingResult, algorithm: AlgorithmIdentification) -> hd.sr.Measurement:
    return hd.sr.Measurement(
        name=node_codes.PROBABILITY, value=round(finding.probability, 6), unit=node_codes.NO_UNITS
    )


def _region_groups(
    source: Dataset, finding: FindingResult, algorithm: AlgorithmIdentification
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 per box of a positive finding: a closed POLYLINE on the analysed image."""
    if not finding.positive:
        return []
    code = node_codes.finding_code(finding.label)
    groups = []
    for number, box in enumerate(finding.boxes, start=1):
        # PS3.3 C.18.6.1.2: a closed POLYLINE repeats its first point last.  Column/row
        # image coordinates, with (0, 0) the top left corner of the top left pixel.
        points = np.array(
            [
                [box.x0, box.y0],
                [box.x1, box.y0],
                [box.x1, box.y1],
                [box.x0, box.y1],
                [box.x0, box.y0],
            ],
            dtype=np.float32,
        )
        region = ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=SourceImageForRegion.from_source_image(source),
        )
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    identifier=f"{finding.label} region {number}"[:64]
                ),
                referenced_region=region,
                finding_type=code,
                algorithm_id=algorithm,
            )
        )
    return groups


def _report(
    source: Dataset,
    evidence: Sequence[Dataset],
    identity: ReportIdentity,
    groups: list,
    summary: str,
    algorithm: AlgorithmInfo,
    now: datetime,
) -> hd.sr.Comprehensive3DSR:
    local = now.astimezone()
    try:
        observer = ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                uid=identity.device_uid,
                name=identity.node_name[:64],
                manufacturer_name="dicom-node",
                model_name=algorithm.name[:64],
            ),
        )
        report = MeasurementReport(
            observation_context=ObservationContext(observer_device_context=observer),
            procedure_reported=node_codes.PLAIN_CHEST_XRAY,
            imaging_measurements=groups,
            title=node_codes.IMAGING_MEASUREMENT_REPORT,
        )
        _append_summary(report, summary)
        description = identity.series_description
        if algorithm.warning_label:  # untrained or unverified weights, said everywhere
            description = f"{algorithm.warning_label} {description}"
        sr = hd.sr.Comprehensive3DSR(
            # highdicom copies the evidence's character set and refuses forms the standard
            # allows (\ISO 2022 IR 87): it is declared below instead.
            evidence=[without_character_set(e) for e in evidence],
            content=report[0],
            series_instance_uid=identity.series_instance_uid,
            series_number=identity.series_number,
            sop_instance_uid=identity.sop_instance_uid,
            instance_number=1,
            manufacturer="dicom-node",
            is_complete=True,
            is_final=False,
            is_verified=False,
            series_description=clip_text(description, 64),
            content_date=local.date(),
            content_time=local.time().replace(microsecond=0),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputBuildError(
            f"SR could not be built ({type(exc).__name__}); a source attribute may be invalid"
        ) from None
    # The source's character set, never a guess at it (PS3.5 6.1.2.3; see outputs.charset).
    declare(sr, source.get("SpecificCharacterSet"), COPIED)
    # Local time throughout, as highdicom's Instance Creation Date/Time (PS3.3 C.12.1.1.8).
    sr.TimezoneOffsetFromUTC = local.strftime("%z")
    return sr


def _append_summary(report: MeasurementReport, summary: str) -> None:
    """TID 1500 row 12: a Qualitative Evaluations container holding the summary text.

    highdicom's MeasurementReport does not offer this row, so it is appended to the root.
    """
    container = ContainerContentItem(
        name=node_codes.QUALITATIVE_EVALUATIONS, relationship_type=RelationshipTypeValues.CONTAINS
    )
    # pydicom types the keyword as its Sequence but wraps a list of items in one itself
    container.ContentSequence = [  # type: ignore[assignment]
        TextContentItem(
            name=node_codes.SUMMARY,
            value=clip_text(summary, 4096),
            relationship_type=RelationshipTypeValues.CONTAINS,
        )
    ]
    report[0].ContentSequence.append(container)
