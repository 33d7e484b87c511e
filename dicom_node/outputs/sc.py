"""Build the Secondary Capture heatmap images of one analysis (highdicom SC from the source).

Each SC is the source image (display copy) with the heatmap blended over it, the boxes drawn
and a burned-in legend naming the findings, their probabilities and "AI result – decision
support", so a radiologist sees in any viewer what the node found and where it looked
(Burned In Annotation YES, PS3.3 C.7.6.1.1.7).  Either one composite per study (a second one
past 12 positives, so no two findings in an image share a colour) or one SC per positive
finding; with no finding above threshold the composite says so and shows the strongest
heatmap.  Each finding's boxes carry its colour and its legend number.  This module builds
data sets; it does not write files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.errors import OutputBuildError
from dicom_node.inference.localization import heatmap_at
from dicom_node.outputs.charset import declare, without_character_set
from dicom_node.outputs.render import (
    BOX_COLOURS,
    LegendLine,
    add_legend,
    box_colour,
    draw_boxes,
    overlay,
)
from dicom_node.outputs.source import COPIED, clip_text
from dicom_node.outputs.sr import AI_NOTICE, number_text
from dicom_node.results import NO_HEATMAP, Analysis, FindingResult

NOTICE_COLOUR = (255, 220, 0)
WARNING_COLOUR = (255, 64, 64)
SERIES_NUMBER = 9902
SERIES_DESCRIPTION = "AI CXR heatmap (decision support)"


@dataclass(frozen=True)
class Capture:
    """One SC to build: which findings it shows (none: the strongest heatmap, negative)."""

    key: str  # "composite" or the finding label, for its UID
    findings: tuple[FindingResult, ...]


def plan_captures(analysis: Analysis, mode: str) -> list[Capture]:
    """``composite``: one SC of all positives; ``per_finding``: one SC per positive finding.

    A composite holds at most one finding per box colour, so no two findings in an image share
    one: more positives than colours continue in "composite 2" and so on.  Either way a study
    with no positive finding gets one composite of the strongest heatmap.
    """
    positives = tuple(f for f in analysis.findings if f.positive)
    if not positives:
        return [Capture("composite", ())]
    if mode == "per_finding":
        return [Capture(f.label, (f,)) for f in positives]
    size = len(BOX_COLOURS)
    return [
        Capture(
            "composite" if start == 0 else f"composite {start // size + 1}",
            positives[start : start + size],
        )
        for start in range(0, len(positives), size)
    ]


def build_sc(
    header: Dataset,
    analysis: Analysis,
    capture: Capture,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    now: datetime,
) -> hd.sc.SCImage:
    """One SC image of ``capture``, in the source's patient and study (``header``).

    Raises
    ------
    OutputBuildError
        When highdicom refuses a value.
    """
    pixels = render_capture(analysis, capture)
    orientation = _orientation(header)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=without_character_set(header),
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_instance_uid,
            series_number=SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid,
            instance_number=instance_number,
            manufacturer="dicom-node",
            patient_orientation=orientation or ("L", "F"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputBuildError(
            f"SC could not be built ({type(exc).__name__}); a source attribute may be invalid"
        ) from None
    if orientation is None:
        # Type 2C (PS3.3 C.7.6.1): present but empty when the source does not say, rather
        # than a guess that could mislabel a flipped image.
        sc.PatientOrientation = None  # type: ignore[assignment]  # pydicom: None is empty
    _describe(sc, header, analysis, capture, now)
    # The source's character set, never a guess at it (PS3.5 6.1.2.3; see outputs.charset).
    declare(sc, header.get("SpecificCharacterSet"), COPIED)
    return sc


def render_capture(analysis: Analysis, capture: Capture) -> np.ndarray:
    """The RGB pixels of ``capture``: overlay, boxes and legend band."""
    grey = analysis.display
    rows, columns = grey.shape
    shown = capture.findings or _strongest(analysis)
    cams = [_unit(analysis.cams[f.label]) for f in shown if f.label in analysis.cams]
    # Several findings: the maximum of their normalised maps, taken on the model's grid and
    # upsampled once (bilinear upsampling keeps each map's shape; 11 maps cost as one).
    heat = heatmap_at(np.max(cams, axis=0), analysis.geometry, rows, columns) if cams else None
    scale_x = columns / analysis.geometry.source_columns
    scale_y = rows / analysis.geometry.source_rows
    boxes = [
        (
            (
                round(b.x0 * scale_x),
                round(b.y0 * scale_y),
                round(b.x1 * scale_x),
                round(b.y1 * scale_y),
            ),
            index,
        )
        for index, finding in enumerate(capture.findings)
        for b in finding.boxes
    ]
    rgb = draw_boxes(overlay(grey, heat), boxes)
    return add_legend(rgb, legend_lines(analysis, capture))


def legend_lines(analysis: Analysis, capture: Capture) -> list[LegendLine]:
    """The burned-in text: the AI notice, any weights warning, then the findings."""
    lines = [LegendLine(AI_NOTICE, NOTICE_COLOUR)]
    if analysis.algorithm.warning_label:
        lines.append(LegendLine(analysis.algorithm.warning_label, WARNING_COLOUR))
    if not analysis.algorithm.heatmaps:
        lines.append(LegendLine(f"{NO_HEATMAP}: image and findings only", WARNING_COLOUR))
    for index, finding in enumerate(capture.findings):  # numbered as the finding's boxes
        lines.append(LegendLine(f"[{index + 1}] {_finding_text(finding)}", box_colour(index)))
    if not capture.findings:
        lines.append(LegendLine("No finding above threshold"))
        lines.extend(LegendLine(f"Heatmap shown: {_finding_text(f)}") for f in _strongest(analysis))
    lines.append(LegendLine(f"Model {analysis.algorithm.name} {analysis.algorithm.version}"))
    return lines


def _unit(cam: np.ndarray) -> np.ndarray:
    low, high = float(cam.min()), float(cam.max())
    return (cam - low) / (high - low) if high > low else np.zeros_like(cam)


def _finding_text(finding: FindingResult) -> str:
    threshold = (
        "no operating point"
        if finding.threshold is None
        else f"threshold {number_text(finding.threshold)}"
    )
    return f"{finding.label} {number_text(finding.probability)} ({threshold})"


def _strongest(analysis: Analysis) -> tuple[FindingResult, ...]:
    """The finding closest to its operating point (by probability over threshold)."""
    rated = [f for f in analysis.findings if f.label in analysis.cams]
    if not rated:
        return ()
    return (max(rated, key=lambda f: f.probability / (f.threshold or 1.0)),)


def _orientation(header: Dataset) -> tuple[str, str] | None:
    """The source's Patient Orientation when it is two single directions highdicom accepts."""
    value = header.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    row, column = (str(v) for v in value)
    if {row, column} <= {"A", "P", "L", "R", "H", "F"}:
        return (row, column)
    return None


def _describe(
    sc: hd.sc.SCImage, header: Dataset, analysis: Analysis, capture: Capture, now: datetime
) -> None:
    """Mark the image as derived AI output and point back at the analysed image."""
    local = now.astimezone()  # local time, as highdicom's creation and capture times
    sc.TimezoneOffsetFromUTC = local.strftime("%z")  # PS3.3 C.12.1.1.8
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"  # PS3.3 C.7.6.1.1.7
    sc.ConversionType = "WSD"  # workstation (PS3.3 C.8.6.1)
    description = SERIES_DESCRIPTION
    if analysis.algorithm.warning_label:
        description = f"{analysis.algorithm.warning_label} {description}"
    sc.SeriesDescription = clip_text(description, 64)
    shown = ", ".join(f.label for f in capture.findings) or "no finding above threshold"
    what = f"heatmap of {shown}" if analysis.algorithm.heatmaps else f"{NO_HEATMAP}; {shown}"
    sc.DerivationDescription = clip_text(f"{AI_NOTICE}: {what}", 1024)
    # PS3.3 C.7.3.1: Laterality is Type 2C (paired body parts).  A chest is not paired, but
    # validators cannot tell from an SC, so it is present and empty: not applicable.
    sc.Laterality = None  # type: ignore[assignment]  # pydicom: None is empty
    # pydicom types DA/TM keywords as its DA/TM classes but takes (and converts) strings
    sc.ContentDate, sc.ContentTime = local.strftime("%Y%m%d"), local.strftime("%H%M%S")  # type: ignore[assignment]
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = [source]  # PS3.3 C.7.6.1: derived from this image
