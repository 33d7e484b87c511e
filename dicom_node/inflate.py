"""Bounded, streaming inflation of Deflated Explicit VR Little Endian data sets (PS3.5 A.5).

In that transfer syntax the whole data set is one raw deflate stream (RFC 1951, no zlib
header), so 1 MB on the wire can inflate to gigabytes.  ``zlib.decompress`` (and pydicom's
reader, which calls it) has no bound; here inflation runs in chunks with ``max_length`` and
stops as soon as the output passes the cap, so memory stays below the cap plus one chunk.  The
SCP inflates under ``[scp] max_inflated_mb`` before storing anything; the worker checks a
stored file the same way (without keeping the output) before pydicom reads it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from dicom_node.encoding import element_header
from dicom_node.errors import InflationLimitError, InvalidInstanceError, StorageError

DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
MEGABYTE = 1024 * 1024
DEFAULT_MAX_INFLATED_BYTES = 512 * MEGABYTE  # the default of [scp] max_inflated_mb
CHUNK_BYTES = MEGABYTE
_TRANSFER_SYNTAX_TAG = 0x00020010


def inflate_bounded(deflated: bytes, max_bytes: int) -> BytesIO:
    """The inflated data set, refusing one that inflates to more than ``max_bytes``.

    Written into one BytesIO, so the peak is about the output, not the output twice (read
    its bytes in place with ``getbuffer()``).

    Raises
    ------
    InflationLimitError
        As soon as the output passes ``max_bytes`` (the rest is never inflated).
    InvalidInstanceError
        When the bytes are not a complete raw deflate stream.
    """
    inflated = BytesIO()
    for chunk in _inflated_chunks([deflated], max_bytes):
        inflated.write(chunk)
    inflated.seek(0)
    return inflated


def inflated_size(pieces: Iterable[bytes], max_bytes: int) -> int:
    """How many bytes the deflate stream in ``pieces`` inflates to, keeping none of them."""
    return sum(len(chunk) for chunk in _inflated_chunks(pieces, max_bytes))


def _inflated_chunks(pieces: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate, no zlib header
    total = 0
    try:
        for piece in pieces:
            pending = piece
            while pending and not inflater.eof:
                # max_length 0 would mean "unbounded"; the bound is always >= 1 here.
                chunk = inflater.decompress(pending, min(CHUNK_BYTES, max_bytes + 1 - total))
                pending = inflater.unconsumed_tail
                total += len(chunk)
                _check_cap(total, max_bytes)
                yield chunk
            if inflater.eof:
                return  # bytes after the end of the stream are ignored, as pydicom does
        while not inflater.eof:  # input used up: drain what zlib still holds, still bounded
            chunk = inflater.decompress(b"", min(CHUNK_BYTES, max_bytes + 1 - total))
            if not chunk:
                raise InvalidInstanceError("deflated data set is truncated (PS3.5 A.5)")
            total += len(chunk)
            _check_cap(total, max_bytes)
            yield chunk
    except zlib.error:
        raise InvalidInstanceError("deflated data set is not a valid deflate stream") from None


def _check_cap(total: int, max_bytes: int) -> None:
    if total > max_bytes:
        raise InflationLimitError(
            f"deflated data set inflates to more than {max_bytes // MEGABYTE} MB "
            "([scp] max_inflated_mb)"
        )


def check_stored_inflation(path: Path, max_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> None:
    """Refuse a stored Deflated file that inflates beyond ``max_bytes``, before pydicom reads it.

    pydicom inflates a Deflated file whole and unbounded, even with ``stop_before_pixels``;
    this streams through it first in constant memory.  Files in other syntaxes, and files
    without a File Meta, return at once.

    Raises
    ------
    InflationLimitError, InvalidInstanceError
        As :func:`inflate_bounded`.
    StorageError
        When the file cannot be read here (a mount, not the data: the job is retried).
    """
    try:
        with path.open("rb") as handle:
            if _read_transfer_syntax(handle) != DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
                return
            inflated_size(iter(lambda: handle.read(CHUNK_BYTES), b""), max_bytes)
    except OSError as exc:
        raise StorageError(
            f"stored file cannot be opened ({exc.strerror or type(exc).__name__}"
            "); is the storage root mounted on this node?"
        ) from None


def _read_transfer_syntax(handle: BinaryIO) -> str | None:
    """Transfer Syntax UID from the File Meta (PS3.10 7.1), leaving ``handle`` at the data set.

    The File Meta group is always Explicit VR Little Endian; None without "DICM" at byte 128.
    """
    if handle.read(132)[128:] != b"DICM":
        return None
    syntax = None
    while True:
        start = handle.tell()
        head = handle.read(12)
        header = element_header(head, 0, implicit=False, little=True)
        if header is None or header.tag >> 16 != 0x0002:
            handle.seek(start)
            return syntax
        handle.seek(start + header.header_length)
        value = handle.read(min(header.value_length, 1024))
        if header.tag == _TRANSFER_SYNTAX_TAG:
            syntax = value.rstrip(b"\0 ").decode("ascii", "replace")
        handle.seek(start + header.header_length + header.value_length)
