"""Check a stored DICOM file (PS3.10) byte by byte: its File Meta Information and a data set
that is complete to its last element.

The start-up reconciliation (:mod:`dicom_node.ops.reconcile`) adopts a file that no row names
only when these checks pass; pydicom alone would read a truncated file without complaint
(it returns a short value for the last element).  Nothing here decodes pixel data.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.filereader import read_dataset
from pydicom.uid import UID

from dicom_node.errors import InvalidInstanceError

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, ITEM_DELIMITER, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel, Float Pixel, Double Pixel
# PS3.5 7.1.2: explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"SV",
    b"UV",
}


@dataclass(frozen=True)
class Part10File:
    """A DICOM file split into its meta information and the data set exactly as received."""

    transfer_syntax_uid: str
    media_storage_sop_instance_uid: str
    dataset: bytes
    has_pixel_data: bool  # a top-level (7FE0,0010), (7FE0,0008) or (7FE0,0009) element


def split_part10(data: bytes, *, max_inflated_bytes: int) -> Part10File:
    """The file meta values and the data set bytes of a PS3.10 file, both checked complete
    (a Deflated data set inflated to at most ``max_inflated_bytes``).

    Raises
    ------
    InvalidInstanceError
        When the preamble, the File Meta Information (PS3.10 7.1) or the data set is missing,
        unreadable or truncated.  The message never quotes element values.
    """
    if len(data) < 144 or data[128:132] != b"DICM":
        raise InvalidInstanceError("not a DICOM file (no PS3.10 preamble and DICM prefix)")
    # (0002,0000) UL, explicit VR little endian: tag, "UL", 2-byte length 4, the group length.
    group, element, vr, length, group_length = struct.unpack_from("<HH2sHL", data, 132)
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise InvalidInstanceError("File Meta Information Group Length is missing")
    offset = 144 + group_length
    if offset > len(data):
        raise InvalidInstanceError("File Meta Information is truncated")
    meta_bytes = data[132:offset]
    check_complete(meta_bytes, implicit=False, little=True)
    try:
        meta = read_dataset(BytesIO(meta_bytes), False, True)
        syntax, sop = meta.get("TransferSyntaxUID"), meta.get("MediaStorageSOPInstanceUID")
    except Exception as exc:  # pydicom raises many types on hostile input
        raise InvalidInstanceError(
            f"File Meta Information cannot be parsed ({type(exc).__name__})"
        ) from None
    if not syntax or not sop:
        raise InvalidInstanceError("File Meta Information lacks the transfer syntax or SOP UID")
    dataset = data[offset:]
    tags = check_dataset(dataset, str(syntax), max_inflated_bytes=max_inflated_bytes)
    return Part10File(str(syntax), str(sop), dataset, bool(tags & _PIXEL_DATA_TAGS))


def check_dataset(stream: bytes, transfer_syntax_uid: str, *, max_inflated_bytes: int) -> set[int]:
    """The top-level tags of ``stream``; InvalidInstanceError unless it parses to its end in
    its transfer syntax."""
    syntax = UID(transfer_syntax_uid)
    known = syntax.is_transfer_syntax
    if known and syntax.is_deflated:  # PS3.5 A.5: the whole data set is deflated
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            stream = inflater.decompress(stream, max_inflated_bytes)
        except zlib.error:
            raise InvalidInstanceError("deflated data set cannot be inflated") from None
        if inflater.unconsumed_tail:
            raise InvalidInstanceError("deflated data set inflates beyond [scp] max_inflated_mb")
        if not inflater.eof:
            raise InvalidInstanceError("deflated data set is truncated")
    return check_complete(
        stream,
        implicit=syntax.is_implicit_VR if known else False,
        little=syntax.is_little_endian if known else True,
    )


def check_complete(stream: bytes, *, implicit: bool, little: bool) -> set[int]:
    """Walk every element (PS3.5 7.1), sequence item (7.5) and fragment (A.4) of ``stream``.

    Raises InvalidInstanceError when an element's value runs past the end, a delimiter is
    missing, or bytes are left over that are not a whole element.  Returns the top-level tags
    (a cut exactly between two elements is complete bytes; the caller asks for what it needs).
    """
    tags: set[int] = set()
    try:
        _elements(memoryview(stream), 0, len(stream), implicit, "<" if little else ">", None, tags)
    except struct.error:
        raise InvalidInstanceError("data set is truncated inside an element header") from None
    return tags


def _elements(
    buf: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    order: str,
    stop_tag: int | None,
    tags: set[int] | None = None,
) -> int:
    """Elements from ``pos`` to ``end`` or past ``stop_tag``; returns the position after.
    ``tags`` (top level only) collects the tags seen."""
    while pos < end:
        group, element = struct.unpack_from(order + "HH", buf, pos)
        tag = group << 16 | element
        if tags is not None:
            tags.add(tag)
        if tag == stop_tag:
            return pos + 8  # the delimitation item: tag and a zero length
        if group == 0xFFFE:
            raise InvalidInstanceError("a sequence item appears outside a sequence")
        if implicit:
            (length,), vr, pos = struct.unpack_from(order + "L", buf, pos + 4), b"", pos + 8
        else:
            vr = bytes(buf[pos + 4 : pos + 6])
            if vr in _LONG_VRS:
                (length,), pos = struct.unpack_from(order + "L", buf, pos + 8), pos + 12
            else:
                (length,), pos = struct.unpack_from(order + "H", buf, pos + 6), pos + 8
        if length == UNDEFINED_LENGTH:  # PS3.5 6.2.2: UN of undefined length is implicit VR LE
            pos = _items(buf, pos, end, implicit or vr == b"UN", "<" if vr == b"UN" else order)
        elif pos + length > end:
            raise InvalidInstanceError("data set is truncated (an element runs past the end)")
        else:
            pos += length
    if stop_tag is not None:
        raise InvalidInstanceError("data set is truncated (an item delimiter is missing)")
    return pos


def _items(buf: memoryview, pos: int, end: int, implicit: bool, order: str) -> int:
    """The items of an undefined-length sequence or encapsulated pixel data, to its delimiter."""
    while True:
        group, element, length = struct.unpack_from(order + "HHL", buf, pos)
        tag, pos = group << 16 | element, pos + 8
        if tag == SEQUENCE_DELIMITER:
            return pos
        if tag != ITEM:
            raise InvalidInstanceError("a sequence holds something other than items")
        if length == UNDEFINED_LENGTH:
            pos = _elements(buf, pos, end, implicit, order, ITEM_DELIMITER)
        elif pos + length > end:
            raise InvalidInstanceError("data set is truncated (an item runs past the end)")
        else:
            pos += length
