"""Build the Parametric Map (PS3.3 A.75) of one positive finding's heatmap, with pydicom.

The map holds the finding's heatmap as 32-bit floats (Float Pixel Data, PS3.3 C.7.6.24), on the
analysed image's pixel grid scaled so its long side is at most ``[outputs] sc_max_size`` (the
heatmap Secondary Capture's cap; full resolution for smaller images): the CAM upsampled
and normalised to [0, 1] over the area the model saw, 0 outside it, exactly what
``localization.heatmap_at`` gives.  A viewer that blends float maps over images (window,
colormap, opacity of its own) can show it; the value is relative activation, not a probability.

highdicom's ParametricMap is not used: a chest CR or DX has no Frame of Reference, and
highdicom 0.28 then adds a Frame Label dimension without Dimension Index Values and refuses
its own object.  The Parametric Map IOD requires a Frame of Reference (PS3.3 A.75.3) and, for
a patient-relative one, the Plane Position and Plane Orientation (Patient) macros (Table
A.75-2).  A projection radiograph has no patient coordinates, so the map gets a Frame of
Reference of its own (derived like every other UID, shared only by the maps of one analysis):
in it the map's plane starts at the origin, its row and column directions follow the source's
Patient Orientation (PA "L\\F" when the source gives none) and its pixel spacing is the
source's, scaled to the map's grid (1 mm per source pixel, nominal, when the source states
none).  No other object uses that frame, so these values relate the map to nothing but
itself; the pixel-to-pixel relation to the analysed image is the Derivation Image reference.
This module builds data sets; it does not write files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import __version__
from dicom_node.inference.localization import heatmap_at
from dicom_node.outputs.charset import declare
from dicom_node.outputs.codes import NO_UNITS
from dicom_node.outputs.source import COPIED, clip_text
from dicom_node.outputs.sr import AI_NOTICE, number_text
from dicom_node.results import Analysis, FindingResult

PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
SERIES_NUMBER = 9903
SERIES_DESCRIPTION = "AI CXR heatmap map (decision support)"
# PS3.3 C.8.32.2, C.8.16.1.3, C.8.16.1.4: value 3 (Image Flavor) STATIC, one frame without
# time or gating (VOLUME would claim a 3D sampling a radiograph lacks); value 4 (Derived Pixel
# Contrast) NONE, no pixel-by-pixel operation on source values (QUANTITY is not a defined term).
IMAGE_TYPE = ["DERIVED", "PRIMARY", "STATIC", "NONE"]
LUT_LABEL = "ACTIVATION"
# PS3.3 C.7.6.2.1.1: +x to the patient's left, +y posterior, +z toward the head.
DIRECTIONS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}
DEFAULT_ORIENTATION = ("L", "F")  # a PA chest as displayed: rows to the left, columns down


@dataclass(frozen=True)
class MapIdentity:
    """The UIDs and numbers of one map (all deterministic, from ``outputs.build``)."""

    series_instance_uid: str
    sop_instance_uid: str
    frame_of_reference_uid: str
    dimension_organization_uid: str
    instance_number: int
    device_serial_number: str  # the node's AE title: which node made it


def plan_maps(analysis: Analysis) -> list[FindingResult]:
    """One map per positive finding that has a heatmap; none for a negative study."""
    return [f for f in analysis.findings if f.positive and f.label in analysis.cams]


def map_grid(analysis: Analysis, max_size: int) -> tuple[int, int]:
    """Rows and columns of the map: the source's, scaled so the long side is <= ``max_size``."""
    rows, columns = analysis.geometry.source_rows, analysis.geometry.source_columns
    scale = min(1.0, max_size / max(rows, columns))
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def map_pixels(analysis: Analysis, label: str, max_size: int) -> np.ndarray:
    """The float32 heatmap of ``label`` on the map's grid, in [0, 1]."""
    rows, columns = map_grid(analysis, max_size)
    return heatmap_at(analysis.cams[label], analysis.geometry, rows, columns)


def build_pm(
    header: Dataset,
    analysis: Analysis,
    finding: FindingResult,
    identity: MapIdentity,
    *,
    max_size: int,
    now: datetime,
) -> Dataset:
    """The Parametric Map of ``finding``'s heatmap, in the source's patient and study."""
    pixels = map_pixels(analysis, finding.label, max_size)
    local = now.astimezone()
    pm = Dataset()
    pm.file_meta = FileMetaDataset()
    pm.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    _sop_common(pm, identity, local)
    _patient_and_study(pm, header)
    _series(pm, header, analysis, identity)
    _equipment(pm, analysis, identity)
    _image(pm, header, analysis, finding, identity, local)
    _references(pm, header)
    _functional_groups(pm, header, analysis, finding, identity, pixels.shape)
    pm.Rows, pm.Columns = pixels.shape
    pm.FloatPixelData = np.ascontiguousarray(pixels, dtype="<f4").tobytes()
    # The source's character set, never a guess at it (PS3.5 6.1.2.3; see outputs.charset).
    declare(pm, header.get("SpecificCharacterSet"), COPIED)
    return pm


def _sop_common(pm: Dataset, identity: MapIdentity, local: datetime) -> None:
    """SOP Common (PS3.3 C.12.1): local creation time with its offset (the character set
    is declared last, by ``build_pm``)."""
    pm.SOPClassUID = PARAMETRIC_MAP_STORAGE
    pm.SOPInstanceUID = identity.sop_instance_uid
    pm.InstanceCreationDate = local.strftime("%Y%m%d")
    pm.InstanceCreationTime = local.strftime("%H%M%S")
    pm.TimezoneOffsetFromUTC = local.strftime("%z")  # PS3.3 C.12.1.1.8


def _patient_and_study(pm: Dataset, header: Dataset) -> None:
    """Patient (C.7.1.1), General Study (C.7.2.1), Patient Study (C.7.2.2): the source's values."""
    pm.StudyInstanceUID = header.StudyInstanceUID
    for keyword in COPIED:
        if keyword in header:
            setattr(pm, keyword, header.get(keyword))


def _series(pm: Dataset, header: Dataset, analysis: Analysis, identity: MapIdentity) -> None:
    """General Series (C.7.3.1), Parametric Map Series (C.8.32.1), Frame of Reference (C.7.4.1)."""
    pm.Modality = "OT"  # a derived map, no acquisition modality (as highdicom's maps)
    pm.SeriesInstanceUID = identity.series_instance_uid
    pm.SeriesNumber = SERIES_NUMBER
    description = SERIES_DESCRIPTION
    if analysis.algorithm.warning_label:
        description = f"{analysis.algorithm.warning_label} {description}"
    pm.SeriesDescription = clip_text(description, 64)
    # C.7.3.1 Laterality (2C) and C.8.32.1 Referenced Performed Procedure Step (1C) are left
    # out: a chest is not a paired body part, and the node performs no procedure step.
    pm.FrameOfReferenceUID = identity.frame_of_reference_uid
    pm.PositionReferenceIndicator = None  # Type 2: no anatomical reference point


def _equipment(pm: Dataset, analysis: Analysis, identity: MapIdentity) -> None:
    """General (C.7.5.1) and Enhanced General Equipment (C.7.5.2): the node and its model."""
    pm.Manufacturer = "dicom-node"
    pm.ManufacturerModelName = clip_text(analysis.algorithm.name, 64)
    pm.DeviceSerialNumber = clip_text(identity.device_serial_number, 64)
    pm.SoftwareVersions = [
        f"dicom-node {__version__}",
        clip_text(f"{analysis.algorithm.name} {analysis.algorithm.version}", 64),
    ]


def _image(
    pm: Dataset,
    header: Dataset,
    analysis: Analysis,
    finding: FindingResult,
    identity: MapIdentity,
    local: datetime,
) -> None:
    """General Image (C.7.6.1), Parametric Map Image (C.8.32.2), Floating Point Image Pixel
    (C.7.6.24), Acquisition Context (C.7.6.14)."""
    pm.InstanceNumber = identity.instance_number
    pm.ContentDate, pm.ContentTime = local.strftime("%Y%m%d"), local.strftime("%H%M%S")
    pm.ImageType = IMAGE_TYPE
    # Content Identification (PS3.3 10.9): the label a viewer lists, the AI notice spelled out.
    pm.ContentLabel = _content_label(finding.label)
    warning = f"{analysis.algorithm.warning_label}. " if analysis.algorithm.warning_label else ""
    pm.ContentDescription = clip_text(f"{warning}{AI_NOTICE}: {finding.label} heatmap", 64)
    pm.ContentCreatorName = None
    pm.ContentQualification = "RESEARCH"  # C.8.32.2: not a cleared product's output
    pm.DerivationDescription = clip_text(
        f"{warning}{AI_NOTICE}: heatmap of {finding.label} (relative activation 0-1, not a "
        f"probability; probability {number_text(finding.probability)}) by model "
        f"{analysis.algorithm.name} {analysis.algorithm.version}, weights SHA-256 "
        f"{analysis.algorithm.weights_sha256}",
        1024,
    )
    # Type 2C (C.7.6.1): the source's when it names two directions, else empty (unknown).
    pm.PatientOrientation = list(_patient_orientation(header) or ()) or None
    pm.SamplesPerPixel = 1
    pm.PhotometricInterpretation = "MONOCHROME2"
    pm.BitsAllocated = 32
    pm.PresentationLUTShape = "IDENTITY"
    pm.LossyImageCompression = "00"
    pm.BurnedInAnnotation = "NO"
    pm.RecognizableVisualFeatures = "NO"
    pm.AcquisitionContextSequence = []  # Type 2: nothing was acquired
    pm.NumberOfFrames = 1


def _references(pm: Dataset, header: Dataset) -> None:
    """General Reference (C.12.4) and Common Instance Reference (C.12.2): the analysed image."""
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    pm.SourceImageSequence = [source]
    instance = Dataset()
    instance.ReferencedSOPClassUID = header.SOPClassUID
    instance.ReferencedSOPInstanceUID = header.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = header.SeriesInstanceUID
    series.ReferencedInstanceSequence = [instance]
    pm.ReferencedSeriesSequence = [series]


def _functional_groups(
    pm: Dataset,
    header: Dataset,
    analysis: Analysis,
    finding: FindingResult,
    identity: MapIdentity,
    shape: tuple[int, int],
) -> None:
    """Multi-frame Functional Groups (C.7.6.16) with the macros of Table A.75-2, and the
    Multi-frame Dimension module (C.7.6.17): one frame, indexed by its Frame Label."""
    source = (analysis.geometry.source_rows, analysis.geometry.source_columns)
    shared = Dataset()
    shared.PixelMeasuresSequence = [_pixel_measures(header, source, shape)]
    orientation = Dataset()
    orientation.ImageOrientationPatient = _orientation_cosines(header)
    shared.PlaneOrientationSequence = [orientation]
    shared.FrameAnatomySequence = [_frame_anatomy()]
    shared.PixelValueTransformationSequence = [_identity_transformation()]
    shared.FrameVOILUTSequence = [_voi()]
    shared.RealWorldValueMappingSequence = [_real_world_value_mapping(finding)]
    frame_type = Dataset()
    frame_type.FrameType = IMAGE_TYPE
    shared.ParametricMapFrameTypeSequence = [frame_type]
    shared.DerivationImageSequence = [_derivation(header, same_grid=shape == source)]
    pm.SharedFunctionalGroupsSequence = [shared]
    content = Dataset()
    content.DimensionIndexValues = [1]
    content.FrameLabel = _content_label(finding.label)
    position = Dataset()
    position.ImagePositionPatient = [0.0, 0.0, 0.0]  # the map's own frame: it starts here
    frame = Dataset()
    frame.FrameContentSequence = [content]  # C.7.6.16.2.2: never shared
    frame.PlanePositionSequence = [position]
    pm.PerFrameFunctionalGroupsSequence = [frame]
    organisation = Dataset()
    organisation.DimensionOrganizationUID = identity.dimension_organization_uid
    pm.DimensionOrganizationSequence = [organisation]
    index = Dataset()
    index.DimensionOrganizationUID = organisation.DimensionOrganizationUID
    index.DimensionIndexPointer = 0x00209453  # Frame Label
    index.FunctionalGroupPointer = 0x00209111  # Frame Content Sequence
    index.DimensionDescriptionLabel = "Finding"
    pm.DimensionIndexSequence = [index]


def _pixel_measures(header: Dataset, source: tuple[int, int], shape: tuple[int, int]) -> Dataset:
    """Pixel Measures (C.7.6.16.2.1): the source's spacing (row, column), scaled to the map."""
    spacing = _source_spacing(header)
    item = Dataset()
    item.PixelSpacing = [
        _ds(spacing[0] * source[0] / shape[0]),
        _ds(spacing[1] * source[1] / shape[1]),
    ]
    return item


def _source_spacing(header: Dataset) -> tuple[float, float]:
    """Pixel Spacing, else Imager Pixel Spacing (PS3.3 10.7.1.3), else a nominal 1 mm."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        try:
            row, column = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if 0 < row < 1000 and 0 < column < 1000:
            return row, column
    return 1.0, 1.0


def _ds(value: float) -> str:
    """A Decimal String of at most 16 characters (PS3.5 6.2)."""
    return f"{value:.10g}"[:16]


def _orientation_cosines(header: Dataset) -> list[float]:
    """Row and column direction cosines from the source's Patient Orientation (C.7.6.1.1.1)."""
    row, column = _patient_orientation(header) or DEFAULT_ORIENTATION
    return [*DIRECTIONS[row], *DIRECTIONS[column]]


def _patient_orientation(header: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two single, perpendicular directions."""
    value = header.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = str(value[0]), str(value[1])
    if (
        row in DIRECTIONS
        and column in DIRECTIONS
        and np.dot(DIRECTIONS[row], DIRECTIONS[column]) == 0
    ):
        return row, column
    return None


def _frame_anatomy() -> Dataset:
    """Frame Anatomy (C.7.6.16.2.8): the chest (PS3.16 CID 4031), unpaired."""
    anatomy = Dataset()
    anatomy.AnatomicRegionSequence = [CodedConcept.from_code(codes.SCT.Chest)]
    anatomy.FrameLaterality = "U"
    return anatomy


def _identity_transformation() -> Dataset:
    """Identity Pixel Value Transformation (C.7.6.16.2.9b): stored values are the values."""
    item = Dataset()
    item.RescaleIntercept = 0
    item.RescaleSlope = 1
    item.RescaleType = "US"
    return item


def _voi() -> Dataset:
    """Frame VOI LUT With LUT (C.7.6.16.2.10b): a window over the whole 0-1 range."""
    item = Dataset()
    item.WindowCenter = 0.5
    item.WindowWidth = 1.0
    item.WindowCenterWidthExplanation = "full activation range"
    return item


def _real_world_value_mapping(finding: FindingResult) -> Dataset:
    """Real World Value Mapping (C.7.6.16.2.11): identity onto relative activation, no units."""
    item = Dataset()
    item.LUTExplanation = clip_text(f"{finding.label} heatmap, relative activation 0-1", 64)
    item.LUTLabel = LUT_LABEL
    item.MeasurementUnitsCodeSequence = [CodedConcept.from_code(NO_UNITS)]
    item.DoubleFloatRealWorldValueFirstValueMapped = 0.0
    item.DoubleFloatRealWorldValueLastValueMapped = 1.0
    item.RealWorldValueIntercept = 0.0
    item.RealWorldValueSlope = 1.0
    return item


def _derivation(header: Dataset, *, same_grid: bool) -> Dataset:
    """Derivation Image (C.7.6.16.2.6): derived from the analysed image (CID 7203, CID 7222)."""
    method = CodedConcept.from_code(codes.DCM.UnspecifiedMethodOfCalculation)
    purpose = CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    source.PurposeOfReferenceCodeSequence = [purpose]
    # C.7.6.16.2.6: the same pixel grid as the source only when it was not scaled down.
    source.SpatialLocationsPreserved = "YES" if same_grid else "NO"
    derivation = Dataset()
    derivation.DerivationCodeSequence = [method]
    derivation.SourceImageSequence = [source]
    return derivation


def _content_label(label: str) -> str:
    """A Content Label (CS: upper case, digits, space, underscore; 16 characters)."""
    cleaned = "".join(c if c.isascii() and c.isalnum() else "_" for c in label.upper())
    return cleaned[:16] or "HEATMAP"
