"""Localization geometry: boxes come back where the CAM peaks, in source pixels; the numpy
resampling is PyTorch's bilinear interpolation (``align_corners=False``), number for number."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.inference.card import catalogue_card
from dicom_node.inference.catalogue import CATALOGUE
from dicom_node.inference.classify import classify_batch
from dicom_node.inference.localization import (
    boxes_from_cam,
    boxes_from_cams,
    heatmap_at,
    heatmap_in_source,
)
from dicom_node.inference.models import ModelBundle
from dicom_node.inference.preprocess import centre_crop_and_resize, decode_normalised
from dicom_node.inference.resample import bilinear_matrix, resize_bilinear
from dicom_node.inference.runtimes import TorchRuntime
from dicom_node.results import Box, Geometry


class BrightnessCam(nn.Module):
    """A network whose CAM is the input's brightness on a 4-pixel grid (weights set so)."""

    def __init__(self, labels: int) -> None:
        super().__init__()
        self.head = nn.Linear(1, labels)
        with torch.no_grad():
            self.head.weight.fill_(1.0)
            self.head.bias.zero_()

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d((x + 1024) / 2048, 4)


def _bundle() -> ModelBundle:
    entry = CATALOGUE["densenet121-res224-all"]
    network = BrightnessCam(len(entry.labels))
    runtime = TorchRuntime(network.feature_map, network.head, torch.device("cpu"))
    return ModelBundle(
        catalogue_card(entry),
        runtime,
        "0" * 64,
        "untrained",
        entry.op_thresholds,
        "test",
    )


def _iou(a: Box, b: Box) -> float:
    ix = max(0, min(a.x1, b.x1) - max(a.x0, b.x0))
    iy = max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = ix * iy
    area = lambda box: (box.x1 - box.x0) * (box.y1 - box.y0)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


@pytest.mark.parametrize("rows, columns", [(600, 400), (1000, 1500), (517, 333), (2500, 2048)])
def test_box_comes_back_on_the_known_region_in_source_pixels(rows: int, columns: int) -> None:
    ds = make_cxr_dataset(rows=rows, columns=columns, bits_stored=12)
    pixels = np.zeros((rows, columns), dtype=np.uint16)
    size = min(rows, columns)
    top, left = rows // 2 - size // 2, columns // 2 - size // 2
    known = Box(
        left + int(size * 0.55),
        top + int(size * 0.2),
        left + int(size * 0.85),
        top + int(size * 0.6),
    )
    pixels[known.y0 : known.y1, known.x0 : known.x1] = 4095
    ds.PixelData = pixels.tobytes()
    prepared = centre_crop_and_resize(decode_normalised(ds), 224)
    (scores,) = classify_batch(_bundle(), prepared.pixels[None])
    heatmap = heatmap_in_source(scores.cams[0], prepared.geometry)
    boxes = boxes_from_cam(scores.cams[0], prepared.geometry, threshold=0.5)
    assert heatmap.shape == (rows, columns)
    assert len(boxes) == 1
    assert _iou(boxes[0], known) >= 0.9, (boxes[0], known)
    peak = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    assert known.y0 <= peak[0] < known.y1 and known.x0 <= peak[1] < known.x1


def test_heatmap_is_zero_outside_the_crop_the_model_saw() -> None:
    ds = make_cxr_dataset(rows=300, columns=600)
    prepared = centre_crop_and_resize(decode_normalised(ds), 224)
    (scores,) = classify_batch(_bundle(), prepared.pixels[None])
    heatmap = heatmap_in_source(scores.cams[0], prepared.geometry)
    assert heatmap[:, :150].max() == 0 and heatmap[:, 450:].max() == 0
    assert heatmap[:, 150:450].max() == pytest.approx(1.0)


def _torch_bilinear(values: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """The reference: what localization computed with torch before it went numpy-only."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    while tensor.dim() < 4:
        tensor = tensor[None]
    resized = F.interpolate(tensor, size=(rows, columns), mode="bilinear", align_corners=False)
    return resized.reshape(*values.shape[:-2], rows, columns).numpy()


@pytest.mark.parametrize(
    "shape", [(7, 7), (16, 16), (1, 1), (1, 9), (5, 3), (224, 224), (333, 517)]
)
@pytest.mark.parametrize("size", [(1, 1), (7, 7), (2, 13), (223, 225), (517, 333), (1000, 3)])
def test_resampling_equals_torch_bilinear(shape: tuple[int, int], size: tuple[int, int]) -> None:
    """Up- and down-sampling, odd sizes, one-pixel axes; values on the scale of a CAM."""
    rng = np.random.default_rng(shape[0] * 1000 + size[1])
    values = (rng.standard_normal((3, *shape)) * 50).astype(np.float32)
    got = resize_bilinear(values, *size)
    assert got.dtype == np.float32 and got.shape == (3, *size)
    np.testing.assert_allclose(got, _torch_bilinear(values, *size), rtol=1e-6, atol=1e-6 * 50)


@pytest.mark.parametrize(
    "size, output_size", [(7, 3001), (3000, 224), (513, 511), (3000, 2999), (224, 2048)]
)
def test_resampling_weights_equal_torch_to_the_bit(size: int, output_size: int) -> None:
    """The weights themselves, read off torch by resampling each unit vector: at large sizes
    a float64 sample position would differ from torch's float32 one by 1e-4."""
    unit_vectors = np.eye(size, dtype=np.float32)[:, :, None]  # (size, size, 1): one per image
    reference = _torch_bilinear(unit_vectors, output_size, 1)[:, :, 0].T
    np.testing.assert_array_equal(bilinear_matrix(size, output_size), reference)


@pytest.mark.parametrize(
    "geometry, rows, columns",
    [
        (Geometry(600, 400, 100, 0, 400, 224), 600, 400),  # source size: upsampled 7 -> 400
        (Geometry(2500, 2048, 226, 0, 2048, 224), 625, 512),  # a reduced display copy
        (Geometry(517, 333, 92, 0, 333, 224), 517, 333),  # odd sizes
        (Geometry(3, 5, 0, 1, 3, 224), 3, 5),  # smaller than the CAM grid
    ],
)
def test_heatmap_at_equals_the_torch_computation(
    geometry: Geometry, rows: int, columns: int
) -> None:
    cam = np.random.default_rng(rows).standard_normal((7, 7)).astype(np.float32)
    heatmap = heatmap_at(cam, geometry, rows, columns)
    scale_y, scale_x = rows / geometry.source_rows, columns / geometry.source_columns
    top, left = round(geometry.crop_top * scale_y), round(geometry.crop_left * scale_x)
    height = max(1, min(round(geometry.crop_size * scale_y), rows - top))
    width = max(1, min(round(geometry.crop_size * scale_x), columns - left))
    crop = _torch_bilinear(cam, height, width)
    expected = np.zeros((rows, columns), dtype=np.float32)
    expected[top : top + height, left : left + width] = (crop - crop.min()) / (
        crop.max() - crop.min()
    )
    np.testing.assert_allclose(heatmap, expected, atol=1e-6)


def test_boxes_of_a_large_crop_are_scaled_from_the_box_grid_to_source_pixels() -> None:
    """A crop larger than BOX_GRID: regions are found on the 224 px map, then scaled."""
    cams = np.zeros((2, 7, 7), dtype=np.float32)
    cams[0, 1:3, 4:6] = 1.0
    cams[1, 5, 0] = 1.0
    geometry = Geometry(3000, 2500, 250, 0, 2500, 224)
    first, second = boxes_from_cams(cams, geometry, threshold=0.5)
    assert len(first) == 1 and len(second) == 1
    cell = 2500 / 7  # source pixels per CAM cell
    for box, (x0, y0, x1, y1) in ((first[0], (4, 1, 6, 3)), (second[0], (0, 5, 1, 6))):
        assert abs(box.x0 - x0 * cell) < cell / 2 and abs(box.x1 - x1 * cell) < cell / 2
        assert abs(box.y0 - 250 - y0 * cell) < cell / 2
        assert abs(box.y1 - 250 - y1 * cell) < cell / 2
