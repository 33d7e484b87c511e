"""The pre-association gate: a connection must send its A-ASSOCIATE-RQ within ``[scp]
acse_timeout`` before it may take one of ``[scp] max_associations``.

pynetdicom starts an acceptor association (the thing ``maximum_associations`` counts) for every
accepted socket, before a byte is read, and its 6-byte PDU header read has no timeout: ten
connections that each send one byte held every association slot for as long as they liked.
Here each accepted connection first waits in a bounded pool (``[scp] max_pending_connections``;
beyond it a new connection is closed at once) while the gate reads the first PDU itself, against
one deadline for the TLS handshake and the whole PDU.  Only an A-ASSOCIATE-RQ (PS3.8 9.3.2) of
a sane length, received in time, is handed on to pynetdicom, whose socket wrapper replays the
bytes the gate read; everything else is closed and reported to ``on_refused`` (log + audit).

Outcomes, as the Upper Layer state machine would have them in Sta2 (PS3.8 9.2.3, Table 9-10):
ARTIM expiry (silence, a partial header, a drip) closes the connection (AA-2); another PDU
first, or an absurd length, is answered with an A-ABORT (AA-1, PS3.8 9.3.8) and closed.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import structlog
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicom_node.errors import AssociationNotNegotiatedError
from dicom_node.scp.reactor import IDLE_WAIT_SECONDS, WakePipe, make_event_driven, wait_readable

log = structlog.get_logger(__name__)

A_ASSOCIATE_RQ = 0x01  # PS3.8 9.3.1 Table 9-11, PDU types
A_ABORT = 0x07
PDU_HEADER = struct.Struct(">BBL")  # type, reserved, PDU length (PS3.8 9.3.2)
# The longest A-ASSOCIATE-RQ accepted.  PS3.8 sets no bound below 2**32 - 1; a real one
# proposing all 128 presentation contexts with 30 transfer syntaxes each, plus a user identity
# token, stays under 128 KiB.  At most max_pending_connections of these are held at once.
MAX_ASSOCIATE_RQ_LENGTH = 256 * 1024
# A-ABORT reasons, source 2 = service provider (PS3.8 9.3.8 Table 9-26)
UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PDU_PARAMETER = 0x01, 0x02, 0x06

# (peer address, peer port, reason, cause): reason is the audit's, e.g. "tls_handshake_failed"
RefusalHook = Callable[[str, int, str, str], None]


@dataclass(frozen=True)
class ConnectionGate:
    """What every listener of one node shares before association: the deadline, the pool of
    slots for connections still negotiating, and who hears about refusals."""

    acse_timeout: float
    max_pending: int
    slots: threading.BoundedSemaphore
    on_refused: RefusalHook

    @classmethod
    def create(
        cls, acse_timeout: float, max_pending: int, on_refused: RefusalHook
    ) -> ConnectionGate:
        return cls(acse_timeout, max_pending, threading.BoundedSemaphore(max_pending), on_refused)


@dataclass(frozen=True)
class AdmittedConnection:
    """A connection that sent its A-ASSOCIATE-RQ in time: the socket and the PDU's bytes."""

    socket: socket.socket
    associate_rq: bytes


@dataclass(frozen=True)
class Refusal:
    """A connection to close: ``reason`` is the audit's, None for one closed quietly (a TCP
    health check that connects and closes without a byte is not a security alert)."""

    socket: socket.socket
    reason: str | None = None
    cause: str = ""


def read_associate_rq(
    sock: socket.socket, deadline: float, limit: int = MAX_ASSOCIATE_RQ_LENGTH
) -> bytes:
    """The connection's first PDU, header and all, which must be an A-ASSOCIATE-RQ of at most
    ``limit`` bytes, complete before ``deadline`` (``time.monotonic()``); b"" when the peer
    closed without sending a byte (a TCP health check).

    Raises
    ------
    AssociationNotNegotiatedError
        Silence, a partial PDU or a drip past the deadline, a reset, or (after an A-ABORT to
        the peer) another PDU type or a declared length over ``limit``.
    """
    header = _recv_exactly(sock, PDU_HEADER.size, deadline, "PDU header")
    if not header:
        return b""
    pdu_type, _, length = PDU_HEADER.unpack(header)
    if pdu_type != A_ASSOCIATE_RQ:
        if pdu_type != A_ABORT:  # Sta2 + Evt16 (A-ABORT) only closes: AA-2
            _send_abort(sock, UNEXPECTED_PDU if pdu_type <= A_ABORT else UNRECOGNIZED_PDU)
        raise AssociationNotNegotiatedError(
            f"the first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ"
        )
    if length > limit:
        _send_abort(sock, INVALID_PDU_PARAMETER)
        raise AssociationNotNegotiatedError(
            f"the A-ASSOCIATE-RQ declares {length} bytes (at most {limit} accepted)"
        )
    return header + _recv_exactly(sock, length, deadline, "A-ASSOCIATE-RQ", empty_ok=False)


def _recv_exactly(
    sock: socket.socket, count: int, deadline: float, what: str, empty_ok: bool = True
) -> bytes:
    """``count`` bytes before ``deadline``; b"" if the peer closed before the first and
    ``empty_ok``.  Each wait is only what is left of the deadline, so a drip cannot extend it."""
    data = bytearray()
    while len(data) < count:
        remaining = deadline - time.monotonic()
        try:
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            chunk = sock.recv(min(count - len(data), 65536))
        except TimeoutError:
            raise AssociationNotNegotiatedError(
                f"no complete {what} before the timeout ({len(data)} of {count} bytes)"
            ) from None
        except OSError as exc:
            raise AssociationNotNegotiatedError(
                f"connection failed during the {what} ({exc.strerror or type(exc).__name__})"
            ) from None
        if not chunk:
            if not data and empty_ok:
                return b""
            raise AssociationNotNegotiatedError(
                f"connection closed during the {what} ({len(data)} of {count} bytes)"
            )
        data += chunk
    return bytes(data)


def _send_abort(sock: socket.socket, reason: int) -> None:
    """A-ABORT PDU, source service provider (PS3.8 9.3.8); best effort, the peer may be gone."""
    with contextlib.suppress(OSError):
        sock.settimeout(1.0)
        sock.sendall(PDU_HEADER.pack(A_ABORT, 0, 4) + bytes((0, 0, 0x02, reason)))


def close_connection(sock: socket.socket) -> None:
    """Shut down both directions (the peer reads end-of-stream), then close."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class ReplayingAssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper, whose reads first return the bytes the gate already took
    off the connection (its A-ASSOCIATE-RQ), and which reports them as ready to read.

    ``ready`` blocks, while nothing is to read, until data comes, a primitive is queued for
    the DUL to send (``wake``), or ``IDLE_WAIT_SECONDS`` (:mod:`dicom_node.scp.reactor`).
    """

    replay: bytearray
    wake: WakePipe | None

    @classmethod
    def replacing(
        cls, plain: AssociationSocket, replay: bytes, wake: WakePipe | None = None
    ) -> ReplayingAssociationSocket:
        """``plain``'s connection and state, replaying ``replay`` first.  Not constructed
        afresh: that would queue the transport indication (Evt5) a second time."""
        sock = cls.__new__(cls)
        vars(sock).update(vars(plain))
        sock.replay = bytearray(replay)
        sock.wake = wake
        return sock

    @property
    def ready(self) -> bool:
        if self.replay or super().ready:
            return True
        if self.wake is None or self.socket is None or not self._is_connected:
            return False
        try:
            readable, woken = wait_readable(self.socket, self.wake, IDLE_WAIT_SECONDS)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's check says so (Evt17)
            return bool(super().ready)
        if woken:  # a primitive to send: queue its event now, not after the next loop's sleep
            self._assoc.dul._process_recv_primitive()
        return readable and bool(super().ready)

    def recv(self, nr_bytes: int) -> bytearray:
        """``nr_bytes`` (fewer if the peer closed), the replayed ones first, read straight
        into one buffer: pynetdicom's own read takes 4 KiB per call, 2,500 calls for 10 MB."""
        head = self.replay[:nr_bytes]
        del self.replay[:nr_bytes]
        if len(head) == nr_bytes or self.socket is None:
            return head
        buffer = bytearray(nr_bytes)
        buffer[: len(head)] = head
        got = len(head)
        with memoryview(buffer) as view:
            while got < nr_bytes:
                count = self.socket.recv_into(view[got:])
                if not count:  # the peer closed: what came, as pynetdicom's recv
                    break
                got += count
        del buffer[got:]
        return buffer

    def _shutdown_socket(self) -> None:
        """Every way pynetdicom ends the connection passes here: the wake-up pipe goes too."""
        try:
            super()._shutdown_socket()
        finally:
            if self.wake is not None:
                self.wake.close()
                self.wake = None


class GatedRequestHandler(RequestHandler):
    """pynetdicom's handler for an admitted connection: the association reads the replayed
    A-ASSOCIATE-RQ first, then the socket; its threads wait for work instead of polling."""

    def setup(self) -> None:
        admitted: AdmittedConnection = self.request
        self.associate_rq = admitted.associate_rq
        self.request = admitted.socket

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        wake = WakePipe()
        make_event_driven(assoc, wake)
        assoc.dul.socket = ReplayingAssociationSocket.replacing(
            assoc.dul.socket,  # type: ignore[arg-type]
            self.associate_rq,
            wake,
        )
        return assoc


class SharedContexts(list[PresentationContext]):
    """The supported presentation contexts, shared by every association instead of copied.

    pynetdicom deep-copies the server's contexts into each new association; with every storage
    SOP class and transfer syntax pynetdicom knows (``[scp] other_sop_classes = "discard"``:
    about 170 contexts, 7,600 transfer syntax UIDs) that copy cost tens of milliseconds of CPU,
    under the GIL, per association.  Negotiation only reads them
    (``pynetdicom.presentation.negotiate_as_acceptor`` builds new contexts for the result), so
    one list serves all; nothing changes it once the server runs.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedContexts:
        return self


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the gate in front: accept only in the accept loop,
    then admit (``secure`` + :func:`read_associate_rq`) in the connection's thread, holding one
    of the gate's pending slots.  Pending connections are cut when the server closes.
    Associations share its presentation contexts (:class:`SharedContexts`)."""

    request_queue_size = 128  # a burst of connects waits in the kernel, not refused (was 5)

    def __init__(self, *args: Any, gate: ConnectionGate, **kwargs: Any) -> None:
        self.gate = gate
        self._pending: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._last_busy_audit: dict[str, float] = {}
        kwargs.setdefault("request_handler", GatedRequestHandler)
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: nothing that waits on the peer runs in the accept loop."""
        assert self.socket is not None
        return self.socket.accept()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Over ``max_pending_connections`` still negotiating: close at once."""
        if not self.gate.slots.acquire(blocking=False):
            close_connection(request)
            self._refuse_busy(client_address)
            return
        try:
            super().process_request(request, client_address)  # its own thread
        except BaseException:
            self.gate.slots.release()
            close_connection(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        outcome: AdmittedConnection | Refusal = Refusal(request)
        try:
            outcome = self._admit(request, client_address)
        except Exception:  # a bug, not the peer: the listener keeps serving
            log.exception("scp.admission_failed", peer_address=str(client_address[0]))
        finally:
            self.gate.slots.release()  # before the close: a peer seeing it may connect again
        if isinstance(outcome, Refusal):
            close_connection(outcome.socket)
            if outcome.reason is not None:
                self.refuse(client_address, outcome.reason, outcome.cause)
            return
        try:
            # starts the association's thread; socketserver types the request as a socket, and
            # GatedRequestHandler.setup unwraps this AdmittedConnection
            self.finish_request(outcome, client_address)  # type: ignore[arg-type]
        except Exception:
            log.exception("scp.association_start_failed", peer_address=str(client_address[0]))
            close_connection(outcome.socket)

    def secure(
        self, request: socket.socket, client_address: Any, deadline: float
    ) -> socket.socket | Refusal:
        """The socket to read the A-ASSOCIATE-RQ from, or why not.  Plaintext: the
        connection itself; the TLS listener handshakes here."""
        return request

    def refuse(self, client_address: Any, reason: str, cause: str) -> None:
        """Report a refused connection, unless the server is closing (that cut is ours)."""
        if not self._closing:
            self.gate.on_refused(str(client_address[0]), int(client_address[1]), reason, cause)

    def _admit(self, request: socket.socket, client_address: Any) -> AdmittedConnection | Refusal:
        deadline = time.monotonic() + self.gate.acse_timeout
        with self.tracking(request):
            sock = self.secure(request, client_address, deadline)
            if isinstance(sock, Refusal):
                return sock
            with self.tracking(sock):
                try:
                    associate_rq = read_associate_rq(sock, deadline)
                except AssociationNotNegotiatedError as exc:
                    return Refusal(sock, "association_not_negotiated", str(exc))
        if not associate_rq:  # connect, close: a health check or port scan, not an alert
            return Refusal(sock)
        sock.settimeout(None)  # as pynetdicom's own accepted sockets: it selects, then reads
        return AdmittedConnection(sock, associate_rq)

    def _refuse_busy(self, client_address: Any) -> None:
        """Log every refusal; audit one per address per ``acse_timeout`` (a flood would
        otherwise write a row per connect from the accept loop)."""
        address, now = str(client_address[0]), time.monotonic()
        last = self._last_busy_audit.get(address)
        cause = f"{self.gate.max_pending} connections already negotiating"
        if last is not None and now - last < self.gate.acse_timeout:
            log.warning(
                "scp.too_many_pending_connections",
                peer_address=address,
                peer_port=int(client_address[1]),
                cause=cause,
                audited=False,
            )
            return
        if len(self._last_busy_audit) > 1024:
            self._last_busy_audit.clear()
        self._last_busy_audit[address] = now
        self.refuse(client_address, "too_many_pending_connections", cause)

    @contextlib.contextmanager
    def tracking(self, sock: socket.socket) -> Iterator[None]:
        """Register ``sock`` as pending, so ``server_close`` can cut it."""
        with self._lock:
            self._pending.add(sock)
        try:
            yield
        finally:
            with self._lock:
                self._pending.discard(sock)

    def server_close(self) -> None:
        """Cut pending connections, then close (ThreadingMixIn joins the connection threads)."""
        self._closing = True
        with self._lock:
            pending = list(self._pending)
        for sock in pending:
            with contextlib.suppress(OSError):  # the plain shutdown: wakes a blocked read
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
        super().server_close()


def start_gated_server(
    ae: AE,
    address: tuple[str, int],
    evt_handlers: list[Any],
    gate: ConnectionGate,
    name: str,
    server_class: type[GatedAssociationServer] = GatedAssociationServer,
    **kwargs: Any,
) -> GatedAssociationServer:
    """Start a gated listener for ``ae`` in a daemon thread, as ``AE.start_server(block=False)``.

    Raises OSError when the address cannot be bound.
    """
    server = cast(  # make_server builds an instance of ``server_class``
        GatedAssociationServer,
        ae.make_server(
            address, evt_handlers=evt_handlers, server_class=server_class, gate=gate, **kwargs
        ),
    )
    threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
    ae._servers.append(server)  # as start_server does: AssociationServer.shutdown removes it
    return server
