"""The one place the node opens an association as an SCU (PS3.8 7.1), to any peer.

Delivery (:mod:`dicom_node.scu.send`), ``dicom-node debug send``
(:mod:`dicom_node.scu.debug_send`) and the operator's C-ECHO (:mod:`dicom_node.scu.echo`) all
ask here: an AE with one timeout for every phase, the requested presentation contexts, the TLS
client context for a peer with ``tls = true`` (:mod:`dicom_node.scu.tls`), and a release (or,
when the peer is gone, the abort pynetdicom does) on the way out.  When no association is made
the caller gets :class:`NoAssociation`, the facts of why, and words them for its own reader.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicom_node.scu.tls import ClientContext, handshake_error

# One presentation context to propose: abstract syntax and its transfer syntaxes (PS3.8 9.3.2.2).
PresentationContext = tuple[str, tuple[str, ...]]


@dataclass(frozen=True)
class AssociationRequest:
    """What to ask of which peer, as which AE title."""

    calling_ae_title: str
    called_ae_title: str
    host: str
    port: int
    contexts: tuple[PresentationContext, ...]
    timeout: float  # connection, ACSE, DIMSE and network
    tls_args: tuple[ClientContext, str] | None = None  # pynetdicom's; None: plaintext


@dataclass(frozen=True)
class NoAssociation:
    """Why no association was established (PS3.8 9.3.3 A-ASSOCIATE-AC, 9.3.4 -RJ)."""

    rejected: bool  # the peer answered A-ASSOCIATE-RJ
    permanent: bool  # ... with result 0x01, rejected-permanent
    reason: str  # the reject's source and reason, as pynetdicom words them
    accepted: bool  # the peer answered A-ASSOCIATE-AC, accepting no context
    answered: bool  # any A-ASSOCIATE answer arrived at all
    tls_error: str | None  # why the TLS handshake failed, when it did


@contextlib.contextmanager
def association(request: AssociationRequest) -> Iterator[Association | NoAssociation]:
    """The established association for ``request``, released on exit; or why there is none.

    pynetdicom aborts by itself an association whose peer stops answering, so a release is
    only attempted while the association is still established.
    """
    ae = AE(ae_title=request.calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = request.timeout
    ae.connection_timeout = request.timeout
    for abstract_syntax, transfer_syntaxes in request.contexts:
        ae.add_requested_context(abstract_syntax, list(transfer_syntaxes))
    answers: list[Any] = []  # the A-ASSOCIATE primitives the peer sent back
    handlers: list[Any] = [(evt.EVT_ACSE_RECV, lambda event: answers.append(event.primitive))]
    assoc = ae.associate(
        request.host,
        request.port,
        ae_title=request.called_ae_title,
        evt_handlers=handlers,
        tls_args=request.tls_args,
    )
    try:
        yield assoc if assoc.is_established else _no_association(assoc, answers, request)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def _no_association(
    assoc: Association, answers: list[Any], request: AssociationRequest
) -> NoAssociation:
    results = [getattr(answer, "result", None) for answer in answers]
    reason = next((a.reason_str for a in answers if getattr(a, "result", None)), "")
    return NoAssociation(
        rejected=bool(assoc.is_rejected),
        permanent=0x01 in results,
        reason=reason,
        accepted=0x00 in results,
        answered=bool(answers),
        tls_error=handshake_error(request.tls_args),
    )


def accepted_transfer_syntaxes(assoc: Association, sop_class_uid: str) -> list[str]:
    """The transfer syntax of each context the peer accepted for ``sop_class_uid``."""
    return [
        str(context.transfer_syntax[0])
        for context in assoc.accepted_contexts
        if context.abstract_syntax == sop_class_uid
    ]


def c_store(assoc: Association, message: Path | Dataset) -> int | None:
    """Send one C-STORE; the response's status, or None when none came (timeout or abort:
    PS3.7 C.1, no status)."""
    status = assoc.send_c_store(message)
    return int(status.Status) if "Status" in status else None


def c_echo(assoc: Association) -> int | None:
    """Send one C-ECHO (PS3.7 9.1.5); the response's status, or None when none came."""
    status = assoc.send_c_echo()
    return int(status.Status) if "Status" in status else None


def contexts_for(
    sop_class_uids: Sequence[str], transfer_syntaxes: Sequence[str]
) -> tuple[PresentationContext, ...]:
    """One context per SOP class, each proposing ``transfer_syntaxes`` in that order."""
    return tuple((uid, tuple(transfer_syntaxes)) for uid in sop_class_uids)
