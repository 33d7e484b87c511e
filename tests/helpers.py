"""Test helpers: real SCUs on loopback, raw C-STORE of arbitrary bytes, node subprocesses,
throwaway PostgreSQL clusters and small file systems."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification

SCU_AE = "TEST_SCU"
NODE_AE = "DICOM_NODE"
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def associate(
    port: int,
    sop_classes: list[str],
    *,
    calling: str = SCU_AE,
    called: str = NODE_AE,
    transfer_syntaxes: list[str] | None = None,
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class in dict.fromkeys(sop_classes):
        ae.add_requested_context(sop_class, transfer_syntaxes or ALL_TRANSFER_SYNTAXES[:3])
    return ae.associate(
        host, port, ae_title=called, tls_args=None if tls is None else (tls, "localhost")
    )


def echo(port: int, **kwargs: Any) -> int | None:
    """C-ECHO status, or None when no association could be made."""
    assoc = associate(port, [str(Verification)], **kwargs)
    if not assoc.is_established:
        return None
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else None
    finally:
        assoc.release()


def send_datasets(port: int, datasets: list[Dataset], **kwargs: Any) -> list[int | None]:
    """Send over one association; each response's status (None: no response)."""
    classes = [str(ds.SOPClassUID) for ds in datasets]
    syntaxes = list(
        dict.fromkeys(
            [str(ds.file_meta.TransferSyntaxUID) for ds in datasets]
            + [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
    )
    assoc = associate(port, classes, transfer_syntaxes=syntaxes, **kwargs)
    assert assoc.is_established, "association rejected"
    try:
        result = []
        for ds in datasets:
            status = assoc.send_c_store(ds)
            result.append(int(status.Status) if "Status" in status else None)
        return result
    finally:
        assoc.release()


@dataclass(frozen=True)
class RawInstance:
    """A file split into what a sender puts on the wire: command UIDs, syntax, data set bytes."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    payload: bytes


def split_file(path: Path, default_sop_class: str) -> RawInstance:
    """Split any file, DICOM or not, into a C-STORE payload, as a sender would.

    The command's UIDs come from the data set (as storescu does), else from the File Meta,
    else defaults; an empty UID makes pynetdicom's SCU drop the response, so it is replaced.
    """
    try:
        ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        own = (str(ds.get("SOPClassUID") or ""), str(ds.get("SOPInstanceUID") or ""))
    except Exception:
        own = ("", "")
    try:
        with path.open("rb") as handle:
            read_preamble(handle, force=True)
            meta = _read_file_meta_info(handle)
            payload = handle.read()
        if "TransferSyntaxUID" not in meta:
            raise ValueError("no File Meta: a bare data set")
        return RawInstance(
            own[0] or str(meta.get("MediaStorageSOPClassUID") or default_sop_class),
            own[1] or str(meta.get("MediaStorageSOPInstanceUID") or "1.2.3.4"),
            str(meta.get("TransferSyntaxUID") or ImplicitVRLittleEndian),
            payload,
        )
    except Exception:
        return RawInstance(
            own[0] or default_sop_class,
            own[1] or "1.2.3.4",
            str(ImplicitVRLittleEndian),
            path.read_bytes(),
        )


def send_raw(assoc: Association, raw: RawInstance, message_id: int = 1) -> int | None:
    """Send ``raw.payload`` as the C-STORE data set, bypassing the SCU's own checks.

    Returns the response status, or None when no response came.  Raises LookupError when
    the association has no context for the class and syntax.
    """
    context = next(
        (
            cx
            for cx in assoc.accepted_contexts
            if cx.abstract_syntax == raw.sop_class_uid
            and cx.transfer_syntax[0] == raw.transfer_syntax_uid
        ),
        None,
    )
    if context is None:
        raise LookupError(
            f"no accepted context for {raw.sop_class_uid} in {raw.transfer_syntax_uid}"
        )
    request = C_STORE()
    request.MessageID = message_id
    request.Priority = 2
    # Set the private fields: pynetdicom would refuse to send an invalid UID itself.
    request._affected_sop_class_uid = pydicom.uid.UID(raw.sop_class_uid)
    request._affected_sop_instance_uid = pydicom.uid.UID(raw.sop_instance_uid)
    request.DataSet = BytesIO(raw.payload)
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return None if response is None else int(response.Status)


def send_raw_one(port: int, raw: RawInstance) -> int | None:
    """Send one instance, as received bytes, over its own association; its C-STORE status."""
    assoc = associate(port, [raw.sop_class_uid], transfer_syntaxes=[raw.transfer_syntax_uid])
    assert assoc.is_established
    try:
        return send_raw(assoc, raw)
    finally:
        assoc.release()


def stored_relative_paths(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in (root / "instances").rglob("*") if p.is_file()}


class NodeProcess:
    """``dicom-node serve`` in a subprocess, with its output captured to a file."""

    def __init__(self, config_path: Path, log_path: Path, env: dict[str, str] | None = None):
        self.config_path, self.log_path = config_path, log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, roles: tuple[str, ...]) -> subprocess.Popen[bytes]:
        role_args = [arg for role in roles for arg in ("--role", role)]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dicom_node",
                    "--config",
                    str(self.config_path),
                    "serve",
                    *role_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO,
            )
        return self.process

    def start(self, port: int, timeout: float = 30.0, *roles: str) -> None:
        self._spawn(roles)
        self.wait_answering(port, timeout)

    def wait_answering(self, port: int, timeout: float = 30.0) -> None:
        """Wait until the spawned process answers C-ECHO on ``port``."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"node exited with {self.process.returncode}: "
                    f"{self.log_path.read_text()[-2000:]}"
                )
            if echo(port) == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("node did not answer C-ECHO in time")

    def start_without_echo(self, *roles: str) -> None:
        """Start a role that has no DICOM port (a worker); returns once the process is up."""
        self.spawn(*roles)
        self.wait_started()

    def spawn(self, *roles: str) -> None:
        """Start the process and return at once (several can then start side by side)."""
        self._spawn(roles)

    def wait_started(self, timeout: float = 60.0) -> None:
        """Wait until the spawned process has logged ``node.started`` (its model is loaded)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and b"node.started" not in self.log_path.read_bytes():
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited: {self.log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


def write_config(
    path: Path,
    *,
    root: Path,
    db_url: str,
    port: int,
    level: str = "INFO",
    quiet_seconds: float = 1.0,
    extra: str = "",
    models_dir: Path | None = None,
    lease_seconds: float = 300,
    batch_size: int = 4,
    web_port: int | None = None,
    metrics_port: int = 0,
) -> Path:
    """A TOML config for a subprocess node that accepts ``SCU_AE`` from 127.0.0.1.

    ``serve`` runs the web role too, so each config gets its own free web port.  The metrics
    endpoint gets ``metrics_port`` (0: any free port, so processes never fight over 9464),
    unless ``extra`` has its own ``[metrics]`` section.
    """
    metrics = (
        "" if "[metrics]" in extra else f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n'
    )
    path.write_text(f"""
[node]
ae_title = "{NODE_AE}"
host = "127.0.0.1"
port = {port}
[storage]
root = "{root}"
min_free_mb = 10
[database]
url = "{db_url}"
[[peers]]
name = "test-scu"
ae_title = "{SCU_AE}"
host = "127.0.0.1"
[scheduler]
study_quiet_seconds = {quiet_seconds}
tick_seconds = 0.2
lease_seconds = {lease_seconds}
[model]
models_dir = "{models_dir or root / "models"}"
batch_size = {batch_size}
[web]
host = "127.0.0.1"
port = {web_port or free_port()}
[logging]
level = "{level}"
format = "json"
{extra}
{metrics}""")
    return path


def run_cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def postgres_bin() -> Path:
    """The newest installed PostgreSQL server's binaries folder."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not versions:
        raise RuntimeError("PostgreSQL server binaries not found: apt-get install postgresql")
    return versions[-1].parent


@dataclass(frozen=True)
class PostgresCluster:
    """A running throwaway cluster: its server URL (no database name), and stop/start of the
    server itself, for tests of an outage."""

    server_url: str
    stop: Callable[[], None]
    start: Callable[[], None]

    @property
    def url(self) -> str:
        """The URL of the cluster's ``postgres`` database."""
        return f"{self.server_url}/postgres"


@contextmanager
def postgres_cluster(prefix: str, *server_options: str) -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of its own (``initdb`` as the ``postgres`` user) on a free
    loopback port, its socket and data in a fresh temporary folder, so that parallel test
    processes never share one; removed afterwards.  ``server_options``: more ``-c`` settings."""
    binaries = postgres_bin()
    base = Path(tempfile.mkdtemp(prefix=prefix))
    shutil.chown(base, "postgres", "postgres")
    data, port = base / "data", free_port()
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [
            *as_postgres,
            str(binaries / "initdb"),
            "-D",
            str(data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ],
        check=True,
        capture_output=True,
    )
    options = "".join(f" -c {option}" for option in server_options)

    def pg_ctl(*args: str) -> None:
        subprocess.run(
            [*as_postgres, str(binaries / "pg_ctl"), "-D", str(data), *args],
            check=True,
            capture_output=True,
        )

    def start() -> None:
        pg_ctl(
            "-w",
            "-l",
            str(base / "log"),
            "-o",
            f"-p {port} -k {base} -c listen_addresses=127.0.0.1{options}",
            "start",
        )

    start()
    try:
        yield PostgresCluster(
            f"postgresql+psycopg://postgres@127.0.0.1:{port}",
            stop=lambda: pg_ctl("-w", "-m", "fast", "stop"),
            start=start,
        )
    finally:
        subprocess.run(
            [*as_postgres, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def small_tmpfs_at(mount_point: Path, size_mb: int = 40) -> Iterator[Path]:
    """A tmpfs of ``size_mb`` mounted on ``mount_point`` (created): a file system that really
    fills up.  Skips the test where mounting is refused (not root); lazily unmounted after."""
    mount_point.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)
