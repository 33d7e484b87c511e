"""The CAM archive of an analysis: one ``.npz`` per job attempt under ``results/``.

The worker writes the class activation maps on the model's feature grid with the geometry of
the crop that produced them; the web heatmap page and the Parametric Maps read them back and
map them onto the source image exactly (``inference.localization.heatmap_at``).  numpy only,
so reading a heatmap never loads torch.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dicom_node.jobs.space import require_free_space
from dicom_node.results import Geometry
from dicom_node.store import write_atomic

RESULTS_DIR = "results"


def cam_path(study_instance_uid: str, job_id: int, attempt: int) -> str:
    """The archive of one attempt, relative to the storage root (the attempt is in the name,
    so a rescued worker cannot overwrite an archive another attempt recorded)."""
    return f"{RESULTS_DIR}/{study_instance_uid}/job-{job_id}-attempt-{attempt}.npz"


def heatmap_path(relative: str, label: str) -> str:
    """A finding's ``heatmap_path``: the archive and the label's key in it."""
    return f"{relative}#{label_key(label)}"


def write_cams(
    storage_root: Path,
    relative: str,
    cams: np.ndarray | None,
    labels: Sequence[str],
    geometry: Geometry,
    *,
    min_free_mb: int,
) -> None:
    """Write the CAMs of every label (``labels[i]`` names ``cams[i]``; empty names are
    skipped) with their geometry, durably, keeping the ``[storage] min_free_mb`` reserve
    (``InsufficientSpaceError``).  ``cams`` None (a model without heatmaps): the geometry
    only."""
    buffer = io.BytesIO()
    arrays = {} if cams is None else {label_key(n): cams[i] for i, n in enumerate(labels) if n}
    np.savez_compressed(
        buffer,
        geometry=np.array(
            [
                geometry.source_rows,
                geometry.source_columns,
                geometry.crop_top,
                geometry.crop_left,
                geometry.crop_size,
                geometry.resolution,
            ]
        ),
        **arrays,
    )
    archive = buffer.getvalue()
    require_free_space(storage_root, min_free_mb, len(archive))
    write_atomic(storage_root, storage_root / relative, [archive])


def load_cam(storage_root: Path, heatmap_path: str) -> tuple[np.ndarray, Geometry]:
    """The CAM and geometry behind a finding's ``heatmap_path`` (``file.npz#label``)."""
    relative, key = heatmap_path.split("#", 1)
    with np.load(storage_root / relative) as archive:
        return archive[key], Geometry(*(int(v) for v in archive["geometry"]))


def label_key(label: str) -> str:
    """The archive key of a label: lower case, runs of other characters as one ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")
