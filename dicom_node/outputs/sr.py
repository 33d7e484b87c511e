"""Build the Comprehensive 3D SR (PS3.16 TID 1500 Measurement Report) of one analysis.

The observer is a device: the node and its model (TID 1004).  Every finding the model reports
becomes one coded item of the Qualitative Evaluations container (TID 1500 rows 12-13) holding
the coded finding, its tracking identifiers, the probability and the decision at the operating
point; each box of a positive finding becomes a planar ROI group (TID 1410) in the Imaging
Measurements container, with a closed SCOORD POLYLINE on the analysed image (PS3.3 C.18.6).
No TID 1501 group is written: OHIF 3.13.2 cannot load a report holding a measurement group
without a SCOORD (docs/conformance.md, section 3.5).  The items are built in
``outputs.sr_groups``.  An Image Library (TID 1600) lists the analysed images, the model is
described in the Contributing Equipment Sequence (IHE AIR Rev 1.1 6.5.3.1), and a findings
summary closes the report as text (TID 1500 row 14).  A study that was not analysed gets a
report holding only the Image Library and the reason.  This module builds data sets; it does
not write files or touch the database.  docs/conformance.md (IHE AI Results) lists what
conforms to AIR and what not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
from highdicom.sr import (
    CodeContentItem,
    CodedConcept,
    ContainerContentItem,
    DeviceObserverIdentifyingAttributes,
    LanguageOfContentItemAndDescendants,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node import __version__
from dicom_node.errors import OutputBuildError
from dicom_node.outputs import codes as node_codes
from dicom_node.outputs import sr_groups
from dicom_node.outputs.charset import declare, without_character_set
from dicom_node.outputs.source import COPIED, clip_text
from dicom_node.results import NO_HEATMAP, AlgorithmInfo, Analysis, FindingResult
from dicom_node.uids import derive_uid

AI_NOTICE = "AI result – decision support"


@dataclass(frozen=True)
class Content:
    """What the report says: findings (TID 1500 row 13), regions (TID 1410), summary."""

    evaluations: list[CodeContentItem]
    groups: list[PlanarROIMeasurementsAndQualitativeEvaluations]
    summary: str


@dataclass(frozen=True)
class ReportIdentity:
    """Who writes the report and under which UIDs (all deterministic, from ``outputs.uids``)."""

    series_instance_uid: str
    sop_instance_uid: str
    device_uid: str
    node_name: str
    uid_root: str  # ``[node] org_uid_root``: tracking and algorithm UIDs derive under it
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
    tracking = sr_groups.Tracking(identity.uid_root, identity.sop_instance_uid)
    algorithm = analysis.algorithm
    try:
        content = Content(
            evaluations=[
                sr_groups.finding_evaluation(source, f, algorithm, tracking)
                for f in analysis.findings
            ],
            groups=[
                group
                for f in analysis.findings
                for group in sr_groups.region_groups(source, f, algorithm, tracking)
            ],
            summary=findings_summary(analysis),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputBuildError(
            f"SR could not be built ({type(exc).__name__}); a source attribute may be invalid"
        ) from None
    report = _report(source, [source], identity, content, algorithm, now)
    _contributing_algorithm(report, analysis.algorithm, identity)
    return _declared(report, source, now)


def build_not_analysed_sr(
    sources: Sequence[Dataset],
    reason: str,
    algorithm: AlgorithmInfo,
    identity: ReportIdentity,
    now: datetime,
) -> hd.sr.Comprehensive3DSR:
    """A report that says the study was looked at and why it was not analysed.

    The Image Library names the images; the reason is the Qualitative Evaluations' summary
    (TID 1500 needs row 6 or row 12, not both).  No measurement group: there is nothing to
    measure, and OHIF 3.13.2 cannot load a group without a SCOORD.
    """
    text = f"{AI_NOTICE}. Study not analysed by {algorithm.name}: {reason}."
    # No Contributing Equipment item for the model: it produced nothing in this report.
    report = _report(sources[0], sources, identity, Content([], [], text), algorithm, now)
    return _declared(report, sources[0], now)


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


def _report(
    source: Dataset,
    evidence: Sequence[Dataset],
    identity: ReportIdentity,
    content: Content,
    algorithm: AlgorithmInfo,
    now: datetime,
) -> hd.sr.Comprehensive3DSR:
    """The SR document: General Equipment is the node (PS3.3 C.7.5.1), content is TID 1500."""
    local = now.astimezone()
    description = identity.series_description
    if algorithm.warning_label:  # untrained or unverified weights, said everywhere
        description = f"{algorithm.warning_label} {description}"
    try:
        sr = hd.sr.Comprehensive3DSR(
            # highdicom copies the evidence's character set and refuses forms the standard
            # allows (\ISO 2022 IR 87): it is declared in _declared instead.
            evidence=[without_character_set(e) for e in evidence],
            content=_content(evidence, identity, content, algorithm),
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
    _equipment(sr, algorithm)
    return sr


def _equipment(sr: Dataset, algorithm: AlgorithmInfo) -> None:
    """General Equipment (PS3.3 C.7.5.1) beyond Manufacturer: TID 4019 restates it."""
    sr.ManufacturerModelName = clip_text(algorithm.name, 64)
    sr.SoftwareVersions = [
        f"dicom-node {__version__}",
        clip_text(f"{algorithm.name} {algorithm.version}", 64),
    ]


def _content(
    evidence: Sequence[Dataset],
    identity: ReportIdentity,
    content: Content,
    algorithm: AlgorithmInfo,
) -> Dataset:
    """TID 1500 rows 1-6 and 12-14: title, language, device observer (TID 1004), procedure
    reported, Image Library (TID 1600), Imaging Measurements (only when there is a region)
    and Qualitative Evaluations.

    Built here rather than by highdicom's MeasurementReport, which requires one measurement
    group at least: TID 1500 asks for row 6 or row 12, and a report without a box has no
    group to write (as DCMTK's TID1500_MeasurementReport.isValid checks).
    """
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=identity.device_uid,
            name=identity.node_name[:64],
            manufacturer_name="dicom-node",
            model_name=algorithm.name[:64],
        ),
    )
    items: list = [
        *LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE),  # row 2
        *ObservationContext(observer_device_context=observer),  # row 3
        CodeContentItem(  # row 4; AIR: the imaging procedure analysed, not the algorithm
            codes.DCM.ProcedureReported,
            node_codes.PLAIN_CHEST_XRAY,
            RelationshipTypeValues.HAS_CONCEPT_MOD,
        ),
        sr_groups.image_library(evidence),  # row 5
    ]
    if content.groups:  # row 6, holding the TID 1410 groups
        items.append(_container(codes.DCM.ImagingMeasurements, content.groups))
    summary = TextContentItem(  # row 14, after the findings (row 13)
        name=node_codes.SUMMARY,
        value=clip_text(content.summary, 4096),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    items.append(_container(node_codes.QUALITATIVE_EVALUATIONS, [*content.evaluations, summary]))
    root = ContainerContentItem(name=node_codes.IMAGING_MEASUREMENT_REPORT, template_id="1500")
    root.ContentSequence = items  # type: ignore[assignment]
    return root


def _container(name: Code, children: list) -> ContainerContentItem:
    """A CONTAINS container holding ``children`` (a group template is a sequence of items)."""
    container = ContainerContentItem(name=name, relationship_type=RelationshipTypeValues.CONTAINS)
    items: list = []
    for child in children:
        items.extend([child] if isinstance(child, Dataset) else child)
    # pydicom types the keyword as its Sequence but wraps a list of items in one itself
    container.ContentSequence = items  # type: ignore[assignment]
    return container


def _contributing_algorithm(
    sr: Dataset, algorithm: AlgorithmInfo, identity: ReportIdentity
) -> None:
    """IHE AIR Rev 1.1 6.5.3.1: each algorithm that produced the results is described in the
    Contributing Equipment Sequence (0018,A001): Purpose of Reference "Processing Algorithm",
    Manufacturer, Manufacturer's Model Name, Software Versions and a Device UID that changes
    when the model does (here: when its weights or card do)."""
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [CodedConcept(*node_codes.PROCESSING_ALGORITHM[:3])]
    item.Manufacturer = "dicom-node"  # the integrator; the model's developer is not recorded
    item.ManufacturerModelName = clip_text(algorithm.name, 64)
    item.SoftwareVersions = [clip_text(algorithm.version, 64), algorithm.weights_sha256[:64]]
    item.DeviceUID = algorithm_uid(identity.uid_root, algorithm)
    item.ContributionDescription = clip_text(
        f"AI model ({algorithm.runtime}, weights {algorithm.weights_status}) "
        "that produced the findings of this report",
        1024,
    )
    sr.ContributingEquipmentSequence.append(item)


def algorithm_uid(uid_root: str, algorithm: AlgorithmInfo) -> str:
    """The model as a device: one UID per name, version, weights and card (PS3.5 B.2)."""
    return derive_uid(
        uid_root,
        "algorithm",
        algorithm.name,
        algorithm.version,
        algorithm.weights_sha256,
        algorithm.card_sha256,
    )


def _declared(
    sr: hd.sr.Comprehensive3DSR, source: Dataset, now: datetime
) -> hd.sr.Comprehensive3DSR:
    """Character set and time zone, once every text value of ours is in place."""
    # The source's character set, never a guess at it (PS3.5 6.1.2.3; see outputs.charset).
    declare(sr, source.get("SpecificCharacterSet"), COPIED)
    # Local time throughout, as highdicom's Instance Creation Date/Time (PS3.3 C.12.1.1.8).
    sr.TimezoneOffsetFromUTC = now.astimezone().strftime("%z")
    return sr
