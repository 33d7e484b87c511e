"""``dicom-node audit export`` (JSON lines, filters, exit codes) and the RFC 5424 syslog copy
over TCP (RFC 6587 octet counting), a Unix datagram socket, and an unreachable collector."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError

from dicom_node.audit.syslog import SyslogForwarder, SyslogTarget, attach, parse_target
from dicom_node.audit.trail import list_audit, record_audit
from dicom_node.cli.audit import run_audit_command
from dicom_node.cli.main import build_parser
from dicom_node.db.session import make_session_factory, session_scope
from tests.helpers import free_port, run_cli, write_config

T0 = datetime(2026, 11, 30, 8, 0, tzinfo=UTC)
RFC5424 = re.compile(
    r"<(?P<pri>\d{1,3})>1 (?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z) (?P<host>[!-~]{1,255}) "
    r"(?P<app>[!-~]{1,48}) (?P<procid>\d+) (?P<msgid>[!-~]{1,32}) - (?P<msg>\{.*\})",
    re.S,
)
KEYS = [
    "details",
    "event_type",
    "id",
    "outcome",
    "patient_id",
    "study_instance_uid",
    "time",
    "username",
]


def _seed(engine: Engine) -> None:
    """Three events an hour apart: a view (with a patient ID), a login failure, a transfer."""
    with session_scope(make_session_factory(engine)) as session:
        record_audit(
            session,
            event_type="study.viewed",
            now=T0,
            username="rad",
            study_instance_uid="1.2.3",
            patient_id="P-1",
            patient_name="CANARY^PHI",
            via="page",
        )
        record_audit(
            session,
            event_type="user.login",
            now=T0 + timedelta(hours=1),
            outcome="failure",
            username="mallory",
        )
        record_audit(
            session,
            event_type="instances.received",
            now=T0 + timedelta(hours=2),
            study_instance_uid="1.2.3",
            patient_id="P-1",
            instances=2,
        )


def _export(
    engine: Engine, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, list[dict[str, Any]], str]:
    code = run_audit_command(engine, build_parser().parse_args(["audit", "export", *argv]))
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


def test_export_writes_one_json_object_per_line_with_stable_keys_and_utc_times(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(engine)
    code, lines, err = _export(engine, capsys)
    assert code == 0 and err.strip() == "exported 3 audit event(s)"
    assert [line["event_type"] for line in lines] == [
        "study.viewed",
        "user.login",
        "instances.received",
    ]
    assert all(sorted(line) == KEYS for line in lines)
    assert lines[0]["time"] == "2026-11-30T08:00:00.000000Z"
    assert lines[0]["details"] == {"via": "page"} and lines[0]["patient_id"] == "P-1"
    assert lines[1]["outcome"] == "failure" and lines[1]["patient_id"] is None
    assert "CANARY" not in json.dumps(lines)


def test_export_filters_by_time_window_and_type_and_audits_itself(
    engine: Engine, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(engine)
    code, lines, _ = _export(
        engine, capsys, "--since", "2026-11-30T09:00:00Z", "--until", "2026-11-30T11:00:00+01:00"
    )  # 10:00 UTC
    assert code == 0 and [line["event_type"] for line in lines] == ["user.login"]
    code, lines, _ = _export(
        engine, capsys, "--since", "2026-11-30T08:30", "--type", "instances.received"
    )  # no offset: UTC
    assert code == 0 and [line["time"] for line in lines] == ["2026-11-30T10:00:00.000000Z"]
    code, lines, _ = _export(engine, capsys, "--until", "2026-11-30")
    assert code == 0 and lines == []
    with session_scope(make_session_factory(engine)) as session:
        exports = list_audit(session, event_type="audit.exported")
    assert len(exports) == 3 and exports[-1].username == "cli"
    assert exports[-1].details["since"] == "2026-11-30T09:00:00Z"
    assert exports[-1].details["events"] == 1


def test_export_to_a_file_is_owner_only_and_a_bad_argument_is_one_line_exit_2(
    engine: Engine, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _seed(engine)
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "audit.jsonl"
    code, lines, err = _export(engine, capsys, "--output", str(target))
    assert code == 0 and lines == [] and str(target) in err
    assert len(target.read_text().splitlines()) == 3
    assert stat.S_IMODE(target.stat().st_mode) == 0o600  # the trail holds patient IDs
    for argv, message in (
        (["--since", "yesterday"], "error: --since: not an ISO 8601 date or time"),
        (
            ["--since", "2026-12-02", "--until", "2026-12-01"],
            "error: --since must be earlier than --until",
        ),
        (["--type", "DROP TABLE"], "error: --type: not an event type"),
    ):
        code, lines, err = _export(engine, capsys, *argv)
        assert code == 2 and lines == [] and err.startswith(message) and err.count("\n") == 1
    code, _, err = _export(engine, capsys, "--output", str(tmp_path / "missing" / "a.jsonl"))
    assert code == 1 and err.startswith("error: cannot write") and err.count("\n") == 1
    assert os.listdir(tmp_path / "out") == ["audit.jsonl"]  # no temporary file left behind


@pytest.mark.slow
def test_the_dicom_node_command_exports_and_refuses_a_bad_time_without_a_traceback(
    tmp_path: Path,
) -> None:
    config = write_config(
        tmp_path / "n.toml",
        root=tmp_path / "s",
        db_url=f"sqlite:///{tmp_path / 'n.db'}",
        port=free_port(),
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    result = run_cli(config, "audit", "export", "--until", "not-a-time")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "error: --until: not an ISO 8601 date or time: 'not-a-time'" in result.stderr
    assert result.stdout == ""


class TcpCollector:
    """A syslog collector on 127.0.0.1 that keeps every byte each connection sent."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.data = bytearray()
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            with connection:
                while chunk := connection.recv(65536):
                    self.data += chunk

    def frames(self) -> list[bytes]:
        """Split the stream by RFC 6587 octet counting: ``LEN SP MSG`` repeated."""
        data, frames = bytes(self.data), []
        while data:
            length, _, rest = data.partition(b" ")
            assert length.isdigit(), data[:40]
            frames.append(rest[: int(length)])
            data = rest[int(length) :]
        return frames

    def stop(self) -> None:
        self.server.close()


def _write(factory: Any, event_type: str, **fields: Any) -> None:
    with session_scope(factory) as session:
        record_audit(session, event_type=event_type, now=T0, **fields)


def test_tcp_syslog_gets_octet_counted_rfc5424_frames_of_committed_rows_only(
    engine: Engine,
) -> None:
    collector = TcpCollector()
    factory = make_session_factory(engine)
    # With [audit] forward_patient_ids = true (the default leaves them out: test_audit_trail).
    forwarder = SyslogForwarder(
        SyslogTarget("tcp", "127.0.0.1", collector.port),
        "dicom-node",
        hostname="pacs node 1",
        patient_ids=True,
    )
    attach(factory, forwarder.start())
    _write(factory, "user.login", username="rad")
    with pytest.raises(RuntimeError):
        with session_scope(factory) as session:
            record_audit(session, event_type="rolled.back", now=T0)
            session.flush()
            raise RuntimeError("the caller's transaction fails")
    _write(factory, "security.alert", outcome="failure", reason="association_rejected")
    _write(
        factory,
        "instances.received",
        study_instance_uid="1.2.3",
        patient_id="P-1",
        patient_name="CANARY^PHI",
    )
    forwarder.close()
    time.sleep(0.2)  # the collector reads what the closed connection sent
    collector.stop()
    frames = collector.frames()
    matches = [RFC5424.fullmatch(frame.decode("ascii")) for frame in frames]
    assert all(matches), frames
    assert [m["msgid"] for m in matches] == ["user.login", "security.alert", "instances.received"]
    assert [int(m["pri"]) for m in matches] == [109, 108, 109]  # 13*8 + notice / warning
    assert {m["host"] for m in matches} == {"pacsnode1"} and {m["app"] for m in matches} == {
        "dicom-node"
    }
    assert json.loads(matches[2]["msg"])["patient_id"] == "P-1"
    assert b"CANARY" not in bytes(collector.data) and b"rolled.back" not in bytes(collector.data)
    assert (forwarder.sent, forwarder.failed, collector.connections) == (3, 0, 1)


def test_an_unreachable_collector_neither_blocks_the_caller_nor_loses_the_row(
    engine: Engine,
) -> None:
    factory = make_session_factory(engine)
    forwarder = SyslogForwarder(SyslogTarget("tcp", "127.0.0.1", free_port()), "dicom-node")
    attach(factory, forwarder.start())
    started = time.monotonic()
    for _ in range(5):
        _write(factory, "user.login", username="rad")
    elapsed = time.monotonic() - started
    forwarder.close()
    assert elapsed < 2.0  # five commits; the network is the forwarder thread's problem
    assert (forwarder.sent, forwarder.failed) == (0, 5)
    with session_scope(factory) as session:
        assert len(list_audit(session, event_type="user.login")) == 5


def test_a_unix_datagram_socket_gets_one_message_per_row(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "log"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(5)
    factory = make_session_factory(engine)
    forwarder = SyslogForwarder(parse_target(f"unix://{path}"), "dicom-node")
    attach(factory, forwarder.start())
    _write(factory, "application.started", roles=["scp"])
    try:
        match = RFC5424.fullmatch(receiver.recv(65535).decode("ascii"))
    finally:
        forwarder.close()
        receiver.close()
    assert match is not None and match["msgid"] == "application.started"
    assert json.loads(match["msg"])["details"] == {"roles": ["scp"]}


def test_parse_target_refuses_what_it_cannot_send_to() -> None:
    assert parse_target("udp://collector:514") == SyslogTarget("udp", "collector", 514)
    assert parse_target("unix:///dev/log") == SyslogTarget("unix", path="/dev/log")
    for bad in ("udp://collector", "http://collector:514", "tcp://:601"):
        with pytest.raises(ValueError, match="syslog target"):
            parse_target(bad)


def test_the_append_only_triggers_exist_in_the_schema(engine: Engine) -> None:
    with engine.connect() as connection:
        if engine.dialect.name == "sqlite":
            names = set(
                connection.execute(
                    text(
                        "SELECT name FROM sqlite_master WHERE type = 'trigger' "
                        "AND tbl_name = 'audit_events'"
                    )
                ).scalars()
            )
            assert names == {"audit_events_append_only_update", "audit_events_append_only_delete"}
        else:
            events = set(
                connection.execute(
                    text(
                        "SELECT event_manipulation FROM information_schema.triggers "
                        "WHERE event_object_table = 'audit_events'"
                    )
                ).scalars()
            )
            assert events == {"UPDATE", "DELETE"}


def test_the_readme_grant_pattern_lets_the_node_role_insert_and_select_but_not_change_rows(
    engine: Engine,
) -> None:
    if engine.dialect.name != "postgresql":
        pytest.skip("roles and grants are PostgreSQL's")
    role = f"node_{uuid.uuid4().hex[:10]}"
    with engine.begin() as connection:  # as the owner, the README's statements
        connection.execute(text(f"CREATE ROLE {role} NOLOGIN"))
        connection.execute(
            text(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}")
        )
        connection.execute(text(f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {role}"))
        connection.execute(text(f"REVOKE UPDATE, DELETE, TRUNCATE ON audit_events FROM {role}"))
    try:
        with engine.begin() as connection:
            connection.execute(text(f"SET LOCAL ROLE {role}"))
            connection.execute(
                text(
                    "INSERT INTO audit_events (created_at, event_type, outcome) "
                    "VALUES (now(), 'user.login', 'success')"
                )
            )
            assert connection.execute(text("SELECT count(*) FROM audit_events")).scalar() == 1
        for statement in (
            "UPDATE audit_events SET outcome = 'failure'",
            "DELETE FROM audit_events",
            "TRUNCATE audit_events",
        ):
            with pytest.raises(DBAPIError, match="permission denied"):
                with engine.begin() as connection:
                    connection.execute(text(f"SET LOCAL ROLE {role}"))
                    connection.execute(text(statement))
    finally:
        with engine.begin() as connection:
            connection.execute(text(f"DROP OWNED BY {role}"))
            connection.execute(text(f"DROP ROLE {role}"))
