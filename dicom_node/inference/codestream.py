"""The image size a compressed frame declares, read from its code stream without decoding.

A decoder allocates what the code stream says, not what Rows and Columns say: a 1 kB file
whose JPEG 2000 SIZ claims 20000 x 20000 inside a 512 x 512 header makes the decoder build a
400-megapixel image before anything notices.  So before decoding, every frame's own size is
read from its marker segments and must equal the header (PS3.5 8.2: the encapsulated stream's
dimensions shall match Rows, Columns and Samples per Pixel):

- JPEG 2000 (PS3.5 A.4.4, ISO 15444-1 A.5.1): SIZ (0xFF51) right after SOC (0xFF4F); the image
  is (Xsiz - XOsiz) x (Ysiz - YOsiz) with Csiz components.  A JP2 file wrapper (not allowed
  by PS3.5 A.4.4, but seen) is looked through to its contiguous code stream box.
- JPEG (PS3.5 A.4.1, ITU T.81 B.2.2): the SOFn frame header, 0xFFC0-0xFFCF except DHT (C4),
  JPG (C8) and DAC (CC): Y lines, X samples per line, Nf components.
- JPEG-LS (PS3.5 A.4.3, ITU T.87 C.2.2): SOF55 (0xFFF7), the same layout.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames

from dicom_node.errors import UnsupportedStudyError

J2K_SYNTAXES = frozenset(
    {
        "1.2.840.10008.1.2.4.90",
        "1.2.840.10008.1.2.4.91",  # JPEG 2000 (Lossless Only)
        "1.2.840.10008.1.2.4.92",
        "1.2.840.10008.1.2.4.93",  # Part 2 Multi-component
        "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202",
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
JPEG_SYNTAXES = frozenset(f"1.2.840.10008.1.2.4.{n}" for n in (*range(50, 67), 70))
MISMATCH = "not analysed: pixel data does not match header"

_SOC, _SIZ = b"\xff\x4f", b"\xff\x51"
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}  # T.81, T.87 SOF55
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI: no length (T.81 B.1.1.3)
_SOS, _EOI = 0xDA, 0xD9


@dataclass(frozen=True)
class FrameSize:
    """What one frame's code stream declares."""

    rows: int
    columns: int
    components: int
    marker: str  # where it was read, for the reason text
    precision: int = 0  # bits per sample of the first component
    signed: bool = False

    def describe(self) -> str:
        return f"{self.marker} {self.columns}x{self.rows}x{self.components}"


def jpeg2000_size(frame: bytes) -> FrameSize | None:
    """The SIZ of a JPEG 2000 code stream (or of the one inside a JP2 wrapper), or None."""
    if frame.startswith(_JP2_SIGNATURE):
        frame = _jp2_codestream(frame)
    # ISO 15444-1 A.4.1: SIZ is the first marker segment after SOC; 41 bytes up to Ssiz(0).
    if not (frame.startswith(_SOC + _SIZ) and len(frame) >= 2 + 41):
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">4L", frame[8:24])
    (csiz,) = struct.unpack(">H", frame[40:42])
    ssiz = frame[42]
    if xosiz > xsiz or yosiz > ysiz:
        return None
    return FrameSize(
        ysiz - yosiz, xsiz - xosiz, csiz, "JPEG 2000 SIZ", (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
    )


def _jp2_codestream(data: bytes) -> bytes:
    """The contents of the top-level contiguous code stream box ('jp2c'), or b"" (15444-1 I.4)."""
    offset = 0
    while offset + 8 <= len(data):
        length, kind = struct.unpack(">L4s", data[offset : offset + 8])
        header = 8
        if length == 1 and offset + 16 <= len(data):  # XLBox: 64-bit length
            length, header = struct.unpack(">Q", data[offset + 8 : offset + 16])[0], 16
        elif length == 0:  # the box runs to the end of the file
            length = len(data) - offset
        if kind == b"jp2c":
            return data[offset + header : offset + length]
        if length < header:
            return b""
        offset += length
    return b""


def jpeg_size(frame: bytes) -> FrameSize | None:
    """The frame header (SOFn or JPEG-LS SOF55) of a JPEG stream, or None before SOS/EOI."""
    if not frame.startswith(b"\xff\xd8"):
        return None
    offset = 2
    while offset + 4 <= len(frame):
        if frame[offset] != 0xFF:
            return None  # T.81 B.1.1.2: every marker starts with 0xFF
        marker = frame[offset + 1]
        if marker == 0xFF:  # fill byte (T.81 B.1.1.2)
            offset += 1
            continue
        if marker in _STANDALONE:
            offset += 2
            continue
        if marker in (_SOS, _EOI):
            return None  # the frame header must come before the first scan
        (length,) = struct.unpack(">H", frame[offset + 2 : offset + 4])
        if marker in _SOF_MARKERS:
            if length < 8 or offset + 10 > len(frame):
                return None
            precision, lines, samples, components = struct.unpack(
                ">BHHB", frame[offset + 4 : offset + 10]
            )
            name = "JPEG-LS SOF55" if marker == 0xF7 else f"JPEG SOF{marker - 0xC0}"
            return FrameSize(lines, samples, components, name, precision)
        if length < 2:
            return None
        offset += 2 + length
    return None


def frame_size(frame: bytes, transfer_syntax_uid: str) -> FrameSize | None:
    """The size ``frame`` declares under ``transfer_syntax_uid``, or None when unreadable."""
    if transfer_syntax_uid in J2K_SYNTAXES:
        return jpeg2000_size(frame)
    return jpeg_size(frame)


def check_frames(ds: Dataset, number_of_frames: int) -> None:
    """Refuse, before any decoding, encapsulated pixel data whose frames declare another size
    than Rows x Columns x Samples per Pixel (or that cannot be split into the header's frames).

    Uncompressed pixel data needs no check: its decoders size it from the header.

    Raises
    ------
    UnsupportedStudyError
        ``not analysed: pixel data does not match header (...)``, naming both sizes.
    """
    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax not in J2K_SYNTAXES | JPEG_SYNTAXES | JPEG_LS_SYNTAXES:
        return
    element = ds.get("PixelData")
    if element is None or not ds["PixelData"].is_undefined_length:
        return  # no encapsulated pixel data: decoding fails on its own, with its reason
    header = FrameSize(
        int(ds.get("Rows") or 0),
        int(ds.get("Columns") or 0),
        int(ds.get("SamplesPerPixel") or 1),
        "Rows/Columns/Samples per Pixel",
    )
    try:
        frames = list(generate_frames(ds.PixelData, number_of_frames=number_of_frames))
    except Exception:  # pydicom raises ValueError and others on broken item structure
        frames = []
    if len(frames) < number_of_frames:
        raise UnsupportedStudyError(
            f"{MISMATCH} (the encapsulated pixel data does not hold {number_of_frames} frame(s))"
        )
    for frame in frames[:number_of_frames]:
        declared = frame_size(frame, syntax)
        if declared is None:
            raise UnsupportedStudyError(f"{MISMATCH} (no readable frame header in the code stream)")
        if (declared.rows, declared.columns, declared.components) != (
            header.rows,
            header.columns,
            header.components,
        ):
            raise UnsupportedStudyError(f"{MISMATCH} ({declared.describe()}, {header.describe()})")
