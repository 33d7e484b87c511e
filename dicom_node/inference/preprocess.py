"""Turn a stored DICOM image into exactly the input the TorchXRayVision models were trained on.

The steps follow torchxrayvision's reference path (``xrv.utils.read_xray_dcm``, then
``XRayCenterCrop``, then ``XRayResizer``): decode, optional Modality/VOI LUT, MONOCHROME1
inversion against ``2**BitsStored - 1``, scaling to [-1024, 1024], a centre crop of the long
side, and skimage's anti-aliased resize to the model's resolution (reproduced to float
rounding).  Large JPEG 2000 images are decoded at reduced resolution (see :func:`prepare`).
The crop is recorded in source pixels so heatmaps map back to the source image.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_voi_lut
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.errors import InvalidInstanceError, StorageError, UnsupportedStudyError
from dicom_node.inference.card import ModelCard
from dicom_node.inference.codestream import check_frames
from dicom_node.inference.j2k import decode_reduced
from dicom_node.inference.resample import resize_bilinear
from dicom_node.inflate import check_stored_inflation
from dicom_node.results import Geometry


@dataclass(frozen=True)
class PreparedImage:
    """Model input (1 x R x R, float32, [-1024, 1024]), its geometry, and a display copy."""

    pixels: np.ndarray
    geometry: Geometry
    display: np.ndarray | None = None  # uint8 MONOCHROME2, for the heatmap overlays


def read_dataset(path: Path, max_megapixels: float) -> Dataset:
    """Read a stored file, refusing images over the pixel budget before any decoding."""
    check_stored_inflation(path)  # pydicom inflates a Deflated file unbounded (PS3.5 A.5)
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except OSError as exc:  # missing or unreadable here: a mount, not the data (retried)
        raise StorageError(
            f"stored file cannot be opened ({exc.strerror or type(exc).__name__}"
            "); is the storage root mounted on this node?"
        ) from None
    except Exception as exc:
        raise InvalidInstanceError(f"stored file cannot be read ({type(exc).__name__})") from None
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    frames = number_of_frames(header)
    if rows * columns * frames > max_megapixels * 1e6:
        raise UnsupportedStudyError(
            f"not analysed: image larger than {max_megapixels:g} megapixels"
        )
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise InvalidInstanceError(f"stored file cannot be read ({type(exc).__name__})") from None
    _infer_transfer_syntax(ds)
    check_frames(ds, frames)  # the code stream's own size, before a decoder allocates it
    return ds


IS_RANGE = (-(2**31), 2**31 - 1)  # PS3.5 6.2, VR IS


def number_of_frames(header: Dataset) -> int:
    """Number of Frames (0028,0008) as PS3.5 6.2 defines IS: an optionally signed decimal
    integer, leading and trailing spaces allowed, in IS_RANGE.  Absent or empty: one frame.

    Raises
    ------
    UnsupportedStudyError
        When the value is not one such integer of at least 1: the header cannot say how
        much pixel data to expect, so the image is not analysed rather than guessed at.
    """
    element = header.get_item(0x00280008)
    value = None if element is None else element.value
    if value is None or value == b"" or value == "":
        return 1
    text = (
        value.decode("ascii", "replace")
        if isinstance(value, bytes)
        else str(getattr(value, "original_string", value))
    )
    stripped = text.strip(" ")
    unsigned = stripped[1:] if stripped[:1] in ("+", "-") else stripped
    if len(text) <= 12 and unsigned.isascii() and unsigned.isdigit():
        frames = int(stripped)
        if IS_RANGE[0] <= frames <= IS_RANGE[1] and frames >= 1:
            return frames
    raise UnsupportedStudyError(
        "not analysed: invalid header: Number of Frames is not an "
        "integer of at least 1 (PS3.5 6.2, VR IS)"
    )


def _infer_transfer_syntax(ds: Dataset) -> None:
    """Give a bare data set (ACR-NEMA style, no File Meta) the syntax it was read in."""
    if "TransferSyntaxUID" in ds.file_meta:
        return
    implicit, little = ds.original_encoding
    if little is False:
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    else:
        ds.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit is not False else ExplicitVRLittleEndian
        )


def decode_normalised(ds: Dataset, apply_lut: bool = False) -> np.ndarray:
    """Decoded pixels scaled to [-1024, 1024] as MONOCHROME2 (read_xray_dcm's semantics).

    Raises
    ------
    UnsupportedStudyError
        For colour images (the models are single-channel).
    InvalidInstanceError
        When the pixel data cannot be decoded.
    """
    _require_greyscale(ds)
    try:
        data = ds.pixel_array
    except Exception as exc:  # pydicom and its plugins raise many types on broken data
        raise InvalidInstanceError(f"pixel data cannot be decoded ({type(exc).__name__})") from None
    if data.ndim == 3:
        data = data[0]  # first frame of a multi-frame image
    if apply_lut:
        data = apply_voi_lut(data, ds, index=0)
    return _normalise(data, ds)


def decode_reduced_j2k(ds: Dataset, resolution: int) -> tuple[np.ndarray, int] | None:
    """Like :func:`decode_normalised`, from a reduced-resolution JPEG 2000 decode.

    Returns the image and how many source pixels one of its pixels spans, or None when the
    image is not JPEG 2000 or the reduced decoder cannot read it.
    """
    _require_greyscale(ds)
    reduced = decode_reduced(ds, resolution)
    if reduced is None:
        return None
    pixels, factor = reduced
    return _normalise(pixels, ds), factor


def _require_greyscale(ds: Dataset) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise UnsupportedStudyError(
            f"not analysed: photometric interpretation {photometric or 'missing'} is not greyscale"
        )


def _normalise(data: np.ndarray, ds: Dataset) -> np.ndarray:
    """Invert MONOCHROME1 and scale by BitsStored to [-1024, 1024] (xrv.utils.normalize)."""
    try:
        maximum = float(2 ** int(ds.BitsStored) - 1)
    except (AttributeError, TypeError, ValueError):
        raise InvalidInstanceError("BitsStored is missing or invalid") from None
    data = np.clip(data.astype(np.float32), 0, maximum)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        data = maximum - data  # PS3.3 C.7.6.3.1.2: the minimum value is white
    return (2 * (data / maximum) - 1.0) * 1024


def centre_crop_and_resize(
    image: np.ndarray, resolution: int, factor: int = 1, source_shape: tuple[int, int] | None = None
) -> PreparedImage:
    """XRayCenterCrop then XRayResizer's resize to ``resolution``; records the geometry.

    ``image`` may be a reduced-resolution decode (``factor`` source pixels per image pixel);
    the crop is decided in source pixels, as the reference does, and recorded that way.
    """
    rows, columns = source_shape or image.shape
    size = min(rows, columns)
    top, left = rows // 2 - size // 2, columns // 2 - size // 2
    r_top, r_left = top // factor, left // factor
    r_size = max(1, min(round(size / factor), image.shape[0] - r_top, image.shape[1] - r_left))
    crop = np.ascontiguousarray(image[r_top : r_top + r_size, r_left : r_left + r_size])
    return PreparedImage(
        resize_like_skimage(crop, resolution)[None],
        Geometry(rows, columns, top, left, size, resolution),
    )


def resize_like_skimage(image: np.ndarray, resolution: int) -> np.ndarray:
    """``skimage.transform.resize(..., mode="constant", preserve_range=True)`` as XRayResizer
    calls it: a Gaussian anti-aliasing filter with sigma (scale - 1) / 2 and zero padding,
    then bilinear sampling at pixel centres.

    Both steps are linear and separable, so each axis is one (resolution x size) matrix and
    the resize is two matrix products: the same numbers (to float rounding) in a fraction of
    the time of filtering every source pixel.
    """
    rows, columns = image.shape
    if rows <= resolution or columns <= resolution:  # enlarging: no anti-aliasing filter
        return resize_bilinear(image, resolution, resolution)
    image = np.asarray(image, dtype=np.float32)
    return _axis_matrix(rows, resolution) @ image @ _axis_matrix(columns, resolution).T


@functools.lru_cache(maxsize=16)
def _axis_matrix(size: int, resolution: int) -> np.ndarray:
    """Rows: output samples; columns: input pixels; Gaussian then bilinear weights."""
    scale = size / resolution
    sigma = (scale - 1) / 2
    radius = int(4.0 * sigma + 0.5)  # scipy.ndimage's truncate=4.0
    taps = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    centres = (np.arange(resolution) + 0.5) * scale - 0.5  # align_corners=False
    first = np.floor(centres).astype(int)
    fraction = centres - first
    second = np.minimum(first + 1, size - 1)
    matrix = np.zeros((resolution, size), dtype=np.float64)
    outputs = np.arange(resolution)
    for weight, centre in ((1 - fraction, first), (fraction, second)):
        for tap_weight, tap in zip(kernel, taps, strict=True):
            source = centre + tap
            inside = (source >= 0) & (source < size)  # zero padding outside ("constant")
            np.add.at(matrix, (outputs[inside], source[inside]), (weight * tap_weight)[inside])
    return matrix.astype(np.float32)


def prepare(
    path: Path,
    *,
    resolution: int,
    max_megapixels: float = 50.0,
    apply_lut: bool = False,
    display_size: int = 0,
) -> PreparedImage:
    """The model input for the stored file at ``path``.

    JPEG 2000 images much larger than the model's input are decoded at reduced resolution
    (fewer wavelet levels, keeping at least four times the model's resolution): a 2k image in
    about a quarter of the time, within the fidelity bound.  Everything else is exact.
    """
    ds = read_dataset(path, max_megapixels)
    image, factor = decode_for_model(ds, resolution, apply_lut)
    prepared = centre_crop_and_resize(image, resolution, factor, (int(ds.Rows), int(ds.Columns)))
    if display_size:  # the same decode, so the overlays cost no second decompression
        prepared = dataclasses.replace(prepared, display=display_image(image, display_size))
    return prepared


def display_image(image: np.ndarray, max_size: int) -> np.ndarray:
    """An 8-bit MONOCHROME2 copy, long side at most ``max_size``, contrast from percentiles.

    The window is the 1st to 99th percentile of the image, as a viewer's automatic window
    would choose, since the source's own VOI may be absent or meant for another display.
    """
    rows, columns = image.shape
    scale = min(1.0, max_size / max(rows, columns))
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    resized = np.asarray(
        PIL.Image.fromarray(image.astype(np.float32), mode="F").resize(
            size, PIL.Image.Resampling.BILINEAR, reducing_gap=2.0
        )
    )
    low, high = np.percentile(resized[::4, ::4], (1, 99))
    scaled = (resized - low) * (255.0 / max(float(high - low), 1e-6))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def decode_for_model(
    ds: Dataset, resolution: int, apply_lut: bool = False
) -> tuple[np.ndarray, int]:
    """The normalised image, and how many source pixels each of its pixels spans (more than
    one for a JPEG 2000 image decoded at reduced resolution)."""
    reduced = None if apply_lut else decode_reduced_j2k(ds, resolution)
    if reduced is not None:
        return reduced
    return decode_normalised(ds, apply_lut), 1


def model_input(card: ModelCard, pixels: np.ndarray) -> np.ndarray:
    """The card's recipe on prepared images (N, 1, R, R) in [-1024, 1024].

    ``xrv``: the images themselves (TorchXRayVision's input).  ``mean-std``: scaled to [0, 1],
    repeated to the card's channels, then ``(x - mean[c]) / std[c]`` per channel.
    """
    recipe = card.preprocessing
    if recipe.recipe == "xrv" and card.channels == 1:
        return np.ascontiguousarray(pixels, np.float32)
    if recipe.recipe == "xrv":
        return np.ascontiguousarray(np.repeat(pixels, card.channels, axis=1), np.float32)
    unit = (pixels.astype(np.float32) + 1024.0) / 2048.0
    unit = np.repeat(unit, card.channels, axis=1)
    mean = np.asarray(recipe.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(recipe.std, np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((unit - mean) / std, np.float32)
