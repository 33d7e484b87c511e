"""Map a class activation map back to the source image and draw boxes from it.

The CAM lives on the model's feature grid over the centre crop.  It is upsampled to the crop's
size in source pixels and placed at the crop's offset, which exactly undoes the centre crop
and resize of preprocessing; pixels outside the crop were never seen by the model and are 0.
Boxes follow the ChestX-ray8 paper (Wang et al., CVPR 2017, section 4.2): normalise the map to
[0, 1], threshold it, and take the bounding box of each connected region.  Pure: no I/O, and
no torch (the resampling is :mod:`dicom_node.inference.resample`), so outputs and the web
pages can map heatmaps without loading the model's framework.
"""

from __future__ import annotations

import numpy as np

from dicom_node.inference.resample import resize_bilinear
from dicom_node.results import Box, Geometry

# Boxes are found on the crop resampled to at most the model's 224 px, then scaled to source
# pixels: the CAM grid is 7 x 7 (DenseNet at 224 px), so finer work only traces interpolation.
BOX_GRID = 224


def heatmap_in_source(cam: np.ndarray, geometry: Geometry) -> np.ndarray:
    """The CAM in the source image's geometry: float32, [0, 1] inside the crop, 0 outside."""
    return heatmap_at(cam, geometry, geometry.source_rows, geometry.source_columns)


def heatmap_at(cam: np.ndarray, geometry: Geometry, rows: int, columns: int) -> np.ndarray:
    """:func:`heatmap_in_source` on a ``rows`` x ``columns`` resampling of the source image."""
    scale_y, scale_x = rows / geometry.source_rows, columns / geometry.source_columns
    top, left = round(geometry.crop_top * scale_y), round(geometry.crop_left * scale_x)
    height = max(1, min(round(geometry.crop_size * scale_y), rows - top))
    width = max(1, min(round(geometry.crop_size * scale_x), columns - left))
    crop = resize_bilinear(cam, height, width)
    full = np.zeros((rows, columns), dtype=np.float32)
    full[top : top + height, left : left + width] = _normalise(crop)
    return full


def boxes_from_cam(cam: np.ndarray, geometry: Geometry, threshold: float) -> list[Box]:
    """Bounding boxes, in source pixels, of the regions at or above ``threshold``; largest first."""
    return boxes_from_cams(cam[None], geometry, threshold)[0]


def boxes_from_cams(cams: np.ndarray, geometry: Geometry, threshold: float) -> list[list[Box]]:
    """:func:`boxes_from_cam` for several maps of one image, upsampled in one call."""
    from scipy import ndimage  # only boxes need it; heatmaps do not

    grid = min(geometry.crop_size, BOX_GRID)
    scale = geometry.crop_size / grid
    upsampled = resize_bilinear(cams, grid, grid)
    result = []
    for plane in upsampled:
        labelled, _ = ndimage.label(_normalise(plane) >= threshold)
        boxes = [
            Box(
                geometry.crop_left + round(columns.start * scale),
                geometry.crop_top + round(rows.start * scale),
                geometry.crop_left + round(columns.stop * scale),
                geometry.crop_top + round(rows.stop * scale),
            )
            for rows, columns in ndimage.find_objects(labelled)
        ]
        result.append(sorted(boxes, key=lambda b: (b.x1 - b.x0) * (b.y1 - b.y0), reverse=True))
    return result


def _normalise(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-12:
        return np.zeros_like(values)
    return (values - low) / (high - low)
