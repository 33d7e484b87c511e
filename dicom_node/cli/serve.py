"""``dicom-node serve [--role ...]``: run the node's roles until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import signal
import threading

from dicom_node.cli.exits import ExitStatus
from dicom_node.config.settings import ROLES, Settings


def run_serve_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Start the roles asked for (default: all), wait for a signal, stop them in order."""
    roles = tuple(dict.fromkeys(args.role or ROLES))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    from dicom_node.service import start_node  # imports torch: only serve needs it

    node = start_node(settings, roles)
    try:
        stop.wait()
    finally:
        node.stop()
    return ExitStatus.OK
