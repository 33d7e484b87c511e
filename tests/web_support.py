"""Seed a real node for the web tests: C-STORE sample studies, let the worker analyse and
deliver them, serve the web role on a free loopback port, and create users and tokens."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.settings import PeerSettings, WebSettings
from dicom_node.db.models import Job
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.service import Node
from dicom_node.web.users import add_user, create_token
from tests.conftest import wait_until
from tests.helpers import SCU_AE, send_datasets
from tests.peers import PACS_AE, ScriptedPacs

PASSWORD = "correct horse battery"
SCRIPT_NAME = "<script>alert(1)</script>"
ECHO_AE = "ECHO_PACS"


@dataclass
class Seeded:
    """A running node with three analysed studies, users and tokens."""

    node: Node
    url: str
    uids: dict[str, str]  # critical_old, script, lateral -> StudyInstanceUID
    read_token: str
    write_token: str
    pacs: ScriptedPacs
    echo_server: Any

    def stop(self) -> None:
        self.pacs.stop()
        self.echo_server.shutdown()


def _studies(canary: bool) -> tuple[list[Any], dict[str, str]]:
    older = make_cxr_dataset(
        rows=256,
        columns=224,
        patient_name="CRIT^OLDER",
        patient_id="P-0001",
        accession_number="ACC0001",
        seed=1,
    )
    script = make_cxr_dataset(
        rows=256,
        columns=224,
        patient_name=SCRIPT_NAME,
        patient_id="P-0002",
        accession_number="ACC0002",
        seed=2,
    )
    lateral = make_cxr_dataset(
        rows=256,
        columns=224,
        view_position="LL",
        patient_name="LATERAL^ONLY",
        patient_id="P-0003",
        accession_number="ACC0003",
        seed=3,
    )
    if canary:
        older.PatientName, older.PatientID = "CANARY^PHI", "PHI-CANARY-123"
    datasets = [older, script, lateral]
    uids = {
        "critical_old": str(older.StudyInstanceUID),
        "script": str(script.StudyInstanceUID),
        "lateral": str(lateral.StudyInstanceUID),
    }
    return datasets, uids


def seed(node_factory: Any, *, canary: bool = False, **sections: Any) -> Seeded:
    """Start scp+worker+web, send the studies one by one (so their times differ), wait."""
    pacs = ScriptedPacs()
    echo_ae = AE(ae_title=ECHO_AE)
    echo_ae.add_supported_context(Verification)
    echo_server = echo_ae.start_server(("127.0.0.1", 0), block=False)
    peers = (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        PeerSettings(
            name="pacs", ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, send_results=True
        ),
        PeerSettings(
            name="echo-pacs",
            ae_title=ECHO_AE,
            host="127.0.0.1",
            port=int(echo_server.server_address[1]),
        ),
    )
    # Pneumothorax at 0.01: every analysed study is positive for it, so "critical".
    node = node_factory(
        roles=("scp", "worker", "web"),
        peers=peers,
        thresholds=(("Pneumothorax", 0.01),),
        web=WebSettings(host="127.0.0.1", port=0, refresh_seconds=0),
        **sections,
    )
    datasets, uids = _studies(canary)
    for ds in datasets:
        assert send_datasets(node.scp_port, [ds]) == [0]
        time.sleep(0.05)
    assert wait_until(lambda: _settled(node), timeout=120), "jobs did not finish"
    with session_scope(node.session_factory) as session:
        add_user(session, username="rad", password=PASSWORD, role="radiologist", now=utcnow())
        add_user(session, username="boss", password=PASSWORD, role="admin", now=utcnow())
        read = create_token(session, name="ris", scope="read", now=utcnow())
        write = create_token(session, name="ris-writer", scope="write", now=utcnow())
    return Seeded(node, node.web_url, uids, read, write, pacs, echo_server)


def _settled(node: Node) -> bool:
    with session_scope(node.session_factory) as session:
        jobs = session.scalars(select(Job)).all()
    analyses = [j for j in jobs if j.kind == "analysis"]
    deliveries = [j for j in jobs if j.kind == "delivery"]
    shadow_only = bool(analyses) and all(j.mode == "shadow" for j in analyses)
    return (
        len(analyses) == 3
        and len(deliveries) == (0 if shadow_only else 3)  # a shadow model sends nothing
        and all(j.state in ("done", "skipped") for j in jobs)
    )


def login(url: str, username: str = "rad", password: str = PASSWORD) -> httpx.Client:
    """An httpx client with a logged-in session (through the real log-in form)."""
    client = httpx.Client(base_url=url, follow_redirects=False, timeout=30)
    page = client.get("/login")
    token = csrf_from(page.text)
    response = client.post(
        "/login",
        data={"username": username, "password": password, "csrf_token": token, "next": "/worklist"},
    )
    assert response.status_code == 303, response.text
    return client


def csrf_from(html: str) -> str:
    marker = 'name="csrf_token" value="'
    start = html.index(marker) + len(marker)
    return html[start : html.index('"', start)]
