"""Store the instances of one STOW-RS request, part by part, through the C-STORE path.

Each part of the ``multipart/related`` body is a PS3.10 file (PS3.18 10.5.1.1: preamble,
"DICM", File Meta Information, data set).  Its File Meta gives the transfer syntax and the SOP
UIDs, which must agree with the data set's own (as the C-STORE command's must); the data set
then goes through :func:`dicom_node.ingest.accept_instance`, the SCP's own path, so a STOW-RS
instance has the same gating, identifier checks, duplicate handling and durability (fsynced
and committed before the response) and joins its study the same way.  The file is stored as
posted, byte for byte.  Each part's failure is one ``dicom_node.errors`` class, turned into
its Failure Reason by the SCP's table (PS3.18 I.2.2 reuses the C-STORE statuses).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import structlog
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pynetdicom import ALL_TRANSFER_SYNTAXES

from dicom_node.errors import (
    InvalidInstanceError,
    MalformedRequestError,
    SopMismatchError,
    StudyMismatchError,
    UnsupportedTransferSyntaxError,
)
from dicom_node.header import InstanceHeader
from dicom_node.ingest import IngestContext, accept_instance, read_instance_header
from dicom_node.scp.handlers import dimse_status_for
from dicom_node.web.multipart import Part, parse_media_type, split_parts

log = structlog.get_logger(__name__)

DICOM_MEDIA_TYPE = "application/dicom"
SUPPORTED_TRANSFER_SYNTAXES = frozenset(str(syntax) for syntax in ALL_TRANSFER_SYNTAXES)


@dataclass(frozen=True)
class PartOutcome:
    """What became of one part: stored (``failure_reason`` None) or its Failure Reason."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str | None
    patient_id: str | None
    failure_reason: int | None = None
    comment: str = ""


def store_body(
    ingest: IngestContext,
    spool: Path,
    boundary: str,
    study_instance_uid: str | None,
    calling: str,
) -> list[PartOutcome]:
    """Store every instance of the spooled body ``spool``; one outcome per part, in order.

    The whole multipart structure is checked first (MalformedRequestError: nothing stored).
    ``study_instance_uid`` is the request path's study (``/studies/{study}``), if any.
    """
    with spool.open("rb") as file:
        if spool.stat().st_size == 0:
            raise MalformedRequestError("the request body is empty")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as body:
            parts = split_parts(body, boundary)
            return [
                _store_part(ingest, part, body[part.start : part.end], study_instance_uid, calling)
                for part in parts
            ]


def _store_part(
    ingest: IngestContext,
    part: Part,
    content: bytes,
    study_instance_uid: str | None,
    calling: str,
) -> PartOutcome:
    meta: FileMetaDataset | None = None
    header: InstanceHeader | None = None
    try:
        _check_part_type(part)
        meta, offset = read_file_meta(content)
        transfer_syntax_uid = str(meta.get("TransferSyntaxUID", ""))
        if transfer_syntax_uid not in SUPPORTED_TRANSFER_SYNTAXES:
            raise UnsupportedTransferSyntaxError("the node does not read this transfer syntax")
        dataset = content[offset:]
        header = read_instance_header(ingest, dataset, transfer_syntax_uid)
        _check_meta_matches(meta, header)
        if study_instance_uid is not None and header.study_instance_uid != study_instance_uid:
            raise StudyMismatchError("the instance is of another study than the request names")
        accept_instance(ingest, header, dataset, [content], calling)
    except Exception as exc:  # each part's own outcome: the table decides its Failure Reason
        answer = dimse_status_for(exc)
        log.warning(
            "stow.instance_failed",
            failure_reason=f"0x{answer.status:04X}",
            error_type=type(exc).__name__,
            sop_instance_uid=header.sop_instance_uid if header is not None else None,
        )
        return _outcome(meta, header, answer.status, answer.comment)
    return _outcome(meta, header, None, "")


def _outcome(
    meta: FileMetaDataset | None,
    header: InstanceHeader | None,
    failure_reason: int | None,
    comment: str,
) -> PartOutcome:
    """The part's outcome, naming the instance as far as it could be read."""
    if header is not None:
        sop_class, sop_instance = header.sop_class_uid, header.sop_instance_uid
    elif meta is not None:
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        sop_instance = str(meta.get("MediaStorageSOPInstanceUID", ""))
    else:
        sop_class = sop_instance = ""
    return PartOutcome(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_instance_uid=header.study_instance_uid if header is not None else None,
        patient_id=(header.patient_id or None) if header is not None else None,
        failure_reason=failure_reason,
        comment=comment,
    )


def _check_part_type(part: Part) -> None:
    """A part must be ``application/dicom`` (PS3.18 10.5.1.1); one without a Content-Type
    takes the request's ``type``, which the route has checked."""
    declared = part.headers.get("content-type")
    if declared is not None and parse_media_type(declared).media_type != DICOM_MEDIA_TYPE:
        raise InvalidInstanceError("the part is not application/dicom")


def read_file_meta(content: bytes) -> tuple[FileMetaDataset, int]:
    """The File Meta Information of a PS3.10 file and where its data set starts (PS3.10 7.1).

    Raises
    ------
    InvalidInstanceError
        No preamble and "DICM" prefix, or File Meta pydicom cannot read.
    """
    stream = BytesIO(content)
    try:
        read_preamble(stream, False)  # force=False: raises without "DICM" at offset 128
        # pydicom's own File Meta reader: public read_file_meta_info opens a path instead
        meta = _read_file_meta_info(stream)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError) as exc:
        raise InvalidInstanceError(
            f"the part is not a DICOM file with File Meta Information ({type(exc).__name__})"
        ) from None
    return meta, stream.tell()


def _check_meta_matches(meta: FileMetaDataset, header: InstanceHeader) -> None:
    """The File Meta's SOP UIDs must be the data set's (PS3.10 7.1), as a C-STORE's command's
    must (the SCP's SopMismatchError)."""
    if str(meta.get("MediaStorageSOPClassUID", "")) != header.sop_class_uid or str(
        meta.get("MediaStorageSOPInstanceUID", "")
    ) != (header.sop_instance_uid):
        raise SopMismatchError("the File Meta's SOP UIDs differ from the data set's")
