"""The composite SC tells its findings apart: a colour and a number per finding, and legend
thresholds printed with enough digits to read a small operating point."""

from __future__ import annotations

import io
from datetime import datetime

import numpy as np
import pydicom

from dicom_node.config.settings import OutputSettings, Settings
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.outputs.build import build_analysis_outputs
from dicom_node.outputs.render import BOX_COLOURS, box_width
from dicom_node.outputs.sc import legend_lines, plan_captures, render_capture
from dicom_node.outputs.source import source_header
from dicom_node.outputs.sr import findings_summary
from dicom_node.results import AlgorithmInfo, Analysis, Box, FindingResult, Geometry
from tests.test_outputs import dciodvfy_errors

SIZE = 512
LABELS = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
)


def _box(index: int) -> Box:
    """Boxes on a 4 x 3 grid that never touch, so each outline keeps its own colour."""
    row, column = divmod(index, 4)
    x0, y0 = 20 + column * 120, 20 + row * 160
    return Box(x0, y0, x0 + 90, y0 + 120)


def _analysis(positives: int) -> Analysis:
    findings = tuple(
        FindingResult(label, 0.0061 + index / 100, 0.0042 + index / 10_000, True, (_box(index),))
        for index, label in enumerate(LABELS[:positives])
    )
    findings += tuple(FindingResult(label, 0.001, 0.5, False, ()) for label in LABELS[positives:])
    grid = np.arange(49, dtype=np.float32).reshape(7, 7)
    return Analysis(
        "1.2.3.4.5",
        1,
        AlgorithmInfo("m", "1", "ab" * 32, "verified", "test"),
        findings,
        {f.label: grid for f in findings},
        Geometry(SIZE, SIZE, 0, 0, SIZE, 224),
        np.full((SIZE, SIZE), 90, dtype=np.uint8),
    )


def test_eleven_positive_findings_get_eleven_distinct_colours_in_the_composite() -> None:
    analysis = _analysis(11)
    (capture,) = plan_captures(analysis, "composite")
    lines = legend_lines(analysis, capture)[1:-1]  # between the AI notice and the model line
    assert len({line.colour for line in lines}) == 11
    assert [line.colour for line in lines] == list(BOX_COLOURS[:11])
    pixels = render_capture(analysis, capture)
    inset = box_width(pixels.shape) // 2
    for index, finding in enumerate(capture.findings):
        (box,) = finding.boxes
        # The middle of each edge but the top one (the number tag sits on the top left).
        middle_y, middle_x = (box.y0 + box.y1) // 2, (box.x0 + box.x1) // 2
        edges = [
            pixels[middle_y, box.x0 + inset],
            pixels[middle_y, box.x1 - 1 - inset],
            pixels[box.y1 - 1 - inset, middle_x],
        ]
        assert all(tuple(int(c) for c in edge) == BOX_COLOURS[index] for edge in edges), index
    assert len(set(BOX_COLOURS)) == len(BOX_COLOURS) >= 12


def test_each_box_carries_its_finding_number_and_the_legend_line_starts_with_it() -> None:
    analysis = _analysis(11)
    (capture,) = plan_captures(analysis, "composite")
    texts = [line.text for line in legend_lines(analysis, capture)]
    assert [text.split(" ")[0] for text in texts[1:12]] == [f"[{n}]" for n in range(1, 12)]
    pixels = render_capture(analysis, capture)
    for index, finding in enumerate(capture.findings):
        (box,) = finding.boxes
        tag = pixels[box.y0 + 3 : box.y0 + 12, box.x0 + 3 : box.x0 + 14].reshape(-1, 3)
        # A number tag: the box colour filled, with the digits in black inside it.
        assert (tag == BOX_COLOURS[index]).all(axis=1).any(), index
        assert (tag == 0).all(axis=1).any(), index


def test_legend_and_summary_print_small_thresholds_with_three_significant_digits() -> None:
    analysis = _analysis(11)
    (capture,) = plan_captures(analysis, "composite")
    texts = [line.text for line in legend_lines(analysis, capture)]
    assert "[1] Atelectasis 0.0061 (threshold 0.0042)" in texts
    assert "[3] Infiltration 0.0261 (threshold 0.0044)" in texts
    assert not any("0.00 " in text or "0.00)" in text for text in texts)
    summary = findings_summary(analysis)
    assert "Atelectasis 0.0061 (threshold 0.0042)" in summary and "0.00)" not in summary


def test_more_positives_than_colours_continue_in_a_second_composite_never_sharing_one() -> None:
    analysis = _analysis(14)
    captures = plan_captures(analysis, "composite")
    assert [c.key for c in captures] == ["composite", "composite 2"]
    assert [len(c.findings) for c in captures] == [12, 2]
    for capture in captures:
        colours = [line.colour for line in legend_lines(analysis, capture)[1:-1]]
        assert len(set(colours)) == len(colours) == len(capture.findings)
    header = source_header(
        make_cxr_dataset(rows=SIZE, columns=SIZE, sop_instance_uid="1.2.3.4.5")
    ).dataset
    settings = Settings(outputs=OutputSettings(sc_mode="composite"))
    outputs = build_analysis_outputs(header, analysis, settings, datetime.now())
    scs = [pydicom.dcmread(io.BytesIO(o.data)) for o in outputs if o.kind == "sc"]
    assert [o.label for o in outputs if o.kind == "sc"] == ["composite", "composite 2"]
    assert len({sc.SOPInstanceUID for sc in scs}) == 2
    assert [sc.InstanceNumber for sc in scs] == [1, 2]


def test_the_eleven_finding_composite_sc_is_valid_for_dciodvfy(tmp_path) -> None:
    header = source_header(
        make_cxr_dataset(rows=SIZE, columns=SIZE, sop_instance_uid="1.2.3.4.5")
    ).dataset
    outputs = build_analysis_outputs(header, _analysis(11), Settings(), datetime.now())
    (sc,) = [o for o in outputs if o.kind == "sc"]
    path = tmp_path / "sc.dcm"
    path.write_bytes(sc.data)
    assert not dciodvfy_errors(path)
