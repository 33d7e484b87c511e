"""The data element structure of PS3.5 7.1, checked on raw bytes without pydicom's guessing.

A C-STORE data set must be encoded in the transfer syntax of the presentation context it came
on (PS3.8 9.3.5.2, PS3.5 10): that syntax is what the node writes into the stored file's File
Meta.  pydicom, when reading, silently switches between implicit and explicit VR if the first
element looks like the other encoding; that is kind to odd files but would let the node store
a file whose File Meta lies.  So the SCP checks the first elements itself: they must be well
formed under the negotiated encoding, and a data set that is well formed only under another
encoding is refused (0xC000).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from dicom_node.errors import TransferSyntaxMismatchError

# PS3.5 Table 6.2-1: every value representation.
VALUE_REPRESENTATIONS = frozenset(
    {
        "AE",
        "AS",
        "AT",
        "CS",
        "DA",
        "DS",
        "DT",
        "FD",
        "FL",
        "IS",
        "LO",
        "LT",
        "OB",
        "OD",
        "OF",
        "OL",
        "OV",
        "OW",
        "PN",
        "SH",
        "SL",
        "SQ",
        "SS",
        "ST",
        "SV",
        "TM",
        "UC",
        "UI",
        "UL",
        "UN",
        "UR",
        "US",
        "UT",
        "UV",
    }
)
# PS3.5 7.1.2, Table 7.1-1: these VRs have two reserved bytes (0000H) and a 32-bit length;
# all others (Table 7.1-2) a 16-bit length right after the VR.
LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)
UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA_TAG = 0x7FE00010
# The three VR encodings of PS3.5 A.1-A.3 as (implicit VR, little endian).
ENCODINGS = {
    (True, True): "Implicit VR Little Endian",
    (False, True): "Explicit VR Little Endian",
    (False, False): "Explicit VR Big Endian",
}
_ELEMENTS_CHECKED = 8
Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class ElementHeader:
    """Tag, VR (None in implicit VR), header size and value length of one data element."""

    tag: int
    vr: str | None
    header_length: int
    value_length: int


def element_header(
    data: Buffer, offset: int, *, implicit: bool, little: bool
) -> ElementHeader | None:
    """The element header at ``offset`` (PS3.5 7.1.2 explicit, 7.1.3 implicit), or None where
    the bytes there are not a well-formed header in that encoding."""
    order = "<" if little else ">"
    if len(data) - offset < 8:
        return None
    group, number = struct.unpack_from(f"{order}HH", data, offset)
    tag = (group << 16) | number
    if implicit:
        return ElementHeader(tag, None, 8, struct.unpack_from(f"{order}L", data, offset + 4)[0])
    vr = bytes(data[offset + 4 : offset + 6]).decode("latin-1")
    if vr not in VALUE_REPRESENTATIONS:
        return None
    if vr not in LONG_LENGTH_VRS:
        return ElementHeader(tag, vr, 8, struct.unpack_from(f"{order}H", data, offset + 6)[0])
    if len(data) - offset < 12 or bytes(data[offset + 6 : offset + 8]) != b"\0\0":
        return None
    return ElementHeader(tag, vr, 12, struct.unpack_from(f"{order}L", data, offset + 8)[0])


def starts_well_formed(
    stream: Buffer, *, implicit: bool, little: bool, elements: int = _ELEMENTS_CHECKED
) -> bool:
    """Whether the first ``elements`` data elements of ``stream`` are well formed.

    Well formed: each header parses in the encoding, its value fits in the stream, and tags
    increase (PS3.5 7.1: elements of a data set are in ascending tag order).  The walk stops,
    satisfied, at Pixel Data, at an undefined length (a sequence or encapsulated value whose
    items it does not enter) or at the end of the stream.
    """
    offset, previous = 0, -1
    for _ in range(elements):
        if offset == len(stream):
            return True
        header = element_header(stream, offset, implicit=implicit, little=little)
        if header is None or header.tag <= previous:
            return False
        if header.tag == PIXEL_DATA_TAG or header.value_length == UNDEFINED_LENGTH:
            return True
        offset += header.header_length + header.value_length
        if offset > len(stream):
            return False
        previous = header.tag
    return True


def check_negotiated_encoding(
    stream: Buffer, *, implicit: bool, little: bool, transfer_syntax_uid: str
) -> None:
    """Refuse a data set encoded in another VR encoding than the negotiated syntax's.

    Raises
    ------
    TransferSyntaxMismatchError
        When the first elements are not well formed under the negotiated encoding but are
        under another one: the sender encoded the data set in a syntax it did not negotiate.
        A data set that is malformed under every encoding is left to the parser.
    """
    if starts_well_formed(stream, implicit=implicit, little=little):
        return
    for (other_implicit, other_little), name in ENCODINGS.items():
        if (other_implicit, other_little) == (implicit, little):
            continue
        if starts_well_formed(stream, implicit=other_implicit, little=other_little):
            raise TransferSyntaxMismatchError(
                f"data set is encoded as {name}, not in the negotiated transfer syntax "
                f"{transfer_syntax_uid}"
            )
