"""Send DICOM files from disk to a node as they are: ``dicom-node debug send``.

For an administrator's first test study.  Plain ``storescu FILE`` proposes only the
uncompressed transfer syntaxes, so a JPEG or JPEG 2000 file fails before it is sent; here each
file is offered in its own transfer syntax (PS3.8 7.1.1.13: one presentation context per
abstract syntax and transfer syntax pair) and sent byte for byte, and every C-STORE answer is
reported (PS3.4 B.2.3).  Never used by the node's own delivery, which is :mod:`dicom_node.scu.send`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.status import code_to_category

from dicom_node.errors import TransientDeliveryError

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
            "Success", "Warning")


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
            skipped.append(SendOutcome(path, None, f"not a DICOM Part 10 file ({type(exc).__name__})"))
            continue
        found.append(LocalFile(path, sop_class, syntax))
    return found, skipped


def _walk(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def send_local_files(files: Sequence[LocalFile], *, host: str, port: int, called_ae_title: str,
                     calling_ae_title: str, timeout: float = 30.0) -> list[SendOutcome]:
    """Send ``files`` over one association; one outcome per file, in order.

    Raises
    ------
    TransientDeliveryError
        The node refused the association or did not answer (the message says which).
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files})
    for sop_class, syntax in pairs[:MAX_CONTEXTS]:
        # uncompressed files are offered in both little endian syntaxes (pynetdicom converts)
        uncompressed = syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
                                 if uncompressed else [syntax])
    assoc = ae.associate(host, port, ae_title=called_ae_title)
    if not assoc.is_established:
        what = "rejected" if assoc.is_rejected else "not answered (refused or timed out)"
        raise TransientDeliveryError(
            f"the association to {called_ae_title}@{host}:{port} as {calling_ae_title} was "
            f"{what}; is {calling_ae_title} a configured peer at this address?")
    try:
        return [_send_one(assoc, item) for item in files]
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _send_one(assoc, item: LocalFile) -> SendOutcome:
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == item.sop_class_uid]
    if not accepted:
        return SendOutcome(item.path, None, "the node accepted no presentation context for it")
    if not assoc.is_established:
        return SendOutcome(item.path, None, "the association ended early")
    status = assoc.send_c_store(item.path)
    if "Status" not in status:
        return SendOutcome(item.path, None, "no response (timeout or abort)")
    code = int(status.Status)
    return SendOutcome(item.path, code, f"0x{code:04X} {code_to_category(code).lower()}")
