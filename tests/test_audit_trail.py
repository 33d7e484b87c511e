"""The audit trail of a running node: a full pipeline run leaves the ATNA-style events in
order (start, instances in, instances out, log-in, study viewed, security alert, stop), in
the table and as RFC 5424 syslog datagrams, and the patient's name appears in neither.

These tests run the node in-process on SQLite (the append-only triggers are checked on both
databases in test_audit.py).
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
import socket
import threading
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import Engine, select, text

from dicom_node.audit.trail import list_audit
from dicom_node.clock import utcnow
from dicom_node.config.operations import AuditSettings
from dicom_node.config.settings import PeerSettings, SchedulerSettings, WebSettings
from dicom_node.db.models import Job
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.web.users import add_user
from tests.conftest import wait_until
from tests.helpers import SCU_AE, associate, echo, send_datasets, send_raw, split_file
from tests.peers import PACS_AE, ScriptedPacs
from tests.web_support import PASSWORD, csrf_from, login

CANARY_NAME = "CANARY^PHI^Zzyzx"
PATIENT_ID = "PID-AUDIT-0001"
RFC5424 = re.compile(r"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-|\[.*?\]) (.*)", re.S)
ATNA = (
    "application.started",
    "instances.received",
    "instances.sent",
    "user.login",
    "study.viewed",
    "security.alert",
    "application.stopped",
)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only here: a full pipeline run per database would double a slow test."""
    return f"sqlite:///{tmp_path / 'node.db'}"


class UdpCollector:
    """A syslog collector on 127.0.0.1: keeps every datagram it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.datagrams: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.datagrams.append(self.sock.recv(65535))
            except TimeoutError:
                continue

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def _deliveries_settled(node: Any, peers: int) -> bool:
    with session_scope(node.session_factory) as session:
        states = list(session.scalars(select(Job.state).where(Job.kind == "delivery")))
    return len(states) == peers and all(state in ("done", "dead") for state in states)


def _dump(engine_or_node: Any) -> str:
    engine: Engine = engine_or_node.engine
    with engine.connect() as connection:
        return "\n".join(
            str(tuple(row))
            for row in connection.execute(text("SELECT * FROM audit_events ORDER BY id"))
        )


def _collapse(types: list[str]) -> list[str]:
    """The event types with runs of the same type folded into one."""
    return [t for i, t in enumerate(types) if i == 0 or types[i - 1] != t]


def _web_session(node: Any, study_instance_uid: str) -> None:
    """A failed and a successful log-in through the form, then the study's page."""
    with session_scope(node.session_factory) as session:
        add_user(session, username="rad", password=PASSWORD, role="radiologist", now=utcnow())
    with httpx.Client(base_url=node.web_url, timeout=30) as client:
        token = csrf_from(client.get("/login").text)
        refused = client.post(
            "/login",
            data={"username": "rad", "password": "wrong", "csrf_token": token, "next": "/worklist"},
        )
        assert refused.status_code in (400, 401, 403, 200)
    client = login(node.web_url)
    try:
        assert client.get(f"/studies/{study_instance_uid}").status_code == 200
    finally:
        client.close()


def _received_syslog(collector: UdpCollector) -> list[tuple[int, str, dict[str, Any]]]:
    """(PRI, MSGID, parsed MSG) of every datagram; each must be RFC 5424 with a JSON MSG."""
    parsed = []
    for datagram in collector.datagrams:
        match = RFC5424.fullmatch(datagram.decode("ascii"))
        assert match is not None, datagram
        assert match.group(4) == "dicom-node-test"
        parsed.append((int(match.group(1)), match.group(6), json.loads(match.group(8))))
    return parsed


@pytest.mark.slow
def test_a_full_pipeline_run_audits_each_step_in_order_and_never_the_patient_name(
    node_factory: Any,
) -> None:
    collector, pacs, refusing = UdpCollector(), ScriptedPacs(), ScriptedPacs([0xC000])
    peers = (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        PeerSettings(
            name="pacs", ae_title=PACS_AE, host="127.0.0.1", port=pacs.port, send_results=True
        ),
        PeerSettings(
            name="refusing-pacs",
            ae_title=PACS_AE,
            host="127.0.0.1",
            port=refusing.port,
            send_results=True,
        ),
    )
    try:
        node = node_factory(
            roles=("scp", "worker", "web"),
            peers=peers,
            audit=AuditSettings(
                syslog=f"udp://127.0.0.1:{collector.port}", syslog_app_name="dicom-node-test"
            ),
            web=WebSettings(host="127.0.0.1", port=0),
            scheduler=SchedulerSettings(study_quiet_seconds=0.5, tick_seconds=0.2),
        )
        source = make_cxr_dataset(
            rows=256, columns=224, patient_name=CANARY_NAME, patient_id=PATIENT_ID
        )
        study = str(source.StudyInstanceUID)
        assert send_datasets(node.scp_port, [source]) == [0]
        assert wait_until(lambda: _deliveries_settled(node, 2), timeout=120, interval=0.2)
        _web_session(node, study)
        assert echo(node.scp_port, calling="INTRUDER") is None  # rejected: not a peer
        node.stop()
        assert wait_until(lambda: len(collector.datagrams) >= 8, timeout=5)
    finally:
        collector.stop()
        pacs.stop()
        refusing.stop()

    with session_scope(node.session_factory) as session:
        events = list(reversed(list_audit(session, limit=1000)))
    ours = [e for e in events if e.event_type in ATNA]
    assert _collapse([e.event_type for e in ours]) == list(ATNA)
    by_type: dict[str, list[Any]] = {}
    for event in ours:
        by_type.setdefault(event.event_type, []).append(event)

    started, stopped = by_type["application.started"][0], by_type["application.stopped"][0]
    assert started.details["roles"] == ["scp", "worker", "web"]
    assert started.details["host_name"] == socket.gethostname() and started.details["version"]
    assert started.patient_id is None and stopped.patient_id is None
    (received,) = by_type["instances.received"]
    assert (received.outcome, received.study_instance_uid, received.patient_id) == (
        "success",
        study,
        PATIENT_ID,
    )
    assert received.details["instances"] == 1 and received.details["failed_instances"] == 0
    assert received.details["calling_ae_title"] == SCU_AE
    assert received.details["peer_address"] == "127.0.0.1"
    assert received.details["association"] == "released"
    sent = {e.details["peer"]: e for e in by_type["instances.sent"]}
    assert set(sent) == {"pacs", "refusing-pacs"}
    assert (
        sent["pacs"].outcome,
        sent["pacs"].details["instances"],
        sent["pacs"].details["delivered"],
    ) == ("success", 2, 2)  # the SR and the SC
    assert (sent["refusing-pacs"].outcome, sent["refusing-pacs"].details["rejected"]) == (
        "failure",
        2,
    )
    assert all(e.patient_id == PATIENT_ID and e.study_instance_uid == study for e in sent.values())
    assert [e.outcome for e in by_type["user.login"]] == ["failure", "success"]
    assert by_type["study.viewed"][0].username == "rad"
    (alert,) = by_type["security.alert"]
    assert alert.details["reason"] == "association_rejected"
    assert alert.details["calling_ae_title"] == "INTRUDER" and alert.patient_id is None

    dump = _dump(node)
    assert "CANARY" not in dump and "Zzyzx" not in dump
    syslog = _received_syslog(collector)
    assert not any(b"CANARY" in d or b"Zzyzx" in d for d in collector.datagrams)
    assert [msg["id"] for _, _, msg in syslog] == [e.id for e in events]  # every row, once
    for (pri, msgid, msg), event in zip(syslog, events, strict=True):
        assert msgid == event.event_type == msg["event_type"]
        warning = event.outcome == "failure" or event.event_type == "security.alert"
        assert pri == 13 * 8 + (4 if warning else 5)  # facility log audit; warning/notice
        assert msg["patient_id"] is None  # [audit] forward_patient_ids is off by default
    assert any(event.patient_id for event in events)  # the table holds them


def _raw_with_other_instance_uid(tmp_path: Path, ds: pydicom.Dataset) -> Any:
    """The data set on the wire under a C-STORE whose Affected SOP Instance UID differs."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = tmp_path / "mismatch.dcm"
    path.write_bytes(buffer.getvalue())
    raw = split_file(path, str(ds.SOPClassUID))
    return dataclasses.replace(raw, sop_instance_uid=pydicom.uid.generate_uid())


def test_an_aborted_association_with_a_refused_instance_is_audited_as_a_failure(
    node_factory: Any, tmp_path: Path
) -> None:
    node = node_factory()
    good = make_cxr_dataset(
        rows=64, columns=64, patient_name=CANARY_NAME, patient_id=PATIENT_ID, seed=1
    )
    bad = make_cxr_dataset(
        rows=64,
        columns=64,
        patient_name=CANARY_NAME,
        patient_id=PATIENT_ID,
        study_instance_uid=str(good.StudyInstanceUID),
        seed=2,
    )
    assoc = associate(
        node.scp_port,
        [str(good.SOPClassUID)],
        transfer_syntaxes=[str(good.file_meta.TransferSyntaxUID)],
    )
    assert assoc.is_established
    assert int(assoc.send_c_store(good).Status) == 0
    assert send_raw(assoc, _raw_with_other_instance_uid(tmp_path, bad), message_id=2) == 0xA900
    assoc.abort()

    def received() -> list[Any]:
        with session_scope(node.session_factory) as session:
            return list_audit(session, event_type="instances.received")

    assert wait_until(lambda: len(received()) == 1, timeout=10)
    (event,) = received()
    assert (event.outcome, event.patient_id, event.study_instance_uid) == (
        "failure",
        PATIENT_ID,
        str(good.StudyInstanceUID),
    )
    assert (
        event.details["instances"],
        event.details["failed_instances"],
        event.details["association"],
    ) == (1, 1, "aborted")
    assert "CANARY" not in _dump(node)


def test_an_association_that_only_echoes_writes_no_transfer_row(node_factory: Any) -> None:
    node = node_factory()
    assert echo(node.scp_port) == 0
    node.stop()
    with session_scope(node.session_factory) as session:
        types = [e.event_type for e in reversed(list_audit(session))]
    assert types == ["application.started", "application.stopped"]


def test_when_the_audit_table_refuses_writes_c_store_still_succeeds_and_the_miss_is_counted(
    node_factory: Any,
) -> None:
    node = node_factory()
    with node.engine.begin() as connection:  # the database refuses audit rows from now on
        connection.execute(
            text(
                "CREATE TRIGGER refuse_audit BEFORE INSERT ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'audit table unavailable'); END"
            )
        )
    source = make_cxr_dataset(
        rows=64, columns=64, patient_name=CANARY_NAME, patient_id=PATIENT_ID, seed=3
    )
    assert send_datasets(node.scp_port, [source]) == [0]
    assert wait_until(lambda: node.scp_context.transfers.not_recorded == 1, timeout=10)
    with session_scope(node.session_factory) as session:
        assert [e.event_type for e in list_audit(session)] == ["application.started"]


def _analysed_study(node: Any, seed: int) -> str:
    """A one-image study, received, closed and analysed: its delivery job is queued."""
    from dicom_node.inference.models import load_bundle
    from dicom_node.jobs.worker import Worker
    from dicom_node.studies import close_quiet_studies

    source = make_cxr_dataset(
        rows=128, columns=128, patient_name=CANARY_NAME, patient_id=PATIENT_ID, seed=seed
    )
    assert send_datasets(node.scp_port, [source]) == [0]
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    Worker(node.settings, node.session_factory, load_bundle(node.settings)).run_once()
    return str(source.StudyInstanceUID)


def test_instances_sent_is_one_row_per_association_and_a_refused_association_is_a_failure(
    node_factory: Any,
) -> None:
    from dicom_node.config.settings import DeliverySettings
    from dicom_node.jobs.delivery import DeliveryWorker

    pacs = ScriptedPacs()
    try:
        node = node_factory(
            peers=(
                PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
                PeerSettings(
                    name="pacs",
                    ae_title=PACS_AE,
                    host="127.0.0.1",
                    port=pacs.port,
                    send_results=True,
                ),
            ),
            delivery=DeliverySettings(batch_size=1),
        )
        delivery = DeliveryWorker(node.settings, node.session_factory)
        first = _analysed_study(node, 1)
        assert delivery.run_once() == 1
        pacs.reject = (1, 1, 7)  # rejected-permanent: called AE title not recognised
        second = _analysed_study(node, 2)
        assert delivery.run_once() == 1
    finally:
        pacs.stop()
    with session_scope(node.session_factory) as session:
        sent = list(reversed(list_audit(session, event_type="instances.sent")))
    assert [
        (e.study_instance_uid, e.outcome, e.details["instances"], e.details["delivered"])
        for e in sent
    ] == [(first, "success", 1, 1), (first, "success", 1, 1), (second, "failure", 1, 0)]
    assert "rejected permanently" in sent[2].details["error"]
    assert {e.patient_id for e in sent} == {PATIENT_ID}
    assert {e.details["peer_ae_title"] for e in sent} == {PACS_AE}
    assert "CANARY" not in _dump(node)
