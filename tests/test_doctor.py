"""``dicom-node doctor``: a healthy node passes; each broken part fails its own row with the fix.

Everything is real: a SQLite database migrated by the real migrations, a test checkpoint
installed through the registry, a pynetdicom echo SCP as the peer, certificates made by the
openssl command, sockets bound on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.cli.main import main
from dicom_node.db.migrate import downgrade, upgrade
from dicom_node.db.session import make_engine
from dicom_node.inference.registry import read_registry
from dicom_node.logs import configure_logging
from tests.conftest import MODEL_NAME
from tests.helpers import SCU_AE, NodeProcess, free_port, run_cli


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """The doctor configures logging for its process; give later tests the session's back."""
    yield
    configure_logging("INFO", "json")


@pytest.fixture
def echo_peer_port() -> Iterator[int]:
    """A live Verification SCP (the PACS) on a port the OS picks."""
    ae = AE(ae_title="PACS")
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    yield int(server.server_address[1])
    server.shutdown()


class Site:
    """A node's config file and folders under tmp_path; ``write`` renders the TOML."""

    def __init__(self, tmp_path: Path, peer_port: int, models_dir: Path) -> None:
        self.root = tmp_path / "store"
        self.root.mkdir()
        self.path = tmp_path / "dicom-node.toml"
        self.sections: dict[str, dict[str, Any]] = {
            "node": {"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": free_port()},
            "storage": {"root": str(self.root), "min_free_mb": 10},
            "web": {"host": "127.0.0.1", "port": free_port()},
            "metrics": {"host": "127.0.0.1", "port": free_port()},
        }
        self.peers: list[dict[str, Any]] = [
            {
                "name": "pacs",
                "ae_title": "PACS",
                "host": "127.0.0.1",
                "port": peer_port,
                "send_results": True,
            }
        ]
        engine = make_engine(f"sqlite:///{self.root / 'dicom-node.db'}")
        upgrade(engine)
        engine.dispose()
        # conftest's models_dir holds the test checkpoint installed through the registry.
        shutil.copytree(models_dir, self.root / "models")
        self.write()

    def write(self) -> Path:
        lines = []
        for section, values in self.sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        for peer in self.peers:
            lines.append("[[peers]]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in peer.items()]
        self.path.write_text("\n".join(lines) + "\n")
        return self.path


@pytest.fixture
def site(tmp_path: Path, echo_peer_port: int, models_dir: Path) -> Site:
    return Site(tmp_path, echo_peer_port, models_dir)


def doctor_report(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> tuple[int, list[dict[str, str]]]:
    """Run ``dicom-node --config ... doctor --json``; (exit code, rows in order)."""
    site.write()
    capsys.readouterr()
    code = main(["--config", str(site.path), "doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is (code == 0)
    return code, report["checks"]


def doctor(site: Site, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, dict[str, str]]]:
    """(exit code, rows by check name) of ``doctor --json``."""
    code, rows = doctor_report(site, capsys)
    return code, {row["name"]: row for row in rows}


def failed(rows: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    return {name: row for name, row in rows.items() if row["status"] == "fail"}


def test_healthy_node_passes_every_check_and_exits_0(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    code, rows = doctor(site, capsys)
    assert code == 0
    assert {row["status"] for row in rows.values()} == {"ok"}, rows
    node_port, web_port = site.sections["node"]["port"], site.sections["web"]["port"]
    assert {
        "config",
        "storage root",
        "free space",
        "database",
        "model weights",
        "peer pacs",
        "tls",
        f"DICOM port {node_port}",
        f"web port {web_port}",
    } <= set(rows)
    assert "success" in rows["peer pacs"]["detail"]
    assert "at schema head" in rows["database"]["detail"]
    assert list(site.root.glob(".doctor-*")) == []  # the write probe cleaned up after itself


def test_the_table_is_aligned_and_names_the_fix_of_each_failure(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.peers[0]["port"] = free_port()
    site.write()
    code = main(["--config", str(site.path), "doctor"])
    out = capsys.readouterr().out
    assert code == 1
    header, *lines = out.splitlines()
    assert header.split() == ["CHECK", "STATUS", "DETAIL"]
    status_column = header.index("STATUS")
    peer_line = next(line for line in lines if line.startswith("peer pacs"))
    assert peer_line[status_column:].startswith("FAIL")
    assert any(line.strip().startswith("fix: check that the peer runs") for line in lines)
    assert lines[-1] == "1 failed, 0 warning(s), 11 ok"  # 9, and orphan files, audit spool


def test_database_without_schema_fails_with_db_upgrade_as_the_fix(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = make_engine(f"sqlite:///{site.root / 'dicom-node.db'}")
    downgrade(engine, "base")
    engine.dispose()
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"database"}
    assert "none (empty)" in rows["database"]["detail"]
    assert rows["database"]["fix"] == "dicom-node db upgrade"


def test_database_one_revision_behind_fails_naming_the_head(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = make_engine(f"sqlite:///{site.root / 'dicom-node.db'}")
    downgrade(engine, "-1")
    engine.dispose()
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"database"}
    assert "this release needs" in rows["database"]["detail"]
    assert rows["database"]["fix"] == "dicom-node db upgrade"


def test_missing_sqlite_file_fails_and_is_not_created_by_the_doctor(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("dicom-node.db", "dicom-node.db-wal", "dicom-node.db-shm"):
        (site.root / name).unlink(missing_ok=True)
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"database"}
    assert "does not exist" in rows["database"]["detail"]
    assert "dicom-node db upgrade" in rows["database"]["fix"]
    assert not (site.root / "dicom-node.db").exists()


def test_missing_weights_fail_with_the_pull_and_import_commands(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(site.root / "models")
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"model weights"}
    assert f"no weights installed for {MODEL_NAME}" in rows["model weights"]["detail"]
    assert f"dicom-node models pull {MODEL_NAME}" in rows["model weights"]["fix"]
    assert f"models import FILE --name {MODEL_NAME}" in rows["model weights"]["fix"]


def test_weights_with_one_byte_changed_fail_the_checksum(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    record = read_registry(site.root / "models")[MODEL_NAME]
    weights = site.root / "models" / record.file
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"model weights"}
    assert "does not match its recorded SHA-256" in rows["model weights"]["detail"]
    assert f"dicom-node models import FILE --name {MODEL_NAME}" in rows["model weights"]["fix"]
    assert record.sha256[:16] in rows["model weights"]["fix"]


def test_missing_storage_root_fails_with_the_command_that_creates_it(
    site: Site, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    site.sections["storage"]["root"] = str(tmp_path / "nowhere")
    code, rows = doctor(site, capsys)
    assert code == 1
    assert "does not exist" in rows["storage root"]["detail"]
    assert (
        f"install -d -m 750 -o dicom-node -g dicom-node {tmp_path / 'nowhere'}"
        in rows["storage root"]["fix"]
    )
    assert not (tmp_path / "nowhere").exists()


@pytest.fixture
def unwritable(site: Site) -> Iterator[Path]:
    """The storage root made unwritable: immutable for root (chattr +i), else mode 0555."""
    as_root = os.geteuid() == 0
    if as_root:
        subprocess.run(["chattr", "+i", str(site.root)], check=True, capture_output=True)
    else:
        site.root.chmod(0o555)
    try:
        yield site.root
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(site.root)], check=True, capture_output=True)
        site.root.chmod(0o755)


def test_unwritable_storage_root_fails_naming_the_user(
    site: Site, unwritable: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, rows = doctor(site, capsys)
    assert code == 1 and "storage root" in failed(rows)
    assert f"cannot write in {unwritable} as " in rows["storage root"]["detail"]
    assert f"chown -R dicom-node:dicom-node {unwritable}" in rows["storage root"]["fix"]


def test_free_space_below_the_minimum_fails(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.sections["storage"]["min_free_mb"] = shutil.disk_usage(site.root).free // 2**20 + 10**6
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"free space"}
    assert "0xA700" in rows["free space"]["detail"]


def test_results_peer_that_is_down_fails_and_a_sender_only_peer_only_warns(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = free_port()
    site.peers.append(
        {"name": "modality", "ae_title": "MODALITY", "host": "127.0.0.1", "port": free_port()}
    )
    site.peers[0]["port"] = closed
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"peer pacs"}
    assert "no association" in rows["peer pacs"]["detail"]
    assert f"listens on 127.0.0.1:{closed}" in rows["peer pacs"]["fix"]
    assert rows["peer modality"]["status"] == "warn"

    site.peers.pop()
    site.peers[0]["send_results"] = False  # still down, but nothing is sent to it
    code, rows = doctor(site, capsys)
    assert code == 0 and rows["peer pacs"]["status"] == "warn"


def test_port_held_by_another_program_fails_naming_its_pid(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    web_port = site.sections["web"]["port"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", web_port))
        holder.listen()
        code, rows = doctor(site, capsys)
    row = rows[f"web port {web_port}"]
    assert code == 1 and set(failed(rows)) == {f"web port {web_port}"}
    assert f"in use by pid {os.getpid()}" in row["detail"]
    assert "[web] port" in row["fix"]


@pytest.mark.slow
def test_port_held_by_the_running_node_is_ours(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    site.peers.append({"name": "test-scu", "ae_title": SCU_AE, "host": "127.0.0.1"})
    site.write()
    node = NodeProcess(site.path, tmp_path / "node.log")
    node.start(site.sections["node"]["port"], 120, "scp")
    try:
        code, rows = doctor(site, capsys)
    finally:
        assert node.stop() == 0
    row = rows[f"DICOM port {site.sections['node']['port']}"]
    assert (
        row["status"] == "ok" and f"in use by dicom-node (pid {node.process.pid})" in row["detail"]
    )  # type: ignore[union-attr]
    assert code == 0  # the sender-only test-scu peer (no SCP) is a warning only


def _free_privileged_port() -> int:
    for port in range(1023, 999, -1):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except PermissionError:
                return port  # not root: any port below 1024 shows the same
            except OSError:
                continue
            return port
    pytest.fail("no free port between 1000 and 1023")


def test_port_below_1024_warns_about_the_capability(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.sections["node"]["port"] = port = _free_privileged_port()
    code, rows = doctor(site, capsys)
    row = rows[f"DICOM port {port}"]
    assert code == 0 and row["status"] == "warn"
    assert "CAP_NET_BIND_SERVICE" in row["detail"] and "unit" in row["fix"]


def test_same_port_twice_fails(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.sections["web"]["port"] = site.sections["node"]["port"]
    code, rows = doctor(site, capsys)
    assert code == 1
    row = rows[f"web port {site.sections['node']['port']}"]
    assert row["status"] == "fail" and "same port as [node] port" in row["detail"]


# --- TLS ---------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("ca")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(folder / "ca.key"),
        "-out",
        str(folder / "ca.crt"),
        "-days",
        "3650",
        "-subj",
        "/CN=dicom-node test CA",
    )
    return folder / "ca.crt", folder / "ca.key"


def node_certificate(folder: Path, ca: tuple[Path, Path], days: int) -> tuple[Path, Path]:
    """A key (mode 0640) and a certificate signed by ``ca`` valid for ``days`` (negative:
    expired)."""
    folder.mkdir(exist_ok=True)
    key, csr, cert = folder / "node.key", folder / "node.csr", folder / "node.crt"
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=dicom-node",
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        str(days),
    )
    key.chmod(0o640)
    return cert, key


def use_tls(site: Site, cert: Path, key: Path, ca_cert: Path) -> None:
    site.sections["tls"] = {
        "port": free_port(),
        "certificate": str(cert),
        "private_key": str(key),
        "ca_certificates": str(ca_cert),
    }


def test_valid_tls_files_pass(
    site: Site, ca: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = node_certificate(tmp_path / "tls", ca, 365)
    use_tls(site, cert, key, ca[0])
    code, rows = doctor(site, capsys)
    assert code == 0, failed(rows)
    for name in ("tls certificate", "tls private key", "tls CA certificates", "tls contexts"):
        assert rows[name]["status"] == "ok", rows[name]
    assert "valid until" in rows["tls certificate"]["detail"]
    assert rows[f"DICOM TLS port {site.sections['tls']['port']}"]["status"] == "ok"


def test_missing_tls_certificate_fails(
    site: Site, ca: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = node_certificate(tmp_path / "tls", ca, 365)
    cert.unlink()
    use_tls(site, cert, key, ca[0])
    code, rows = doctor(site, capsys)
    assert code == 1 and "tls certificate" in failed(rows)
    assert rows["tls certificate"]["detail"] == f"{cert} does not exist"


def test_expired_tls_certificate_fails_and_one_expiring_soon_warns(
    site: Site, ca: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = node_certificate(tmp_path / "expired", ca, -1)
    use_tls(site, cert, key, ca[0])
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"tls certificate"}
    assert "expired on" in rows["tls certificate"]["detail"]
    assert "renew the certificate" in rows["tls certificate"]["fix"]

    cert, key = node_certificate(tmp_path / "soon", ca, 10)
    use_tls(site, cert, key, ca[0])
    code, rows = doctor(site, capsys)
    assert code == 0 and rows["tls certificate"]["status"] == "warn"
    assert "(in 9 days)" in rows["tls certificate"]["detail"]


def test_world_readable_or_foreign_private_key_fails(
    site: Site, ca: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = node_certificate(tmp_path / "tls", ca, 365)
    key.chmod(0o644)
    use_tls(site, cert, key, ca[0])
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"tls private key"}
    assert "readable by every user (mode 0644)" in rows["tls private key"]["detail"]
    assert rows["tls private key"]["fix"].startswith(f"chmod 640 {key}")

    _, other_key = node_certificate(tmp_path / "other", ca, 365)
    use_tls(site, cert, other_key, ca[0])
    code, rows = doctor(site, capsys)
    assert code == 1 and set(failed(rows)) == {"tls private key"}
    assert "does not belong to the certificate" in rows["tls private key"]["detail"]


def test_tls_peer_alone_turns_the_tls_checks_on(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.peers[0]["tls"] = True
    code, rows = doctor(site, capsys)
    assert "tls" not in rows and rows["tls CA certificates"]["status"] == "warn"
    assert rows["tls certificate"]["status"] == "fail"  # the TLS peer is sent our certificate
    assert code == 1


# --- the configuration --------------------------------------------------------------------


def test_bad_config_value_fails_the_config_row_and_skips_the_rest(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.sections["node"]["port"] = 70000
    site.sections["storage"]["min_free_mb"] = -1
    code, rows = doctor_report(site, capsys)
    assert code == 1
    problems = [row["detail"] for row in rows if row["name"] == "config"]
    assert all(row["status"] == "fail" for row in rows if row["name"] == "config")
    assert any(p.startswith("node.port = 70000") for p in problems)
    assert any(p.startswith("storage.min_free_mb = -1") for p in problems)
    assert [row["name"] for row in rows][-1] == "other checks"
    assert rows[-1]["status"] == "warn" and "database" not in {row["name"] for row in rows}


def test_cli_reports_a_broken_config_as_a_table_and_exit_1_without_a_traceback(site: Site) -> None:
    site.sections["scp"] = {"other_sop_classes": "maybe"}
    run = run_cli(site.write(), "doctor")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    config_line = next(line for line in run.stdout.splitlines() if line.startswith("config"))
    assert config_line.split()[1] == "FAIL" and "scp.other_sop_classes = 'maybe'" in config_line
    assert "fix: edit" in run.stdout


def test_missing_config_file_fails_with_where_to_put_one(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.path = site.path.with_name("absent.toml")
    capsys.readouterr()
    code = main(["--config", str(site.path), "doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and report["ok"] is False
    assert report["checks"][0]["detail"] == f"config file {site.path} not found"
    assert "--config PATH" in report["checks"][0]["fix"]


def test_quarantined_files_and_spooled_audit_rows_warn_with_what_to_do(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import datetime

    from dicom_node.audit.spool import AuditSpool, append_event
    from dicom_node.audit.trail import audit_values
    from dicom_node.ops.reconcile import quarantine

    code, rows = doctor(site, capsys)
    assert rows["orphan files"]["status"] == rows["audit spool"]["status"] == "ok"
    junk = site.root / "instances" / "1.2.3" / "4.5.6" / "7.8.9.dcm"
    junk.parent.mkdir(parents=True)
    junk.write_bytes(b"not dicom")
    quarantine(site.root, "instances/1.2.3/4.5.6/7.8.9.dcm", "not a DICOM file (test)")
    spool = AuditSpool.under(site.root)
    for i in range(2):
        append_event(
            spool,
            audit_values(event_type="user.login", now=datetime.now(UTC), event_uuid=f"{i:032x}"),
        )
    code, rows = doctor(site, capsys)
    assert code == 0  # warnings only: the node works
    assert rows["orphan files"]["status"] == "warn"
    assert "1 file(s) in" in rows["orphan files"]["detail"]
    assert "not a DICOM file (test)" in rows["orphan files"]["detail"]
    assert ".reason.json" in rows["orphan files"]["fix"]
    assert rows["audit spool"]["status"] == "warn"
    assert "2 audit row(s)" in rows["audit spool"]["detail"]
    (spool.directory / next(spool.directory.iterdir()).name).chmod(0o644)
    code, rows = doctor(site, capsys)
    assert "readable by others" in rows["audit spool"]["detail"]
