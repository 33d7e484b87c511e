"""Event-driven waits for an acceptor association's two threads, instead of 1 ms polling.

pynetdicom runs two threads per association that poll while idle: the DUL reactor sleeps
1 ms, then looks at its queue of primitives to send and ``select``s the socket with no
timeout; the association reactor sleeps 1 ms, then looks for a decoded DIMSE message.  Each
wake-up takes the GIL.  Twenty associations (forty threads, 40,000 wake-ups a second) took
half a CPU core while idle, and under load they doubled the node's CPU per instance against
one association (``bench/senders.py``).

Here each thread blocks until it has work, or at most ``IDLE_WAIT_SECONDS``:

* the DUL thread in ``select`` on its socket and on a wake-up socket pair that is written
  whenever a primitive is queued for it to send (:class:`WakingQueue` as its
  ``to_provider_queue``); woken for a primitive, it has the event queued at once, so a
  C-STORE-RSP goes out without waiting for the next loop;
* the association thread on an event set whenever the DUL thread queues a DIMSE message or
  an A-RELEASE/A-ABORT indication for it (:class:`ReactorCheckpoint`).

What has no wake-up (a timer, the other thread ending, a ``kill``) is seen within
``IDLE_WAIT_SECONDS``, as before within 1 ms: the timers count seconds.  pynetdicom's
``_reactor_checkpoint`` pause keeps its meaning.  This relies on pynetdicom 3.0's internals
(pinned in constraints.txt): the queues' names and that only these threads put on them.
"""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

IDLE_WAIT_SECONDS = 0.05


class WakingQueue(queue.Queue[Any]):
    """A queue that calls ``on_put`` after each put (to wake the thread that reads it)."""

    def __init__(self, on_put: Callable[[], None]) -> None:
        super().__init__()
        self.on_put = on_put

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.on_put()


class WakePipe:
    """A socket pair that ``select`` can wait on beside the association's socket."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def signal(self) -> None:
        """Wake the reader; a full pipe is already a pending wake-up, a closed one is over."""
        with contextlib.suppress(OSError):
            self.writer.send(b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while self.reader.recv(4096):
                pass

    def close(self) -> None:
        self.reader.close()
        self.writer.close()


def wait_readable(sock: Any, wake: WakePipe, timeout: float) -> tuple[bool, bool]:
    """Block until ``sock`` is readable, ``wake`` is signalled, or ``timeout``; returns
    (socket readable, woken).  Raises OSError or ValueError for a closed socket."""
    readable, _, _ = select.select([sock, wake.reader], [], [], timeout)
    woken = wake.reader in readable
    if woken:
        wake.drain()
    return sock in readable, woken


class ReactorCheckpoint(threading.Event):
    """pynetdicom's ``_reactor_checkpoint`` (set: the association reactor may run; cleared:
    paused), whose ``wait`` also blocks until ``work`` is set or ``IDLE_WAIT_SECONDS`` pass.

    ``work`` is cleared before the reactor looks at its queues, so a message queued after
    that look sets it again and the next wait returns at once: no wake-up is lost.  If the
    checkpoint is cleared during the wait (someone pauses the reactor), it waits again.
    """

    def __init__(self, work: threading.Event, idle_wait: float = IDLE_WAIT_SECONDS) -> None:
        super().__init__()
        self.work, self.idle_wait = work, idle_wait

    def wait(self, timeout: float | None = None) -> bool:
        while True:
            if not super().wait(timeout):
                return False
            self.work.wait(self.idle_wait)
            self.work.clear()
            if self.is_set():
                return True


def make_event_driven(assoc: Any, wake: WakePipe) -> None:
    """Give a new acceptor association (threads not yet started) the waking queues and the
    checkpoint; its socket (``ReplayingAssociationSocket``) waits on ``wake``."""
    work = threading.Event()
    assoc.dul.to_provider_queue = WakingQueue(wake.signal)
    assoc.dul.to_user_queue = WakingQueue(work.set)
    assoc.dimse.msg_queue = WakingQueue(work.set)
    checkpoint = ReactorCheckpoint(work)
    if assoc._reactor_checkpoint.is_set():
        checkpoint.set()
    assoc._reactor_checkpoint = checkpoint
