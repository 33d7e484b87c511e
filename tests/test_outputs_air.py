"""The SR follows the IHE AI Results (AIR) profile: one test per requirement group, each
reading the built SR back with pydicom and highdicom (docs/conformance.md, section 3.5).

Image-level findings are TID 1500 row 13 items of the Qualitative Evaluations container, not
TID 1501 groups, so that OHIF 3.13.2 loads the report (tests/test_viewer_ohif.py)."""

from __future__ import annotations

import dataclasses
import io
from datetime import datetime
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from dicom_node.config.settings import Settings
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.outputs.build import build_analysis_outputs, build_not_analysed_outputs
from dicom_node.outputs.codes import ABSENT, FINDINGS, PRESENT, finding_code
from dicom_node.outputs.source import source_header
from dicom_node.results import AlgorithmInfo, Analysis, Box, FindingResult, Geometry
from dicom_node.uids import is_valid_uid
from tests.test_outputs import dciodvfy_errors, finding_items, finding_values

SOURCE_UID = "1.2.3.4.5"
NOW = datetime(2024, 5, 6, 7, 8, 9)
ALGORITHM = AlgorithmInfo("densenet121-res224-all", "1.0", "ab" * 32, "verified", "card")
FINDING_RESULTS = (
    FindingResult("Effusion", 0.91, 0.5, True, (Box(10, 20, 110, 140), Box(200, 30, 260, 90))),
    FindingResult("Pneumothorax", 0.72, 0.6, True, (Box(40, 50, 90, 120),)),
    FindingResult("Nodule", 0.12, 0.5, False, ()),
    FindingResult("Mass", 0.05, None, False, ()),  # no operating point: no decision
)
TRACKING_UID = "112040"  # TID 4108 Tracking Unique Identifier
ALGORITHM_NAME, ALGORITHM_VERSION = "111001", "111003"  # TID 4019


def _header(**attributes: object) -> Dataset:
    source = make_cxr_dataset(rows=320, columns=300, sop_instance_uid=SOURCE_UID)
    for keyword, value in attributes.items():
        setattr(source, keyword, value)
    return source_header(source).dataset


def _analysis(revision: int = 1, algorithm: AlgorithmInfo = ALGORITHM) -> Analysis:
    return Analysis(
        SOURCE_UID,
        revision,
        algorithm,
        FINDING_RESULTS,
        {f.label: np.zeros((7, 7), dtype=np.float32) for f in FINDING_RESULTS},
        Geometry(320, 300, 0, 0, 300, 224),
        np.zeros((320, 300), dtype=np.uint8),
    )


def _sr(analysis: Analysis | None = None, header: Dataset | None = None) -> Dataset:
    outputs = build_analysis_outputs(
        header if header is not None else _header(), analysis or _analysis(), Settings(), NOW
    )
    (report,) = [o for o in outputs if o.kind == "sr"]
    return pydicom.dcmread(io.BytesIO(report.data))


def _not_analysed_sr() -> Dataset:
    (report,) = build_not_analysed_outputs(
        [_header()], "no frontal view", ALGORITHM, 1, Settings(), NOW
    )
    return pydicom.dcmread(io.BytesIO(report.data))


def _items(dataset: Dataset, code_value: str) -> list[Dataset]:
    """The direct children of ``dataset`` whose concept name has ``code_value``."""
    return [
        item
        for item in dataset.get("ContentSequence", [])
        if item.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _groups(sr: Dataset) -> list[Dataset]:
    """The measurement groups of the Imaging Measurements container (TID 1500 row 6)."""
    containers = _items(sr, codes.DCM.ImagingMeasurements.value)
    assert len(containers) <= 1
    return [g for c in containers for g in _items(c, codes.DCM.MeasurementGroup.value)]


def _tracked(sr: Dataset) -> list[Dataset]:
    """Everything the report tracks: each finding item (TID 1500 row 13), each region group."""
    return [*finding_items(sr), *_groups(sr)]


def _template(item: Dataset) -> str:
    return str(item.ContentTemplateSequence[0].TemplateIdentifier)


def test_the_report_is_a_comprehensive_3d_sr_rooted_in_tid_1500_for_the_analysed_procedure() -> (
    None
):
    sr = _sr()
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (_template(sr), sr.ContentTemplateSequence[0].MappingResource) == ("1500", "DCMR")
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"  # Imaging Measurement Report
    # AIR: Procedure Reported names the imaging procedure analysed, not the algorithm.
    (procedure,) = _items(sr, "121058")
    concept = procedure.ConceptCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator) == ("399208008", "SCT")
    (language,) = _items(sr, "121049")  # TID 1204, TID 1500 row 2
    assert language.ConceptCodeSequence[0].CodingSchemeDesignator == "RFC5646"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")


def test_the_model_is_a_processing_algorithm_in_the_contributing_equipment() -> None:
    sr = _sr()
    algorithms = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    ]
    assert len(algorithms) == 1
    item = algorithms[0]
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "99IHE",
        "Processing Algorithm",
    )
    assert item.Manufacturer
    assert item.ManufacturerModelName == ALGORITHM.name
    assert ALGORITHM.version in item.SoftwareVersions
    assert ALGORITHM.weights_sha256 in item.SoftwareVersions
    assert is_valid_uid(item.DeviceUID)
    # AIR: the Device UID changes when the model does (new weights), and only then.
    same = _sr(_analysis(revision=2)).ContributingEquipmentSequence[-1].DeviceUID
    retrained = dataclasses.replace(ALGORITHM, weights_sha256="cd" * 32)
    other = _sr(_analysis(algorithm=retrained)).ContributingEquipmentSequence[-1].DeviceUID
    assert same == item.DeviceUID != other


def test_every_finding_and_region_has_a_tracking_uid_and_algorithm_identification() -> None:
    sr = _sr()
    positives_boxes = sum(len(f.boxes) for f in FINDING_RESULTS if f.positive)
    assert len(finding_items(sr)) == len(FINDING_RESULTS)
    assert len(_groups(sr)) == positives_boxes
    uids = []
    for group in _tracked(sr):
        (identifier,) = _items(group, "112039")  # Tracking Identifier
        (uid,) = _items(group, TRACKING_UID)
        assert identifier.TextValue and is_valid_uid(uid.UID)
        uids.append(uid.UID)
        (name,) = _items(group, ALGORITHM_NAME)
        (version,) = _items(group, ALGORITHM_VERSION)
        assert name.TextValue == ALGORITHM.name
        assert version.TextValue.startswith(ALGORITHM.version)
    assert len(set(uids)) == len(uids)  # one finding, one UID


def test_tracking_uids_are_the_same_when_the_job_is_built_again() -> None:
    def tracking(sr: Dataset) -> list[str]:
        return [_items(group, TRACKING_UID)[0].UID for group in _tracked(sr)]

    first = tracking(_sr())
    assert tracking(_sr()) == first  # a retry or a restart: the same SR, UID for UID
    assert not set(tracking(_sr(_analysis(revision=2)))) & set(first)  # a re-opened study


def test_the_observer_is_the_node_as_a_device_with_uid_name_manufacturer_and_model() -> None:
    report = hd.sr.Comprehensive3DSR.from_dataset(_sr())
    (observer,) = report.content.get_observer_contexts()
    observer_type = next(item for item in observer if item.name == codes.DCM.ObserverType)
    assert observer_type.value == codes.DCM.Device
    values = {item.name: item.value for item in observer if item.name != codes.DCM.ObserverType}
    assert is_valid_uid(values[codes.DCM.DeviceObserverUID])
    assert values[codes.DCM.DeviceObserverName] == Settings().node.ae_title
    assert values[codes.DCM.DeviceObserverManufacturer] == "dicom-node"
    assert values[codes.DCM.DeviceObserverModelName] == ALGORITHM.name


def test_the_image_library_lists_the_analysed_image_before_the_measurements() -> None:
    sr = _sr(header=_header(PatientOrientation=["P", "F"], ImagerPixelSpacing=[0.15, 0.16]))
    names = [item.ConceptNameCodeSequence[0].CodeValue for item in sr.ContentSequence]
    library_at = names.index(codes.DCM.ImageLibrary.value)
    assert library_at < names.index(codes.DCM.ImagingMeasurements.value)  # TID 1500 row 5
    assert names.index(codes.DCM.ImagingMeasurements.value) < names.index("C0034375")  # row 12
    (group,) = _items(sr.ContentSequence[library_at], codes.DCM.ImageLibraryGroup.value)
    (entry,) = group.ContentSequence
    assert entry.ValueType == "IMAGE"
    reference = entry.ReferencedSOPSequence[0]
    assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID) == (
        sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPClassUID,
        SOURCE_UID,
    )
    described = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item for item in entry.ContentSequence
    }
    assert described["Modality"].ConceptCodeSequence[0].CodeValue == "DX"
    assert described["Pixel Data Rows"].MeasuredValueSequence[0].NumericValue == 320
    assert described["Pixel Data Columns"].MeasuredValueSequence[0].NumericValue == 300
    assert described["Patient Orientation Row"].TextValue == "P"
    assert float(described["Vertical Pixel Spacing"].MeasuredValueSequence[0].NumericValue) == (
        pytest.approx(0.15)
    )


def test_an_image_without_orientation_or_spacing_gets_a_library_entry_without_them() -> None:
    header = _header(PatientOrientation=None)
    if "ImagerPixelSpacing" in header:
        del header.ImagerPixelSpacing
    sr = _sr(header=header)
    (library,) = _items(sr, codes.DCM.ImageLibrary.value)
    entry = library.ContentSequence[0].ContentSequence[0]
    described = {item.ConceptNameCodeSequence[0].CodeMeaning for item in entry.ContentSequence}
    assert "Pixel Data Rows" in described
    assert not described & {"Patient Orientation Row", "Horizontal Pixel Spacing"}


def test_each_finding_is_a_coded_finding_with_a_coded_present_or_absent_evaluation() -> None:
    sr = _sr()
    items = finding_items(sr)  # TID 1500 row 13, in the Qualitative Evaluations container
    codes_read = [hd.sr.CodedConcept.from_dataset(i.ConceptCodeSequence[0]) for i in items]
    assert codes_read == [finding_code(f.label) for f in FINDING_RESULTS]
    for item, finding in zip(items, FINDING_RESULTS, strict=True):
        assert item.RelationshipType == "CONTAINS"
        assert item.ConceptCodeSequence[0].CodingSchemeDesignator in ("SCT", "DCM")
        assert finding.label in FINDINGS
        probability, decisions = finding_values(item)
        if finding.threshold is None:
            assert decisions == {}
        else:
            assert decisions == {
                finding_code(finding.label): PRESENT if finding.positive else ABSENT
            }
        assert probability == pytest.approx(finding.probability)


def test_no_measurement_group_lacks_a_scoord_so_ohif_3_13_loads_the_report() -> None:
    """OHIF 3.13.2 reads every measurement group's coordinates and throws on a group without
    one (tests/test_viewer_ohif.py): the only groups are the TID 1410 regions."""
    for sr in (_sr(), _not_analysed_sr()):
        groups = _groups(sr)
        assert all(_template(group) == "1410" for group in groups)
        assert all(any(i.ValueType == "SCOORD" for i in g.ContentSequence) for g in groups)
    quiet = dataclasses.replace(
        _analysis(), findings=(FindingResult("Nodule", 0.12, 0.5, False, ()),)
    )
    sr = _sr(quiet)
    # No box: no Imaging Measurements container (TID 1500 needs row 6 or row 12).
    assert not _items(sr, codes.DCM.ImagingMeasurements.value)
    assert len(finding_items(sr)) == 1


def test_each_box_is_a_closed_scoord_polyline_on_the_analysed_image_in_a_tid_1410_group() -> None:
    sr = _sr()
    planar = [group for group in _groups(sr) if _template(group) == "1410"]
    report = hd.sr.Comprehensive3DSR.from_dataset(sr)
    regions = report.content.get_planar_roi_measurement_groups()
    expected = [(f, box) for f in FINDING_RESULTS if f.positive for box in f.boxes]
    assert len(planar) == len(regions) == len(expected)
    for group, (finding, box) in zip(regions, expected, strict=True):
        assert group.finding_type == finding_code(finding.label)
        assert group.reference_type == codes.DCM.ImageRegion
        assert group.roi.ValueType == "SCOORD"
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = group.roi.value
        assert np.array_equal(points[0], points[-1]) and len(points) == 5
        assert (points[0][0], points[0][1], points[2][0], points[2][1]) == (
            box.x0,
            box.y0,
            box.x1,
            box.y1,
        )
        selected_from = group.roi.ContentSequence[0].ReferencedSOPSequence[0]
        assert selected_from.ReferencedSOPInstanceUID == SOURCE_UID


def test_every_finding_is_inferred_from_the_analysed_image() -> None:
    for item in finding_items(_sr()):
        (image,) = [c for c in item.ContentSequence if c.ValueType == "IMAGE"]
        assert image.RelationshipType == "INFERRED FROM"  # as TID 320 row 1
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == SOURCE_UID


def test_the_not_analysed_report_lists_the_image_says_why_and_names_no_algorithm() -> None:
    sr = _not_analysed_sr()
    assert not _groups(sr) and not finding_items(sr)  # nothing was measured or found
    (qualitative,) = _items(sr, "C0034375")
    (summary,) = qualitative.ContentSequence
    assert "no frontal view" in summary.TextValue
    (library,) = _items(sr, codes.DCM.ImageLibrary.value)
    entry = library.ContentSequence[0].ContentSequence[0]
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == SOURCE_UID
    purposes = [
        i.PurposeOfReferenceCodeSequence[0].CodeValue for i in sr.ContributingEquipmentSequence
    ]
    assert "Newcode1" not in purposes  # the model produced nothing here


@pytest.mark.parametrize("kind", ["analysed", "no box", "not analysed"])
def test_the_air_sr_has_no_dciodvfy_error(kind: str, tmp_path: Path) -> None:
    path = tmp_path / "sr.dcm"
    quiet = dataclasses.replace(
        _analysis(), findings=(FindingResult("Nodule", 0.12, 0.5, False, ()),)
    )
    sr = {"analysed": _sr, "no box": lambda: _sr(quiet), "not analysed": _not_analysed_sr}[kind]()
    sr.save_as(path, enforce_file_format=True)
    assert not dciodvfy_errors(path)
