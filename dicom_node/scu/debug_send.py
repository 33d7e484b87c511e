"""Send DICOM files from disk to a node as they are: ``dicom-node debug send``.

For an administrator's first test study.  Plain ``storescu FILE`` proposes only the
uncompressed transfer syntaxes, so a JPEG or JPEG 2000 file fails before it is sent; here each
file is offered in its own transfer syntax (PS3.8 7.1.1.13: one presentation context per
abstract syntax and transfer syntax pair) and sent byte for byte, and every C-STORE answer is
reported (PS3.4 B.2.3).  Never used by the node's own delivery, which is
:mod:`dicom_node.scu.send`; both open their association through :mod:`dicom_node.scu.association`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.association import Association
from pynetdicom.status import code_to_category

from dicom_node.errors import TransientDeliveryError
from dicom_node.scu.association import (
    AssociationRequest,
    NoAssociation,
    PresentationContext,
    accepted_transfer_syntaxes,
    association,
    c_store,
)

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255


@dataclass(frozen=True)
class LocalFile:
    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class SendOutcome:
    path: Path
    status_code: int | None  # None: not sent (not DICOM, no accepted context, no answer)
    detail: str

    @property
    def succeeded(self) -> bool:
        return self.status_code is not None and code_to_category(self.status_code) in (
            "Success",
            "Warning",
        )


def collect_files(paths: Iterable[Path]) -> tuple[list[LocalFile], list[SendOutcome]]:
    """The DICOM Part 10 files among ``paths`` (folders are walked); the rest as outcomes."""
    found: list[LocalFile] = []
    skipped: list[SendOutcome] = []
    for path in _walk(paths):
        try:
            meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
            sop_class = str(meta.file_meta.MediaStorageSOPClassUID)
            syntax = str(meta.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
            skipped.append(
                SendOutcome(path, None, f"not a DICOM Part 10 file ({type(exc).__name__})")
            )
            continue
        found.append(LocalFile(path, sop_class, syntax))
    return found, skipped


def _walk(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def send_local_files(
    files: Sequence[LocalFile],
    *,
    host: str,
    port: int,
    called_ae_title: str,
    calling_ae_title: str,
    timeout: float = 30.0,
) -> list[SendOutcome]:
    """Send ``files`` over one association; one outcome per file, in order.

    Raises
    ------
    TransientDeliveryError
        The node refused the association or did not answer (the message says which).
    """
    request = AssociationRequest(
        calling_ae_title=calling_ae_title,
        called_ae_title=called_ae_title,
        host=host,
        port=port,
        contexts=_contexts(files),
        timeout=timeout,
    )
    with association(request) as assoc:
        if isinstance(assoc, NoAssociation):
            what = "rejected" if assoc.rejected else "not answered (refused or timed out)"
            raise TransientDeliveryError(
                f"the association to {called_ae_title}@{host}:{port} as {calling_ae_title} was "
                f"{what}; is {calling_ae_title} a configured peer at this address?"
            )
        return [_send_one(assoc, item) for item in files]


def _contexts(files: Sequence[LocalFile]) -> tuple[PresentationContext, ...]:
    """Each file's own (SOP class, transfer syntax); uncompressed files are offered in both
    little endian syntaxes (pynetdicom converts)."""
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files})
    uncompressed = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
    return tuple(
        (sop_class, uncompressed if syntax in uncompressed else (syntax,))
        for sop_class, syntax in pairs[:MAX_CONTEXTS]
    )


def _send_one(assoc: Association, item: LocalFile) -> SendOutcome:
    if not accepted_transfer_syntaxes(assoc, item.sop_class_uid):
        return SendOutcome(item.path, None, "the node accepted no presentation context for it")
    if not assoc.is_established:
        return SendOutcome(item.path, None, "the association ended early")
    code = c_store(assoc, item.path)
    if code is None:
        return SendOutcome(item.path, None, "no response (timeout or abort)")
    return SendOutcome(item.path, code, f"0x{code:04X} {code_to_category(code).lower()}")
