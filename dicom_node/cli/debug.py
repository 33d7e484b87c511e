"""``dicom-node debug send PATH...``: send a test study to the node, each file as it is.

The sending is :mod:`dicom_node.scu.debug_send`; ``debug preprocess`` is with the model
commands (:mod:`dicom_node.cli.models`), since it needs the model's preprocessing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dicom_node.cli.exits import ExitStatus
from dicom_node.config.settings import Settings
from dicom_node.errors import ConfigError
from dicom_node.scu.debug_send import collect_files, send_local_files


def run_debug_send(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Send files to the node and print each answer; FAILURE unless every file succeeded."""
    calling = args.calling or next((p.ae_title for p in settings.peers if p.dimse), None)
    if not calling:
        raise ConfigError(["debug send needs --calling AE, or a [[peers]] entry to send as"])
    files, outcomes = collect_files(Path(p) for p in args.paths)
    if files:
        outcomes += send_local_files(
            files,
            host=args.host,
            port=args.port or settings.node.port,
            called_ae_title=args.called or settings.node.ae_title,
            calling_ae_title=calling,
        )
    for outcome in outcomes:
        print(f"{'sent' if outcome.succeeded else 'NOT SENT'}  {outcome.path}: {outcome.detail}")
    sent = sum(outcome.succeeded for outcome in outcomes)
    print(f"{sent} of {len(outcomes)} files stored by the node")
    return ExitStatus.OK if outcomes and sent == len(outcomes) else ExitStatus.FAILURE
