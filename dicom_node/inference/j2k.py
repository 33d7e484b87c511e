"""Reduced-resolution JPEG 2000 decoding for the model input (PS3.5 A.4.4, ISO 15444-1).

A JPEG 2000 code stream holds its image as wavelet levels; decoding only the coarser levels
yields the image at 1/2, 1/4, 1/8 ... of its size for a fraction of the cost.  The model needs
224 px, so a 2k chest X-ray is decoded at 1/2 (still four times the model's resolution, so the
final anti-aliased resize decides the result).  Pillow's OpenJPEG decoder does the work; this
module only chooses the level and undoes Pillow's promotion of low bit depths to 16 bits.
"""

from __future__ import annotations

from io import BytesIO

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from dicom_node.inference.codestream import jpeg2000_size

J2K_SYNTAXES = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
# Keep this many times the model's resolution: the 5/3 and 9/7 wavelet low-pass filters alias
# more than the anti-aliased resize of the reference, and a 2x margin broke the fidelity bound.
MARGIN = 4


def reduction_level(rows: int, columns: int, resolution: int) -> int:
    """How many halvings keep at least ``MARGIN`` times ``resolution`` on the short side."""
    level, shortest = 0, min(rows, columns)
    while shortest / 2 ** (level + 1) >= MARGIN * resolution:
        level += 1
    return level


def code_stream_precision(frame: bytes) -> tuple[int, bool] | None:
    """(bits, signed) of the first component, from the SIZ marker segment."""
    size = jpeg2000_size(frame)
    return None if size is None else (size.precision, size.signed)


def decode_reduced(ds: Dataset, resolution: int) -> tuple[np.ndarray, int] | None:
    """(pixels as stored values, source pixels per pixel), or None to decode fully."""
    if str(ds.file_meta.get("TransferSyntaxUID", "")) not in J2K_SYNTAXES:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    level = reduction_level(rows, columns, resolution)
    if level == 0 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    try:
        frame = next(
            generate_frames(ds.PixelData, number_of_frames=int(ds.get("NumberOfFrames") or 1))
        )
        precision = code_stream_precision(frame)
        image = Image.open(BytesIO(frame))
        # Pillow's JPEG 2000 plugin reads ``reduce`` as a level (its documented use), though
        # Image types the name as the reduce() method
        image.reduce = level  # type: ignore[method-assign, assignment]
        image.load()
        pixels = np.asarray(image)
    except Exception:  # Pillow cannot read every code stream; the full decoder can
        return None
    factor = 2**level
    expected = (-(-rows // factor), -(-columns // factor))
    if precision is None or precision[1] or pixels.shape != expected:
        return None
    if not image.mode.startswith("I;16") or not 8 < precision[0] <= 16:
        return None  # 8-bit and odd layouts: the full decoder is fast enough and exact
    # Pillow promotes every precision to the full 16 bits; shift back to stored values.
    return pixels >> (16 - precision[0]), factor
