"""A test model whose Effusion score follows a known image feature, and studies that vary it.

The feature is the brightness ``b`` of the image's central region (its pixels times ``b``).
The checkpoint is the seeded test DenseNet with its Effusion head row replaced by one that
reads the pooled feature channel most correlated with ``b`` on calibration images (|r| about
0.98 for this seed), scaled so the scores spread over (0, 1); every other head row is zero
with a low bias.  So the score is (nearly) monotonic in ``b``, and labels drawn from ``b``
give the model a real, imperfect discrimination that the report must measure.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pydicom

from dicom_node.dev.samples import make_cxr_dataset

EFFUSION = 7  # the output index of Effusion in the 18-output DenseNet
ROWS, COLUMNS = 320, 288
BOX = (COLUMNS // 4, ROWS // 4, COLUMNS // 2, ROWS // 2)  # the region b scales (x, y, w, h)


def study_dataset(index: int, brightness: float, prefix: str) -> pydicom.Dataset:
    """One CXR study whose central region is scaled by ``brightness``."""
    ds = make_cxr_dataset(
        rows=ROWS,
        columns=COLUMNS,
        seed=index,
        accession_number=f"{prefix}{index:05d}",
        patient_id=f"{prefix}-{index:05d}",
    )
    pixels = np.frombuffer(ds.PixelData, dtype=np.uint16).reshape(ROWS, COLUMNS).astype(float)
    x, y, w, h = BOX
    pixels[y : y + h, x : x + w] *= brightness
    ds.PixelData = np.clip(pixels, 0, 4095).astype(np.uint16).tobytes()
    return ds


def brightness_grid(count: int, offset: float) -> np.ndarray:
    """``count`` brightness values evenly spread over [0.5, 1.0] (stratified: two sets with
    different offsets come from the same distribution with little sampling noise)."""
    return 0.5 + 0.5 * (np.arange(count) + offset) / count


def label_of(index: int, brightness: float) -> int:
    """Effusion present with probability rising with brightness (0 at 0.55, 1 at 0.95),
    drawn by a low-discrepancy sequence so both sets get the same mix."""
    p = min(max((brightness - 0.55) / 0.4, 0.0), 1.0)
    u = math.modf(index * 0.6180339887498949 + 0.31)[0]
    return int(u < p)


def make_known_checkpoint(path: Path, work: Path) -> Path:
    """Write the known-behaviour checkpoint (release format: a pickled xrv DenseNet)."""
    import torch
    import torchxrayvision as xrv

    from dicom_node.inference.preprocess import prepare

    torch.manual_seed(0)
    net = xrv.models.DenseNet(num_classes=18).eval()
    levels = np.linspace(0.5, 1.0, 16)
    inputs = []
    for i, level in enumerate(levels):
        file = work / f"calibration-{i}.dcm"
        study_dataset(1000 + i, float(level), "CAL").save_as(file, enforce_file_format=True)
        image = prepare(file, resolution=224, max_megapixels=50, apply_lut=False)
        inputs.append(image.pixels)
    with torch.no_grad():
        batch = torch.from_numpy(np.stack(inputs)).float()
        pooled = torch.relu(net.features(batch)).mean(dim=(2, 3)).numpy()
    correlation = np.nan_to_num(
        [np.corrcoef(levels, pooled[:, k])[0, 1] if pooled[:, k].std() > 0 else 0.0
         for k in range(pooled.shape[1])]
    )  # fmt: skip
    channel = int(np.argmax(np.abs(correlation)))
    low, high = pooled[:, channel].min(), pooled[:, channel].max()
    scale = np.sign(correlation[channel]) * 8.0 / (high - low)
    with torch.no_grad():
        net.classifier.weight.zero_()
        net.classifier.bias.fill_(-4.0)
        net.classifier.weight[EFFUSION, channel] = float(scale)
        net.classifier.bias[EFFUSION] = float(-scale * (low + high) / 2)
    torch.save(net, path)
    return path


def as_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
