"""DICOM TLS on real loopback associations: pynetdicom, raw Python ssl clients and DCMTK.

Certificates are made by the openssl CLI for each test module: a CA that signs the node's
server certificate (named localhost and 127.0.0.1), a client certificate and a PACS server
certificate, a second CA nobody trusts with its own client certificate, and a PACS certificate
that names another host.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification
from sqlalchemy import select

from dicom_node.cli.main import main
from dicom_node.clock import utcnow
from dicom_node.config.operations import TlsSettings
from dicom_node.config.settings import NodeSettings, PeerSettings, ScpSettings, Settings
from dicom_node.db.models import AuditEvent, Delivery, Instance, Job
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.errors import TlsConfigError, TransientDeliveryError
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.jobs.worker import Worker
from dicom_node.ops.actions import echo_peer
from dicom_node.scp.tls import server_context
from dicom_node.scu.send import OutgoingFile, send_files
from dicom_node.scu.tls import client_context
from dicom_node.studies import close_quiet_studies
from tests.conftest import wait_until
from tests.helpers import NODE_AE, SCU_AE, echo, free_port, run_cli, write_config
from tests.peers import OUTPUT_CLASSES, PACS_AE

REAL_CXR = Path("dicom/cxr/WG04_RG1_J2KI.dcm")  # CR, JPEG 2000, 1955 x 1841

CA_CONFIG = """[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
CN = {name}
[v3_ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
LEAF_EXTENSIONS = """basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    (folder / f"{name}.cnf").write_text(CA_CONFIG.format(name=name))
    _openssl(
        folder,
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-config",
        f"{name}.cnf",
    )


def _issue(folder: Path, ca: str, name: str, names: str = "DNS:localhost, IP:127.0.0.1") -> None:
    (folder / f"{name}.ext").write_text(LEAF_EXTENSIONS.format(names=names))
    _openssl(
        folder,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
    )
    _openssl(
        folder,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-out",
        f"{name}.crt",
        "-extfile",
        f"{name}.ext",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's certificates: ``<name>.crt`` / ``<name>.key`` in one folder."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("pki")
    _make_ca(folder, "ca")
    _make_ca(folder, "rogue-ca")
    for name in ("node", "client", "pacs"):
        _issue(folder, "ca", name)
    _issue(folder, "ca", "pacs-elsewhere", names="DNS:pacs.example.org")
    _issue(folder, "rogue-ca", "rogue-client")
    return folder


def _tls(pki: Path, **overrides: Any) -> TlsSettings:
    base = TlsSettings(
        port=free_port(),
        certificate=str(pki / "node.crt"),
        private_key=str(pki / "node.key"),
        ca_certificates=str(pki / "ca.crt"),
    )
    return dataclasses.replace(base, **overrides)


def _client(
    pki: Path, *, cert: str | None = "client", version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    """A sender's context: trusts the CA, presents ``cert`` (None: no certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=pki / "ca.crt")
    if cert is not None:
        context.load_cert_chain(pki / f"{cert}.crt", pki / f"{cert}.key")
    if version is not None:
        context.minimum_version = context.maximum_version = version
    return context


def _associate(
    port: int,
    context: ssl.SSLContext | None,
    classes: list[str],
    transfer_syntaxes: list[str] | None = None,
) -> Any:
    ae = AE(ae_title=SCU_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in classes:
        syntaxes = ALL_TRANSFER_SYNTAXES[:3] if sop_class == Verification else transfer_syntaxes
        ae.add_requested_context(sop_class, syntaxes or ALL_TRANSFER_SYNTAXES[:3])
    tls_args = None if context is None else (context, "localhost")
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE, tls_args=tls_args)


def _echo(port: int, context: ssl.SSLContext | None) -> int | None:
    return echo(port, tls=context)


def _alerts(node: Any) -> list[dict[str, Any]]:
    with session_scope(node.session_factory) as session:
        rows = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.event_type == "security.alert")
            .order_by(AuditEvent.id)
        ).all()
        return [{"outcome": row.outcome, **json.loads(row.details or "{}")} for row in rows]


def _wait_for_alerts(node: Any, count: int) -> list[dict[str, Any]]:
    wait_until(lambda: len(_alerts(node)) >= count, timeout=10)
    alerts = _alerts(node)
    assert len(alerts) == count, alerts
    for alert in alerts:
        assert alert["reason"] == "tls_handshake_failed"
        assert alert["peer_address"] == "127.0.0.1" and alert["outcome"] == "failure"
    return alerts


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_tls_association_echoes_and_stores_a_real_cxr(
    node_factory: Any, pki: Path, shared_data: Path, version: ssl.TLSVersion
) -> None:
    node = node_factory(tls=_tls(pki))
    ds = pydicom.dcmread(shared_data / REAL_CXR)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assoc = _associate(
        node.tls_port,
        _client(pki, version=version),
        [str(Verification), str(ds.SOPClassUID)],
        [str(ds.file_meta.TransferSyntaxUID)],
    )
    assert assoc.is_established
    try:
        assert (
            assoc.dul.socket.socket.version()
            == {ssl.TLSVersion.TLSv1_2: "TLSv1.2", ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        )
        assert int(assoc.send_c_echo().Status) == 0
        assert int(assoc.send_c_store(ds).Status) == 0
    finally:
        assoc.release()
    with session_scope(node.session_factory) as session:
        row = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == str(ds.SOPInstanceUID))
        ).one()
        stored = Path(node.settings.storage.root) / row.path
    assert pydicom.dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID
    assert _echo(node.scp_port, None) == 0  # the plaintext listener still runs
    assert _alerts(node) == []


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_a_client_offering_only_tls_1_0_or_1_1_is_refused_and_audited(
    node_factory: Any, pki: Path
) -> None:
    node = node_factory(tls=_tls(pki))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
    old.minimum_version, old.maximum_version = ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            old.wrap_socket(raw, server_hostname="localhost")
    (alert,) = _wait_for_alerts(node, 1)
    assert alert["cause"] == "unsupported protocol", alert
    assert _echo(node.tls_port, _client(pki)) == 0  # and the listener keeps serving


def test_a_plaintext_association_to_the_tls_port_fails_and_is_audited(
    node_factory: Any, pki: Path
) -> None:
    node = node_factory(tls=_tls(pki))
    assert _echo(node.tls_port, None) is None
    (alert,) = _wait_for_alerts(node, 1)
    assert alert["cause"] == "wrong version number", alert  # an A-ASSOCIATE-RQ, not a hello
    assert _echo(node.tls_port, _client(pki)) == 0


def test_a_required_client_certificate_must_come_from_the_configured_ca(
    node_factory: Any, pki: Path
) -> None:
    node = node_factory(tls=_tls(pki, require_client_certificate=True))
    assert _echo(node.tls_port, _client(pki, cert="rogue-client")) is None
    assert _echo(node.tls_port, _client(pki, cert=None)) is None
    first, second = _wait_for_alerts(node, 2)
    assert "certificate" in first["cause"] and "certificate" in second["cause"]
    assert _echo(node.tls_port, _client(pki, cert="client")) == 0
    assert len(_alerts(node)) == 2


def test_without_plaintext_only_the_tls_listener_runs(node_factory: Any, pki: Path) -> None:
    plain_port = free_port()
    node = node_factory(
        tls=_tls(pki, plaintext=False),
        node=NodeSettings(ae_title=NODE_AE, host="127.0.0.1", port=plain_port),
    )
    assert node.server is None
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", plain_port), timeout=5).close()
    assert _echo(node.tls_port, _client(pki)) == 0


def test_a_silent_connection_does_not_block_the_tls_port_and_times_out(
    node_factory: Any, pki: Path
) -> None:
    node = node_factory(tls=_tls(pki), scp=ScpSettings(acse_timeout=2.0))
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10):
        started = time.monotonic()
        assert _echo(node.tls_port, _client(pki)) == 0
        assert time.monotonic() - started < 2.0  # not queued behind the silent client
        (alert,) = _wait_for_alerts(node, 1)
    assert alert["cause"] == "no TLS handshake before the timeout"


def test_a_tcp_probe_that_closes_without_a_byte_is_not_a_security_alert(
    node_factory: Any, pki: Path
) -> None:
    node = node_factory(tls=_tls(pki))
    for _ in range(3):  # a load balancer's TCP health check: connect, close
        socket.create_connection(("127.0.0.1", node.tls_port), timeout=5).close()
    assert _echo(node.tls_port, None) is None  # a real failure after the probes is audited
    (alert,) = _wait_for_alerts(node, 1)
    assert alert["cause"] == "wrong version number", alert
    assert _echo(node.tls_port, _client(pki)) == 0


def test_stopping_the_node_does_not_wait_for_a_silent_tls_connection(
    node_factory: Any, pki: Path
) -> None:
    node = node_factory(tls=_tls(pki), scp=ScpSettings(acse_timeout=30.0))
    with socket.create_connection(("127.0.0.1", node.tls_port), timeout=10):
        time.sleep(0.5)  # the handshake thread is waiting
        started = time.monotonic()
        node.stop()
        assert time.monotonic() - started < 10.0
    assert _alerts(node) == []  # a shutdown is not a security alert


def test_dcmtk_echoscu_and_storescu_over_tls(
    node_factory: Any, pki: Path, shared_data: Path
) -> None:
    if shutil.which("echoscu") is None:
        pytest.skip("DCMTK is not installed")
    node = node_factory(tls=_tls(pki, require_client_certificate=True))
    common = [
        "+tls",
        str(pki / "client.key"),
        str(pki / "client.crt"),
        "+cf",
        str(pki / "ca.crt"),
        "-aet",
        "STORESCU",
        "-aec",
        NODE_AE,
        "127.0.0.1",
        str(node.tls_port),
    ]
    echo = subprocess.run(["echoscu", *common], capture_output=True, text=True, timeout=60)
    assert echo.returncode == 0, echo.stderr
    store = subprocess.run(
        ["storescu", "-xw", *common, str(shared_data / REAL_CXR)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert store.returncode == 0, store.stderr
    sop_instance_uid = str(pydicom.dcmread(shared_data / REAL_CXR).SOPInstanceUID)
    with session_scope(node.session_factory) as session:
        assert (
            session.scalars(
                select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
            ).one_or_none()
            is not None
        )
    untrusted = subprocess.run(
        [
            "echoscu",
            "+tls",
            str(pki / "rogue-client.key"),
            str(pki / "rogue-client.crt"),
            *common[3:],
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert untrusted.returncode != 0
    _wait_for_alerts(node, 1)


class TlsPacs:
    """A pynetdicom Storage SCP on DICOM TLS that requires a client certificate of the CA."""

    def __init__(self, pki: Path, cert: str = "pacs") -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki / f"{cert}.crt", pki / f"{cert}.key")
        context.load_verify_locations(cafile=pki / "ca.crt")
        context.verify_mode = ssl.CERT_REQUIRED
        self.received: list[str] = []
        self.ae = AE(ae_title=PACS_AE)
        for sop_class in OUTPUT_CLASSES:
            self.ae.add_supported_context(sop_class)
        self.ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._store)]
        self.server = self.ae.start_server(
            ("127.0.0.1", 0), block=False, ssl_context=context, evt_handlers=handlers
        )
        self.port = int(self.server.server_address[1])

    def _store(self, event: Any) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def tls_pacs(pki: Path) -> Any:
    pacs = TlsPacs(pki)
    yield pacs
    pacs.stop()


def _pacs_peer(port: int, host: str = "127.0.0.1") -> PeerSettings:
    return PeerSettings(
        name="pacs", ae_title=PACS_AE, host=host, port=port, send_results=True, tls=True
    )


def test_results_are_delivered_to_a_tls_peer(
    node_factory: Any, pki: Path, tls_pacs: TlsPacs
) -> None:
    peers = (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        _pacs_peer(tls_pacs.port),
    )
    node = node_factory(tls=_tls(pki), peers=peers)
    source = make_cxr_dataset(rows=128, columns=128)
    assoc = _associate(node.tls_port, _client(pki), [str(source.SOPClassUID)])
    assert assoc.is_established
    assert int(assoc.send_c_store(source).Status) == 0
    assoc.release()
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    Worker(node.settings, node.session_factory, load_bundle(node.settings)).run_once()
    assert DeliveryWorker(node.settings, node.session_factory).run_once() == 1
    with session_scope(node.session_factory) as session:
        job = session.scalars(select(Job).where(Job.kind == "delivery")).one()
        delivered = set(
            session.scalars(
                select(Delivery.sop_instance_uid).where(Delivery.outcome == "delivered")
            )
        )
        assert job.state == "done"
    assert delivered and delivered == set(tls_pacs.received)
    assert echo_peer(node.settings, peers[1], now=utcnow()).outcome == "success"


def test_a_peer_certificate_that_does_not_name_the_host_is_refused(
    pki: Path, shared_data: Path
) -> None:
    pacs = TlsPacs(pki, cert="pacs-elsewhere")
    try:
        peer = _pacs_peer(pacs.port)
        outgoing = OutgoingFile("1.2.840.10008.5.1.4.1.1.7", "1.2.3.4", shared_data / REAL_CXR)
        with pytest.raises(
            TransientDeliveryError,
            match="TLS handshake .* failed: certificate verify failed: IP address mismatch",
        ):
            send_files([outgoing], peer, calling_ae_title=NODE_AE, timeout=10, tls=_tls(pki))
        result = echo_peer(Settings(tls=_tls(pki)), peer, now=utcnow())
        assert result.outcome == "failure" and "IP address mismatch" in result.detail
        assert pacs.received == []
    finally:
        pacs.stop()


def test_a_peer_without_our_client_certificate_is_refused_by_it(pki: Path) -> None:
    pacs = TlsPacs(pki)
    try:
        no_certificate = TlsSettings(ca_certificates=str(pki / "ca.crt"))
        result = echo_peer(Settings(tls=no_certificate), _pacs_peer(pacs.port), now=utcnow())
        assert result.outcome == "failure" and result.detail.startswith("TLS handshake failed")
        with_certificate = echo_peer(Settings(tls=_tls(pki)), _pacs_peer(pacs.port), now=utcnow())
        assert with_certificate.outcome == "success", with_certificate.detail
    finally:
        pacs.stop()


def _unusable_files(pki: Path, tmp_path: Path) -> dict[str, tuple[TlsSettings, str]]:
    encrypted = tmp_path / "encrypted.key"
    _openssl(
        tmp_path,
        "pkey",
        "-in",
        str(pki / "node.key"),
        "-aes256",
        "-passout",
        "pass:x",
        "-out",
        str(encrypted),
    )
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    return {
        "missing certificate": (
            _tls(pki, certificate=str(tmp_path / "none.crt")),
            "tls.certificate = '{0}/none.crt': cannot be read",
        ),
        "key of another certificate": (
            _tls(pki, private_key=str(pki / "client.key")),
            "tls.private_key = '{1}/client.key': not the key of",
        ),
        "encrypted key": (
            _tls(pki, private_key=str(encrypted)),
            "tls.private_key = '{0}/encrypted.key': the key is encrypted",
        ),
        "CA file not PEM": (
            _tls(pki, ca_certificates=str(tmp_path / "junk.pem")),
            "tls.ca_certificates = '{0}/junk.pem': not a PEM file",
        ),
        "no certificate at all": (
            _tls(pki, certificate=""),
            "tls.certificate and tls.private_key must be set",
        ),
    }


def test_unusable_tls_files_stop_the_start_with_one_line_naming_key_and_file(
    node_factory: Any, pki: Path, tmp_path: Path
) -> None:
    for case, (settings, message) in _unusable_files(pki, tmp_path).items():
        with pytest.raises(TlsConfigError) as raised:
            server_context(settings)
        assert str(raised.value).startswith(message.format(tmp_path, pki)), case
        assert "\n" not in str(raised.value)
    with pytest.raises(TlsConfigError, match="cannot be read"):
        client_context(_tls(pki, ca_certificates=str(tmp_path / "none.crt")))
    with pytest.raises(TlsConfigError, match="tls.certificate = .*none.crt.: cannot be read"):
        node_factory(tls=_tls(pki, certificate=str(tmp_path / "none.crt")))


def _tls_config(path: Path, tmp_path: Path, certificate: Path, key: Path, port: int) -> Path:
    return write_config(
        path,
        root=tmp_path / "store",
        db_url="",
        port=free_port(),
        extra=f'[tls]\nport = {port}\ncertificate = "{certificate}"\nprivate_key = "{key}"\n',
    )


def test_config_check_and_serve_exit_2_with_one_line_for_an_unreadable_tls_file(
    pki: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.crt"
    config = _tls_config(tmp_path / "node.toml", tmp_path, missing, pki / "node.key", free_port())
    line = (
        f"config error: tls.certificate = '{missing}': cannot be read (No such file or directory)"
    )
    assert main(["--config", str(config), "config", "check"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]
    assert main(["--config", str(config), "db", "upgrade"]) == 0
    served = run_cli(config, "serve", "--role", "scp")  # a real process: its exit code
    assert served.returncode == 2, served.stderr
    assert served.stderr.strip().splitlines()[-1] == line
    assert "Traceback" not in served.stderr
    good = _tls_config(tmp_path / "good.toml", tmp_path, pki / "node.crt", pki / "node.key", 2762)
    capsys.readouterr()
    assert main(["--config", str(good), "config", "check"]) == 0
    assert "DICOM TLS: port 2762, TLS 1.2 or newer" in capsys.readouterr().out
