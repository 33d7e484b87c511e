"""Turn a stored DICOM image into exactly the input the TorchXRayVision models were trained on.

The steps follow torchxrayvision's reference path (``xrv.utils.read_xray_dcm``, then
``XRayCenterCrop``, then ``XRayResizer``): decode, optional Modality/VOI LUT, MONOCHROME1
inversion against ``2**BitsStored - 1``, scaling to [-1024, 1024], a centre crop of the long
side, and a resize to the model's resolution.  The resize uses area averaging (torch), which
matches skimage's anti-aliased resize within the project's fidelity bound and is much faster.
The crop and resize are recorded so heatmaps map back to source pixels exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.errors import InvalidInstanceError, UnsupportedStudyError


@dataclass(frozen=True)
class Geometry:
    """Where the model's square input came from in the source image."""

    source_rows: int
    source_columns: int
    crop_top: int
    crop_left: int
    crop_size: int
    resolution: int


@dataclass(frozen=True)
class PreparedImage:
    """Model input (1 x R x R, float32, [-1024, 1024]) and its geometry."""

    pixels: np.ndarray
    geometry: Geometry


def read_dataset(path: Path, max_megapixels: float) -> Dataset:
    """Read a stored file, refusing images over the pixel budget before any decoding."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:
        raise InvalidInstanceError(f"stored file cannot be read ({type(exc).__name__})") from None
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    frames_text = str(header.get("NumberOfFrames") or "1").strip()
    frames = int(frames_text) if frames_text.isdigit() else 1
    if rows * columns * max(frames, 1) > max_megapixels * 1e6:
        raise UnsupportedStudyError(
            f"not analysed: image larger than {max_megapixels:g} megapixels")
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InvalidInstanceError(f"stored file cannot be read ({type(exc).__name__})") from None
    _infer_transfer_syntax(ds)
    return ds


def _infer_transfer_syntax(ds: Dataset) -> None:
    """Give a bare data set (ACR-NEMA style, no File Meta) the syntax it was read in."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    if little is False:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit is not False
                                          else ExplicitVRLittleEndian)


def decode_normalised(ds: Dataset, apply_lut: bool = False) -> np.ndarray:
    """Decoded pixels scaled to [-1024, 1024] as MONOCHROME2 (read_xray_dcm's semantics).

    Raises
    ------
    UnsupportedStudyError
        For colour images (the models are single-channel).
    InvalidInstanceError
        When the pixel data cannot be decoded.
    """
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedStudyError(
            f"not analysed: photometric interpretation {photometric or 'missing'} is not greyscale")
    try:
        bits_stored = int(ds.BitsStored)
        data = ds.pixel_array
    except Exception as exc:  # pydicom and its plugins raise many types on broken data
        raise InvalidInstanceError(f"pixel data cannot be decoded ({type(exc).__name__})") from None
    if data.ndim == 3:
        data = data[0]  # first frame of a multi-frame image
    if apply_lut:
        data = apply_voi_lut(data, ds, index=0)
    maximum = float(2 ** bits_stored - 1)
    data = np.clip(data.astype(np.float32), 0, maximum)
    if photometric == "MONOCHROME1":  # PS3.3 C.7.6.3.1.2: minimum value is white
        data = maximum - data
    return (2 * (data / maximum) - 1.0) * 1024


def centre_crop_and_resize(image: np.ndarray, resolution: int) -> PreparedImage:
    """XRayCenterCrop then a resize to ``resolution``; records the geometry."""
    rows, columns = image.shape
    size = min(rows, columns)
    top, left = rows // 2 - size // 2, columns // 2 - size // 2
    crop = torch.from_numpy(np.ascontiguousarray(image[top:top + size, left:left + size]))
    resized = F.interpolate(crop[None, None], size=(resolution, resolution),
                            mode="area" if size >= resolution else "bilinear")
    return PreparedImage(resized[0].numpy().astype(np.float32),
                         Geometry(rows, columns, top, left, size, resolution))


def prepare(path: Path, *, resolution: int, max_megapixels: float = 50.0,
            apply_lut: bool = False) -> PreparedImage:
    """The model input for the stored file at ``path``."""
    ds = read_dataset(path, max_megapixels)
    return centre_crop_and_resize(decode_normalised(ds, apply_lut), resolution)
