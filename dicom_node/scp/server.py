"""Build the Application Entity and start the association server.

The only module that touches pynetdicom's process-wide ``_config``.  Accepted: Verification,
and Storage for CR, Digital X-Ray (for presentation and for processing) and Secondary Capture
with every transfer syntax pynetdicom knows, stored as received.  Other storage SOP classes are
accepted and discarded, or not negotiated at all, per ``[scp] other_sop_classes``.
"""

from __future__ import annotations

import socket
from pathlib import Path

import structlog
from pynetdicom import (ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, _config,
                        evt)
from pynetdicom.sop_class import (ComputedRadiographyImageStorage,
                                  DigitalXRayImageStorageForPresentation,
                                  DigitalXRayImageStorageForProcessing,
                                  SecondaryCaptureImageStorage, Verification)
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import PeerSettings, Settings
from dicom_node.scp.handlers import ScpContext, handle_echo, handle_requested, handle_store

log = structlog.get_logger(__name__)

ANALYSED_SOP_CLASSES = frozenset({
    str(ComputedRadiographyImageStorage),
    str(DigitalXRayImageStorageForPresentation),
    str(DigitalXRayImageStorageForProcessing),
    str(SecondaryCaptureImageStorage),
})


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings: no per-message handler logging (it can be verbose
    and adds nothing our own events do not say)."""
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def resolve_peers(peers: tuple[PeerSettings, ...]) -> dict[str, frozenset[str]]:
    """Map each peer's AE title to the IP addresses its host resolves to."""
    allowed: dict[str, set[str]] = {}
    for peer in peers:
        try:
            infos = socket.getaddrinfo(peer.host, None, proto=socket.IPPROTO_TCP)
            addresses = {str(info[4][0]) for info in infos}
        except OSError:
            log.warning("peer.unresolved", peer=peer.name, host=peer.host)
            addresses = set()
        allowed.setdefault(peer.ae_title.strip(), set()).update(addresses)
    return {title: frozenset(addresses) for title, addresses in allowed.items()}


def build_ae(settings: Settings) -> AE:
    """The node's AE with its accepted presentation contexts and association limits."""
    configure_pynetdicom()
    ae = AE(ae_title=settings.node.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = settings.scp.max_associations
    ae.network_timeout = settings.scp.network_timeout
    ae.acse_timeout = settings.scp.acse_timeout
    ae.dimse_timeout = settings.scp.dimse_timeout
    ae.maximum_pdu_size = settings.scp.max_pdu_size
    for sop_class in sorted(ANALYSED_SOP_CLASSES):
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    if settings.scp.other_sop_classes == "discard":
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax not in ANALYSED_SOP_CLASSES:
                ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification)
    return ae


def start_scp(settings: Settings, session_factory: sessionmaker[Session],
              host: str | None = None, port: int | None = None,
              ) -> tuple[ThreadedAssociationServer, ScpContext]:
    """Start listening (non-blocking); ``server.server_address`` gives the bound port.

    The caller shuts the server down, then the context's hash pool.
    """
    ae = build_ae(settings)
    ctx = ScpContext(settings=settings, session_factory=session_factory,
                     storage_root=Path(settings.storage.root),
                     analysed_sop_classes=ANALYSED_SOP_CLASSES,
                     peer_addresses=resolve_peers(settings.peers))
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [ctx]),
        (evt.EVT_C_ECHO, handle_echo, [ctx]),
        (evt.EVT_C_STORE, handle_store, [ctx]),
    ]
    address = (host or settings.node.host, settings.node.port if port is None else port)
    server = ae.start_server(address, block=False, evt_handlers=handlers)
    log.info("scp.listening", ae_title=settings.node.ae_title, host=server.server_address[0],
             port=server.server_address[1])
    return server, ctx
