"""SR and SC outputs: valid by dciodvfy, faithful to the stored results, marked as AI output."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.settings import OutputSettings, Settings
from dicom_node.db.models import AnalysisResult, Finding, Instance, Job, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import CR_STORAGE, make_cxr_dataset
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.worker import Worker
from dicom_node.outputs.build import build_analysis_outputs
from dicom_node.outputs.codes import (
    ABSENT,
    FINDINGS,
    PRESENT,
    QUALITATIVE_EVALUATIONS,
    finding_code,
)
from dicom_node.outputs.sc import Capture, legend_lines, plan_captures, render_capture
from dicom_node.outputs.source import source_header
from dicom_node.results import AlgorithmInfo, Analysis, Box, FindingResult, Geometry
from dicom_node.studies import close_quiet_studies
from tests.helpers import associate, send_datasets, send_raw, split_file


def dciodvfy_errors(path: Path) -> set[str]:
    """The error lines dciodvfy (Debian's dicom3tools) reports for ``path``."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, timeout=120)
    text = (run.stdout + run.stderr).decode("utf-8", errors="replace")
    return {line.strip() for line in text.splitlines() if line.startswith("Error")}


def _analyse_everything(node: Any) -> None:
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    worker = Worker(node.settings, node.session_factory, load_bundle(node.settings))
    while worker.run_once():
        pass


def _outputs(node: Any) -> list[Output]:
    with session_scope(node.session_factory) as session:
        return list(session.scalars(select(Output).order_by(Output.kind)))


@pytest.mark.slow
def test_every_output_for_the_shared_chest_xrays_has_no_dciodvfy_error_of_our_making(
    node: Any, shared_data: Path
) -> None:
    files = sorted((shared_data / "dicom" / "cxr").glob("*.dcm"))
    statuses = {path.name: _send_as_is(node.scp_port, path) for path in files}
    assert set(statuses.values()) == {0}, statuses
    _analyse_everything(node)
    root = Path(node.settings.storage.root)
    with session_scope(node.session_factory) as session:
        sources = {
            sop: root / path
            for sop, path in session.execute(select(Instance.sop_instance_uid, Instance.path))
        }
        jobs = {job.id: job.state for job in session.scalars(select(Job))}
    outputs = _outputs(node)
    assert {kind for kind in (o.kind for o in outputs)} == {"sr", "sc"}
    assert len({o.study_instance_uid for o in outputs if o.kind == "sr"}) == len(jobs)
    for output in outputs:
        written = pydicom.dcmread(root / output.path)
        source = sources[_source_of(written)]
        ours = dciodvfy_errors(root / output.path) - dciodvfy_errors(source)
        assert not ours, (output.kind, sorted(ours))


def _send_as_is(port: int, path: Path) -> int | None:
    """Send a file in its own SOP class and transfer syntax (proposed alone)."""
    raw = split_file(path, CR_STORAGE)
    assoc = associate(port, [raw.sop_class_uid], transfer_syntaxes=[raw.transfer_syntax_uid])
    try:
        return send_raw(assoc, raw)
    finally:
        assoc.release()


def _source_of(written: pydicom.Dataset) -> str:
    if "SourceImageSequence" in written:
        return str(written.SourceImageSequence[0].ReferencedSOPInstanceUID)
    evidence = written.CurrentRequestedProcedureEvidenceSequence[0]
    return str(
        evidence.ReferencedSeriesSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    )


def test_sr_read_back_by_highdicom_equals_the_stored_findings_and_boxes(node: Any) -> None:
    source = make_cxr_dataset(rows=400, columns=360)
    assert send_datasets(node.scp_port, [source]) == [0]
    _analyse_everything(node)
    root = Path(node.settings.storage.root)
    report = hd.sr.srread(root / next(o.path for o in _outputs(node) if o.kind == "sr"))
    with session_scope(node.session_factory) as session:
        result = session.scalars(select(AnalysisResult)).one()
        stored = {f.label: f for f in session.scalars(select(Finding))}
    assert report.StudyInstanceUID == source.StudyInstanceUID
    assert report.SeriesInstanceUID != source.SeriesInstanceUID
    assert (report.PatientID, str(report.PatientName)) == (
        source.PatientID,
        str(source.PatientName),
    )
    # No TID 1501 group (OHIF 3.13.2 cannot load one without a SCOORD): the findings are the
    # coded items of the Qualitative Evaluations container (TID 1500 row 13).
    assert report.content.get_image_measurement_groups() == []
    findings = finding_items(report)
    assert len(findings) == len(stored) == 18
    read = {}
    for item in findings:
        code = hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0])
        label = next(label for label in FINDINGS if finding_code(label) == code)
        probability, decision = finding_values(item)
        read[label] = (probability, decision[finding_code(label)] == PRESENT)
        assert decision[finding_code(label)] in (PRESENT, ABSENT)
    assert read == {
        label: (pytest.approx(f.probability, abs=1e-6), f.positive) for label, f in stored.items()
    }
    positives = [label for label, (_, positive) in read.items() if positive]
    order = list(read)  # dicts keep the report's order
    assert order[: len(positives)] == sorted(positives, key=lambda f: -stored[f].probability)
    regions = report.content.get_planar_roi_measurement_groups()
    boxes = {}
    for group in regions:
        label = next(label for label in FINDINGS if finding_code(label) == group.finding_type)
        points = group.roi.value
        assert group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert np.array_equal(points[0], points[-1]) and len(points) == 5  # closed
        image = group.roi.ContentSequence[0]  # the SELECTED FROM image (PS3.3 C.18.6)
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        boxes.setdefault(label, []).append(
            [int(points[0][0]), int(points[0][1]), int(points[2][0]), int(points[2][1])]
        )
    assert boxes == {
        label: json.loads(f.boxes)
        for label, f in stored.items()
        if f.positive and json.loads(f.boxes or "[]")
    }
    assert result.weights_sha256 in " ".join(str(item.TextValue) for item in _text_items(report))


def finding_items(report: Any) -> list[Any]:
    """The TID 1500 row 13 items ``(121071, DCM, "Finding") = <finding>`` of the report's
    Qualitative Evaluations container (TID 1500 row 12), in the report's order."""
    (container,) = [
        item
        for item in report.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == QUALITATIVE_EVALUATIONS.value
    ]
    return [
        item
        for item in container.ContentSequence
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "121071"
    ]


def finding_values(item: Any) -> tuple[float, dict[Any, Any]]:
    """The probability (NUM 122157) and the decision (finding code = Present or Absent) that a
    finding item has as HAS PROPERTIES children."""
    properties = [c for c in item.ContentSequence if c.RelationshipType == "HAS PROPERTIES"]
    (probability,) = [
        float(c.MeasuredValueSequence[0].NumericValue)
        for c in properties
        if c.ValueType == "NUM" and c.ConceptNameCodeSequence[0].CodeValue == "122157"
    ]
    decision = {
        hd.sr.CodedConcept.from_dataset(
            c.ConceptNameCodeSequence[0]
        ): hd.sr.CodedConcept.from_dataset(c.ConceptCodeSequence[0])
        for c in properties
        if c.ValueType == "CODE"
    }
    return probability, decision


def _text_items(report: Any) -> list[Any]:
    found = []

    def walk(items: Any) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                found.append(item)
            walk(item.get("ContentSequence", []))

    walk(report.ContentSequence)
    return found


def test_sc_is_burned_in_rgb_in_the_source_study_with_the_ai_legend(node: Any) -> None:
    source = make_cxr_dataset(rows=3000, columns=2500)
    assert send_datasets(node.scp_port, [source]) == [0]
    _analyse_everything(node)
    root = Path(node.settings.storage.root)
    captures = [o for o in _outputs(node) if o.kind == "sc"]
    assert len(captures) == 1  # composite by default
    sc = pydicom.dcmread(root / captures[0].path)
    assert (sc.StudyInstanceUID, sc.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert (sc.PhotometricInterpretation, sc.SamplesPerPixel, sc.BurnedInAnnotation) == (
        "RGB",
        3,
        "YES",
    )
    assert sc.Columns <= 2048 and sc.Rows > 2048 * 2500 / 3000  # long side capped; legend below
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "decision support" in sc.SeriesDescription
    pixels = sc.pixel_array
    image_rows = round(3000 * sc.Columns / 2500)
    legend = pixels[image_rows:]
    assert legend.max() > 200 and (legend.reshape(-1, 3) == 0).all(axis=1).mean() > 0.5


def test_per_finding_mode_writes_one_sc_per_positive_and_a_negative_study_still_gets_one(
    node_factory: Any,
) -> None:
    node = node_factory(outputs=OutputSettings(sc_mode="per_finding"))
    sources = [make_cxr_dataset(rows=256, columns=256, seed=seed) for seed in range(2)]
    assert send_datasets(node.scp_port, sources) == [0, 0]
    _analyse_everything(node)
    with session_scope(node.session_factory) as session:
        positives = {study: set() for study in (s.StudyInstanceUID for s in sources)}
        for finding, result in session.execute(
            select(Finding, AnalysisResult).join(
                AnalysisResult, Finding.job_id == AnalysisResult.job_id
            )
        ):
            if finding.positive:
                positives[result.study_instance_uid].add(finding.label)
    for study, labels in positives.items():
        captures = [o for o in _outputs(node) if o.kind == "sc" and o.study_instance_uid == study]
        expected = labels or {None}
        assert {o.label for o in captures} == expected


def test_source_values_that_break_their_vr_are_left_out_not_copied() -> None:
    source = make_cxr_dataset()
    source.PatientAge = "62"  # AS needs 4 characters, e.g. 062Y
    source.StudyDate = "d14a028c2a3a2bc9"  # an anonymiser's hash
    source.PatientSex = "X"  # not M, F or O
    source.PatientBirthDate = "19010231"  # matches the DA pattern, is no date
    source.StudyTime = "120000-130000"  # a range: for queries, not for an image
    header = source_header(source)
    assert set(header.dropped) == {
        "PatientAge",
        "StudyDate",
        "PatientSex",
        "PatientBirthDate",
        "StudyTime",
    }
    assert "PatientAge" not in header.dataset and header.dataset.StudyDate is None
    assert header.dataset.PatientID == source.PatientID


def _analysis(revision: int = 1, sha: str = "ab" * 32) -> Analysis:
    findings = (
        FindingResult("Effusion", 0.8, 0.5, True, (Box(10, 20, 100, 120),)),
        FindingResult("Mass", 0.1, 0.5, False, ()),
    )
    cams = {f.label: np.ones((7, 7), dtype=np.float32) for f in findings}
    return Analysis(
        "1.2.3.4.5",
        revision,
        AlgorithmInfo("m", "1", sha, "verified", "test"),
        findings,
        cams,
        Geometry(256, 256, 0, 0, 256, 224),
        np.zeros((256, 256), dtype=np.uint8),
    )


def test_uids_repeat_for_the_same_inputs_and_change_with_revision_or_model() -> None:
    header = source_header(
        make_cxr_dataset(rows=256, columns=256, sop_instance_uid="1.2.3.4.5")
    ).dataset
    settings = Settings()

    def uids(analysis: Analysis) -> set[tuple[str, str, str]]:
        return {
            (o.kind, o.sop_instance_uid, o.series_instance_uid)
            for o in build_analysis_outputs(header, analysis, settings, datetime.now())
        }

    first = uids(_analysis())
    assert uids(_analysis()) == first  # rebuilt later (a retry, a restart): same UIDs
    assert not {u for _, u, _ in uids(_analysis(revision=2))} & {u for _, u, _ in first}
    assert not {u for _, u, _ in uids(_analysis(sha="cd" * 32))} & {u for _, u, _ in first}
    assert all(u.startswith(settings.node.org_uid_root + ".") and len(u) <= 64 for _, u, _ in first)


def test_a_study_that_is_not_analysed_gets_an_sr_saying_why(node: Any) -> None:
    lateral = make_cxr_dataset(rows=256, columns=256, view_position="LL")
    assert send_datasets(node.scp_port, [lateral]) == [0]
    _analyse_everything(node)
    (output,) = _outputs(node)
    report = hd.sr.srread(Path(node.settings.storage.root) / output.path)
    texts = " ".join(str(item.TextValue) for item in _text_items(report))
    assert "not analysed: lateral view" in texts and "decision support" in texts
    assert report.StudyInstanceUID == lateral.StudyInstanceUID
    # Nothing measured: no Imaging Measurements container and no finding, only the reason.
    assert report.content.get_image_measurement_groups() == []
    assert finding_items(report) == []
    assert not dciodvfy_errors(Path(node.settings.storage.root) / output.path)


def test_not_analysed_sr_can_be_switched_off(node_factory: Any) -> None:
    node = node_factory(outputs=OutputSettings(report_not_analysed=False))
    assert send_datasets(node.scp_port, [make_cxr_dataset(view_position="LL")]) == [0]
    _analyse_everything(node)
    with session_scope(node.session_factory) as session:
        assert session.scalars(select(Job.state)).all() == ["skipped"]
    assert _outputs(node) == []


def test_a_study_with_no_positive_finding_gets_one_sc_saying_so_with_the_strongest_heatmap() -> (
    None
):
    gradient = np.arange(49, dtype=np.float32).reshape(7, 7)
    quiet = dataclasses.replace(
        _analysis(),
        findings=(
            FindingResult("Effusion", 0.30, 0.5, False, ()),
            FindingResult("Mass", 0.05, 0.5, False, ()),
        ),
        cams={"Effusion": gradient, "Mass": gradient.T},
    )
    (capture,) = plan_captures(quiet, "per_finding")
    assert capture == Capture("composite", ())
    texts = [line.text for line in legend_lines(quiet, capture)]
    assert texts[0] == "AI result – decision support" and "No finding above threshold" in texts
    assert "Heatmap shown: Effusion 0.30 (threshold 0.50)" in texts  # the nearest to its threshold
    pixels = render_capture(quiet, capture)
    assert pixels.shape[0] > 256 and pixels.shape[1] == 256  # the legend band below the image
    assert (pixels[:256, :, 0] != pixels[:256, :, 2]).any()  # the heatmap is drawn in colour


def test_site_labels_sharing_their_first_16_characters_get_different_local_codes() -> None:
    first = finding_code("Pulmonary nodule, solitary")
    second = finding_code("Pulmonary nodule, multiple")
    assert first.value != second.value and len(first.value) <= 16 and len(second.value) <= 16
    assert first.meaning == "Pulmonary nodule, solitary"
    assert finding_code("Short label").value == "SHORT_LABEL"
