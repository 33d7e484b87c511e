"""PNG pictures for the study page: the analysed image, optionally with one finding's heatmap
and boxes, rendered on the server with numpy and Pillow.

The CAM the worker stored under ``<storage.root>/results/`` is mapped back onto the image in
the source's own geometry (``localization.heatmap_at``) and blended with the same colormap and
alpha ramp as the heatmap Secondary Captures (``outputs.render``), so the browser shows what
PACS shows.  No legend is drawn: the page itself names the finding and its numbers.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config.settings import Settings
from dicom_node.db.models import AnalysisResult, Finding, Instance
from dicom_node.errors import InvalidRequestError, StudyNotFoundError
from dicom_node.inference.localization import heatmap_at
from dicom_node.inference.preprocess import decode_for_model, display_image, read_dataset
from dicom_node.jobs.cams import load_cam
from dicom_node.outputs.render import draw_boxes, overlay
from dicom_node.web.queries import current_analysis_jobs

DISPLAY_SIZE = 1024  # long side of the picture in the browser, pixels
DECODE_RESOLUTION = 1024  # JPEG 2000 images are decoded at reduced size down to this
IMAGE_PURGED = "image purged by retention"


@dataclass(frozen=True)
class Picture:
    """What to draw: the analysed image's file, and the finding's stored heatmap and boxes."""

    image_path: Path
    heatmap_path: str | None
    boxes: tuple[tuple[int, int, int, int], ...]


def picture_of(
    session: Session, settings: Settings, study_instance_uid: str, label: str | None
) -> Picture:
    """Find the analysed image of the study's current result and, for ``label``, its heatmap.

    Raises
    ------
    StudyNotFoundError
        No analysed image for this study.
    InvalidRequestError
        ``label`` is not a finding of the result.
    """
    job = current_analysis_jobs(session, [study_instance_uid]).get(study_instance_uid)
    result = session.get(AnalysisResult, job.id) if job is not None else None
    instance = session.get(Instance, result.sop_instance_uid) if result is not None else None
    if result is None or instance is None:
        raise StudyNotFoundError(f"study {study_instance_uid[:64]!r} has no analysed image")
    if instance.purged_at is not None:  # the results stay; only the received file is gone
        raise StudyNotFoundError(IMAGE_PURGED)
    image_path = Path(settings.storage.root) / instance.path
    if label is None:
        return Picture(image_path, None, ())
    finding = session.scalar(
        select(Finding).where(Finding.job_id == result.job_id, Finding.label == label)
    )
    if finding is None:
        raise InvalidRequestError(f"{label[:64]!r} is not a finding of this study's result")
    boxes = tuple(tuple(b) for b in json.loads(finding.boxes)) if finding.boxes else ()
    return Picture(image_path, finding.heatmap_path, boxes)


def render_png(settings: Settings, picture: Picture) -> bytes:
    """The picture as PNG bytes: greyscale image, heatmap blended over it, boxes drawn."""
    ds = read_dataset(picture.image_path, settings.analysis.max_megapixels)
    image, _ = decode_for_model(ds, DECODE_RESOLUTION, settings.analysis.apply_voi_lut)
    grey = display_image(image, DISPLAY_SIZE)
    rgb = overlay(grey, None)
    if picture.heatmap_path:
        cam, geometry = load_cam(Path(settings.storage.root), picture.heatmap_path)
        rgb = overlay(grey, heatmap_at(cam, geometry, grey.shape[0], grey.shape[1]))
        scale_x = grey.shape[1] / geometry.source_columns
        scale_y = grey.shape[0] / geometry.source_rows
        rgb = draw_boxes(
            rgb,
            [
                (
                    (
                        round(x0 * scale_x),
                        round(y0 * scale_y),
                        round(x1 * scale_x),
                        round(y1 * scale_y),
                    ),
                    0,
                )
                for x0, y0, x1, y1 in picture.boxes
            ],
        )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
