"""The content of the TID 1500 report below its root: findings, regions and image library.

Each image-level finding is a row 13 CODE item of the TID 1500 Qualitative Evaluations
container (PS3.16 TID 1500 row 12), ``Finding = <coded finding>``, carrying what a TID 1501
group would: tracking identifiers (TID 4108), the TID 4019 Algorithm Identification, the
decision at the operating point, the probability and the analysed image.  They are not TID
1501 groups because OHIF 3.13.2 crashes on a measurement group without a SCOORD
(docs/conformance.md, section 3.5).  Each box of a positive finding is a TID 1410 group.
Tracking Unique Identifiers derive from the report's SOP Instance UID, so rebuilding a job
gives the same UIDs (highdicom would mint a random one).  The TID 1600 Image Library lists the
analysed images with the descriptors they really have.
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
    NumContentItem,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForMeasurement,
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
PROPERTIES = RelationshipTypeValues.HAS_PROPERTIES
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

    Each finding item and region group carries the threshold of its own finding, which keeps
    the report small (the full table of thresholds in every one would repeat it once per
    finding).
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


def finding_evaluation(
    source: Dataset, finding: FindingResult, algorithm: AlgorithmInfo, tracking: Tracking
) -> CodeContentItem:
    """TID 1500 row 13: ``(121071, DCM, "Finding") = <finding code>`` for one finding.

    TID 1500 is an extensible template (as DCMTK's TID1500_MeasurementReport declares it): the
    item carries, as its children, the content a TID 1501 group gives a finding, with the
    by-value relationships PS3.3 A.35.13 (Comprehensive 3D SR IOD) allows from a CODE: the
    tracking identifiers (TID 4108, HAS OBS CONTEXT), the Algorithm Identification (TID 4019,
    HAS CONCEPT MOD), the decision at the operating point and the probability (HAS
    PROPERTIES), and the analysed image (INFERRED FROM, as TID 320 row 1).
    """
    code = node_codes.finding_code(finding.label)
    children: list = [
        *tracking.identifier(finding.label),
        *algorithm_identification(algorithm, finding),
    ]
    if finding.threshold is not None:  # no operating point: no decision
        decision = node_codes.PRESENT if finding.positive else node_codes.ABSENT
        children.append(CodeContentItem(code, decision, PROPERTIES))
    children.append(
        NumContentItem(
            node_codes.PROBABILITY,
            round(finding.probability, 6),
            node_codes.NO_UNITS,
            relationship_type=PROPERTIES,
        )
    )
    children.append(SourceImageForMeasurement.from_source_image(source))
    item = CodeContentItem(node_codes.FINDING, code, CONTAINS)
    item.ContentSequence = children  # type: ignore[assignment]
    return item


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
