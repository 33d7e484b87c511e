"""The content of the TID 1500 report below its root: measurement groups and image library.

Every group carries a Tracking Identifier and a Tracking Unique Identifier (TID 4108), the
latter derived from the report's SOP Instance UID, so rebuilding a job gives the same UIDs
(highdicom would mint a random one).  Groups of a finding carry the TID 4019 Algorithm
Identification of the model that produced it (IHE AIR; PS3.16 TID 1501 and TID 1410).  The
TID 1600 Image Library lists the analysed images with the descriptors they really have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    ContainerContentItem,
    ImageContentItem,
    ImageRegion,
    MeasurementsAndQualitativeEvaluations,
    NumContentItem,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    RelationshipTypeValues,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes

from dicom_node.outputs import codes as node_codes
from dicom_node.results import NO_HEATMAP, AlgorithmInfo, FindingResult
from dicom_node.uids import derive_uid

CONTAINS = RelationshipTypeValues.CONTAINS
ACQUISITION = RelationshipTypeValues.HAS_ACQ_CONTEXT
PIXELS = hd.sr.CodedConcept("{pixels}", "UCUM", "Pixels")
# PS3.16 CID 29 Acquisition Modality, for the modalities the node analyses.
MODALITIES = {"CR": codes.cid29.ComputedRadiography, "DX": codes.cid29.DigitalRadiography}


@dataclass(frozen=True)
class Tracking:
    """Mints a group's Tracking Unique Identifier from the report's own UID (PS3.5 B.2)."""

    uid_root: str
    report_uid: str

    def identifier(self, text: str) -> TrackingIdentifier:
        """TID 4108 rows 1-2: ``text`` (unique in the report) and a UID derived from it."""
        uid = derive_uid(self.uid_root, self.report_uid, "tracking", text)
        return TrackingIdentifier(uid=uid, identifier=text[:64])


def algorithm_identification(
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


def finding_group(
    source: Dataset, finding: FindingResult, algorithm: AlgorithmInfo, tracking: Tracking
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1501: the coded finding, its probability and the decision at the operating point."""
    code = node_codes.finding_code(finding.label)
    evaluations = []  # the coded finding itself is the group's Finding row (finding_type)
    if finding.threshold is not None:
        decision = node_codes.PRESENT if finding.positive else node_codes.ABSENT
        evaluations.append(QualitativeEvaluation(code, decision))
    probability = hd.sr.Measurement(
        name=node_codes.PROBABILITY, value=round(finding.probability, 6), unit=node_codes.NO_UNITS
    )
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking.identifier(finding.label),
        finding_type=code,
        algorithm_id=algorithm_identification(algorithm, finding),
        measurements=[probability],
        qualitative_evaluations=evaluations or None,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )


def region_groups(
    source: Dataset, finding: FindingResult, algorithm: AlgorithmInfo, tracking: Tracking
) -> list[PlanarROIMeasurementsAndQualitativeEvaluations]:
    """TID 1410 per box of a positive finding: a closed POLYLINE on the analysed image."""
    if not finding.positive:
        return []
    code = node_codes.finding_code(finding.label)
    groups = []
    for number, box in enumerate(finding.boxes, start=1):
        # PS3.3 C.18.6.1.2: a closed POLYLINE repeats its first point last.  Column/row
        # image coordinates, with (0, 0) the top left corner of the top left pixel.
        corners = [(box.x0, box.y0), (box.x1, box.y0), (box.x1, box.y1), (box.x0, box.y1)]
        region = ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=np.array([*corners, corners[0]], dtype=np.float32),
            source_image=SourceImageForRegion.from_source_image(source),
        )
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking.identifier(f"{finding.label} region {number}"),
                referenced_region=region,
                finding_type=code,
                algorithm_id=algorithm_identification(algorithm, finding),
            )
        )
    return groups


def not_analysed_group(
    sources: Sequence[Dataset], tracking: Tracking
) -> MeasurementsAndQualitativeEvaluations:
    """TID 1500 needs one measurement group: one with no measurement, naming the images."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking.identifier("study not analysed"),
        source_images=[SourceImageForMeasurementGroup.from_source_image(s) for s in sources],
    )


def image_library(sources: Sequence[Dataset]) -> ContainerContentItem:
    """TID 1600: one Image Library Group holding one entry per analysed image."""
    entries = []
    for source in sources:
        entry = ImageContentItem(
            name=node_codes.SOURCE,
            referenced_sop_class_uid=source.SOPClassUID,
            referenced_sop_instance_uid=source.SOPInstanceUID,
            relationship_type=CONTAINS,
        )
        descriptors = _descriptors(source)
        if descriptors:
            entry.ContentSequence = descriptors  # type: ignore[assignment]
        entries.append(entry)
    group = ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type=CONTAINS)
    group.ContentSequence = entries  # type: ignore[assignment]
    library = ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type=CONTAINS)
    library.ContentSequence = [group]  # type: ignore[assignment]
    return library


def _descriptors(source: Dataset) -> list:
    """TID 1602 (modality, pixel data rows and columns) and TID 1603 (patient orientation,
    imager pixel spacing, as highdicom reads them), each only when the image has it: a CR's
    Patient Orientation may be empty and its Imager Pixel Spacing absent (PS3.3 C.8.1.2)."""
    items: list = []
    if source.get("Modality") in MODALITIES:
        items.append(CodeContentItem(codes.DCM.Modality, MODALITIES[source.Modality], ACQUISITION))
    for name, keyword in (
        (codes.DCM.PixelDataRows, "Rows"),
        (codes.DCM.PixelDataColumns, "Columns"),
    ):
        if source.get(keyword):
            items.append(
                NumContentItem(
                    name, int(source.get(keyword)), PIXELS, relationship_type=ACQUISITION
                )
            )
    orientation = list(source.get("PatientOrientation") or [])
    if len(orientation) == 2 and all(orientation):
        for name, value in zip(
            (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn),
            orientation,
            strict=True,
        ):
            items.append(TextContentItem(name, str(value), ACQUISITION))
    spacing = _spacing(source.get("ImagerPixelSpacing"))
    if spacing:
        for name, value in (
            (codes.DCM.HorizontalPixelSpacing, spacing[1]),  # columns: the second value
            (codes.DCM.VerticalPixelSpacing, spacing[0]),
        ):
            items.append(
                NumContentItem(
                    name, float(value), codes.UCUM.Millimeter, relationship_type=ACQUISITION
                )
            )
    return items


def _spacing(value: object) -> list[float]:
    """Two positive numbers, or none: a malformed spacing is left out, not fatal to the SR."""
    try:
        numbers = [float(v) for v in value] if isinstance(value, (list, tuple, MultiValue)) else []
    except (TypeError, ValueError):
        return []
    return numbers if len(numbers) == 2 and all(n > 0 for n in numbers) else []
