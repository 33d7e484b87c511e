"""Split a multipart/related body (RFC 2387; the syntax is RFC 2046 5.1.1) into its parts.

STOW-RS (PS3.18 10.5.1.1) posts instances as the parts of one ``multipart/related`` body.  The
body is read from a spooled file through ``mmap``, so only the offsets of the parts are kept
here and each part is copied out on its own: a request of many large instances never sits in
memory at once.  The whole structure is checked before any part is used, so a body that breaks
the syntax (no closing delimiter, a part without its header block) stores nothing.
"""

from __future__ import annotations

import email.message
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from dicom_node.errors import MalformedRequestError

MAX_HEADER_BYTES = 16 * 1024  # a part's header block (RFC 2046 sets none; ours is generous)
CRLF = b"\r\n"


class Buffer(Protocol):
    """What the parser reads: ``bytes`` or an ``mmap``."""

    def find(self, sub: bytes, start: int = ..., end: int = ...) -> int: ...

    def __getitem__(self, index: slice, /) -> bytes: ...

    def __len__(self) -> int: ...


@dataclass(frozen=True)
class MediaType:
    """A Content-Type value: its type (lower case) and parameters (names in lower case)."""

    media_type: str
    params: Mapping[str, str]


@dataclass(frozen=True)
class Part:
    """One body part: its headers (names in lower case) and where its content lies."""

    headers: Mapping[str, str]
    start: int
    end: int


def parse_media_type(value: str) -> MediaType:
    """The media type and parameters of a Content-Type header (RFC 9110 8.3.1); an empty or
    unparseable value gives ``""``."""
    message = email.message.Message()
    message["content-type"] = value
    if not value.strip() or "/" not in value.split(";", 1)[0]:
        return MediaType("", {})
    params = message.get_params() or []
    return MediaType(
        message.get_content_type(),
        {str(name).lower(): str(param) for name, param in params[1:]},
    )


def split_parts(body: Buffer, boundary: str) -> list[Part]:
    """The parts of ``body``, a multipart body with ``boundary``, in order.

    Raises
    ------
    MalformedRequestError
        No delimiter, no part, a part without a blank line after its headers, or no closing
        delimiter (the body was cut short).
    """
    delimiter = b"--" + boundary.encode("ascii", "replace")
    position = _first_delimiter(body, delimiter)
    parts: list[Part] = []
    while True:
        position += len(delimiter)
        if body[position : position + 2] == b"--":  # the close delimiter (RFC 2046 5.1.1)
            if not parts:
                raise MalformedRequestError("the multipart body has no parts")
            return parts
        line_end = body.find(CRLF, position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise MalformedRequestError("a boundary delimiter is not followed by a line end")
        headers, content_start = _part_headers(body, line_end + 2)
        next_delimiter = body.find(CRLF + delimiter, content_start)
        if next_delimiter < 0:
            raise MalformedRequestError(
                "the multipart body ends inside a part (no close delimiter)"
            )
        parts.append(Part(headers, content_start, next_delimiter))
        position = next_delimiter + 2


def _first_delimiter(body: Buffer, delimiter: bytes) -> int:
    """Where the first delimiter starts: at the very start, or after the preamble's CRLF."""
    if body[: len(delimiter)] == delimiter:
        return 0
    found = body.find(CRLF + delimiter)
    if found < 0:
        raise MalformedRequestError("the body holds no multipart boundary delimiter")
    return found + 2


def _part_headers(body: Buffer, start: int) -> tuple[dict[str, str], int]:
    """A part's header fields from ``start`` and where its content starts (after the blank
    line; a part may have no headers, RFC 2046 5.1.1)."""
    if body[start : start + 2] == CRLF:
        return {}, start + 2
    end = body.find(CRLF + CRLF, start, start + MAX_HEADER_BYTES)
    if end < 0:
        raise MalformedRequestError("a part's headers do not end in a blank line")
    headers: dict[str, str] = {}
    for line in body[start:end].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MalformedRequestError("a part has a header line without a name")
        headers[name.strip().lower()] = value.strip()
    return headers, end + 4
