"""Localization geometry: boxes come back where the CAM peaks, in source pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dicom_node.inference.catalogue import CATALOGUE
from dicom_node.inference.classify import classify_batch
from dicom_node.inference.models import ModelBundle
from dicom_node.inference.preprocess import centre_crop_and_resize, decode_normalised
from dicom_node.inference.localization import Box, boxes_from_cam, heatmap_in_source
from dicom_node.dev.samples import make_cxr_dataset


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
    return ModelBundle(entry, BrightnessCam(len(entry.labels)), torch.device("cpu"), "0" * 64,
                       "untrained", entry.op_thresholds, "test")


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
    known = Box(left + int(size * 0.55), top + int(size * 0.2),
                left + int(size * 0.85), top + int(size * 0.6))
    pixels[known.y0:known.y1, known.x0:known.x1] = 4095
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
