"""The association threads' waits (dicom_node.scp.reactor): woken by work, paused when told."""

from __future__ import annotations

import socket
import threading

from dicom_node.scp.reactor import ReactorCheckpoint, WakePipe, WakingQueue, wait_readable


def test_a_queued_item_wakes_the_waiting_reactor() -> None:
    work = threading.Event()
    checkpoint = ReactorCheckpoint(work, idle_wait=30)
    checkpoint.set()
    messages = WakingQueue(work.set)
    woke = threading.Event()
    waiter = threading.Thread(target=lambda: checkpoint.wait() and woke.set())
    waiter.start()
    messages.put("C-STORE-RQ")
    waiter.join(timeout=10)
    assert woke.is_set() and messages.get_nowait() == "C-STORE-RQ"
    assert not work.is_set()  # cleared before the reactor looks at its queues


def test_a_paused_reactor_stays_paused_when_work_arrives() -> None:
    work = threading.Event()
    checkpoint = ReactorCheckpoint(work, idle_wait=0.01)
    work.set()  # cleared checkpoint: pynetdicom paused the reactor to use the queue itself
    assert checkpoint.wait(timeout=0.2) is False


def test_a_signal_wakes_the_socket_wait_and_a_closed_pipe_ignores_signals() -> None:
    wake = WakePipe()
    ours, peer = socket.socketpair()
    try:
        wake.signal()
        assert wait_readable(ours, wake, timeout=30) == (False, True)
        peer.send(b"\x04")
        assert wait_readable(ours, wake, timeout=30) == (True, False)
    finally:
        wake.close()
        ours.close()
        peer.close()
    wake.signal()  # the association thread may still queue a primitive after the close
