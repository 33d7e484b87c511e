"""C-ECHO a peer (PS3.7 9.1.5), as the node: the operator's "is the PACS there?".

The association is opened by :mod:`dicom_node.scu.association`, over DICOM TLS for a peer with
``tls = true`` exactly as results are sent to it, so a successful echo means delivery can at
least connect.  Used by the admin page, ``dicom-node doctor`` and the operator actions
(:mod:`dicom_node.ops.actions`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.config.operations import TlsSettings
from dicom_node.config.settings import PeerSettings
from dicom_node.errors import TlsConfigError
from dicom_node.scu.association import AssociationRequest, NoAssociation, association, c_echo
from dicom_node.scu.tls import peer_tls_args

SUCCESS = 0x0000  # PS3.7 9.3.5.2: the only status a Verification SCP returns on success


@dataclass(frozen=True)
class EchoAnswer:
    """What ``peer`` answered: the C-ECHO-RSP status (None: no answer) and why, in words."""

    status_code: int | None
    detail: str

    @property
    def succeeded(self) -> bool:
        return self.status_code == SUCCESS


def echo(
    peer: PeerSettings, *, calling_ae_title: str, tls: TlsSettings, timeout: float
) -> EchoAnswer:
    """One C-ECHO to ``peer`` from ``calling_ae_title``; never raises for a peer's failure."""
    try:
        tls_args = peer_tls_args(tls, peer)
    except TlsConfigError as exc:
        return EchoAnswer(None, f"TLS settings unusable: {exc}")
    verification = (str(Verification), tuple(DEFAULT_TRANSFER_SYNTAXES))
    request = AssociationRequest(
        calling_ae_title=calling_ae_title,
        called_ae_title=peer.ae_title,
        host=peer.host,
        port=peer.port,
        contexts=(verification,),
        timeout=timeout,
        tls_args=tls_args,
    )
    with association(request) as assoc:
        if isinstance(assoc, NoAssociation):
            return EchoAnswer(None, _why(assoc))
        code = c_echo(assoc)
    if code is None:
        return EchoAnswer(None, "no C-ECHO response")
    return EchoAnswer(code, f"status 0x{code:04X}")


def _why(refused: NoAssociation) -> str:
    if refused.tls_error:
        return f"TLS handshake failed: {refused.tls_error}"
    return "association rejected" if refused.rejected else "no association (refused or timed out)"
