"""Real peers the node delivers to: a scripted pynetdicom Storage SCP, and Orthanc.

``ScriptedPacs`` is a real AE on 127.0.0.1 that answers each C-STORE with the next status
of its script (or rejects associations as told), and records what it received.
``ScriptedStow`` is the same for STOW-RS: a real HTTP server answering each POST as told.
``Orthanc`` runs Debian's Orthanc with a temporary configuration, as the PACS of the
end-to-end tests, and is driven through its REST API.
"""

from __future__ import annotations

import email.policy
import io
import json
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)

from tests.helpers import free_port

PACS_AE = "PACS"
OUTPUT_CLASSES = (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    SecondaryCaptureImageStorage,
    KeyObjectSelectionDocumentStorage,
)


class ScriptedPacs:
    """A Storage SCP whose answers a test chooses.

    ``statuses``: the status of each successive C-STORE (the last one repeats).
    ``reject``: None, or (result, source, reason) of an A-ASSOCIATE-RJ (result 1 is
    permanent, 2 transient; PS3.8 9.3.4).
    """

    def __init__(
        self, statuses: list[int] | None = None, transfer_syntaxes: list[str] | None = None
    ) -> None:
        self.statuses = list(statuses or [0x0000])
        self.reject: tuple[int, int, int] | None = None
        self.received: list[str] = []
        self.syntaxes: list[str] = []
        self.associations = 0
        self._lock = threading.Lock()
        self.ae = AE(ae_title=PACS_AE)
        for sop_class in OUTPUT_CLASSES:
            if transfer_syntaxes:
                self.ae.add_supported_context(sop_class, transfer_syntaxes)
            else:
                self.ae.add_supported_context(sop_class)
        handlers = [(evt.EVT_C_STORE, self._store), (evt.EVT_REQUESTED, self._requested)]
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        self.port = int(self.server.server_address[1])

    def _requested(self, event: Any) -> None:
        with self._lock:
            self.associations += 1
            reject = self.reject
        if reject is not None:
            event.assoc.acse.send_reject(*reject)
            event.assoc.kill()

    def _store(self, event: Any) -> int:
        with self._lock:
            status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            self.syntaxes.append(str(event.context.transfer_syntax))
        return status

    def stop(self) -> None:
        self.server.shutdown()


DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian orthanc-dicomweb


class Orthanc:
    """Debian's Orthanc on 127.0.0.1 with a throwaway storage folder."""

    def __init__(self, folder: Path, *, dicomweb: bool = False, **extra: Any) -> None:
        """Choose the ports; :meth:`start` runs it (the node's port may not be known yet).

        ``dicomweb``: load Debian's orthanc-dicomweb plugin (QIDO-RS, WADO-RS, STOW-RS under
        :attr:`dicomweb_url`); ``extra``: more configuration keys (``ServeFolders``, say)."""
        self.folder = folder
        self.dicomweb = dicomweb
        self.extra = extra
        self.http_port, self.dicom_port = free_port(), free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, node_ae: str, node_port: int) -> Orthanc:
        folder = self.folder
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicom-node-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "DicomWeb": {"Enable": self.dicomweb, "Root": "/dicom-web/"},
            "StableAge": 1,
            "DicomModalities": {"node": [node_ae, "127.0.0.1", node_port]},
            **self.extra,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self.log = (folder / "orthanc.log").open("wb")
        self.process = subprocess.Popen(
            [binary, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        self._wait_up()
        return self

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (with ``dicomweb=True``)."""
        return f"http://127.0.0.1:{self.http_port}/dicom-web"

    def _wait_up(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()}")
            try:
                self.get("/system")
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start")

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def upload(self, data: bytes) -> dict[str, Any]:
        return self.request("POST", "/instances", data)

    def relay_to_node(self, ds: Any) -> str:
        """Store ``ds`` in Orthanc, have Orthanc C-STORE its study to the node; the study UID."""
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        self.send_study_to_node(self.upload(buffer.getvalue())["ParentStudy"])
        return str(ds.StudyInstanceUID)

    def send_study_to_node(self, orthanc_study_id: str) -> Any:
        body = json.dumps({"Resources": [orthanc_study_id], "Synchronous": True}).encode()
        return self.request("POST", "/modalities/node/store", body)

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds in the study, with its main DICOM tags."""
        found = self.request(
            "POST",
            "/tools/find",
            json.dumps(
                {
                    "Level": "Instance",
                    "Query": {"StudyInstanceUID": study_instance_uid},
                    "Expand": True,
                }
            ).encode(),
        )
        return found

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@dataclass
class StowAnswer:
    """What :class:`ScriptedStow` answers one request with: an HTTP status, headers, a DICOM
    JSON body built from the received instances, a delay first, or a dropped connection."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Callable[[list[Dataset]], dict[str, Any] | None] | None = None
    delay_seconds: float = 0.0
    drop: bool = False  # close the connection without a response


class ScriptedStow:
    """A real HTTP STOW-RS origin server on 127.0.0.1 (PS3.18 10.5) that answers each POST
    with the next :class:`StowAnswer` of :attr:`answers` (the last one repeats) and records
    every request: its headers and the instances of its multipart/related body."""

    def __init__(self) -> None:
        self.answers: list[StowAnswer] = [StowAnswer()]
        self.requests: list[tuple[dict[str, str], list[Dataset]]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                scripted._answer(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length", "0"))
        body = handler.rfile.read(length)
        instances = parse_multipart(handler.headers.get("Content-Type", ""), body)
        self.requests.append((dict(handler.headers.items()), instances))
        answer = self.answers[min(len(self.requests) - 1, len(self.answers) - 1)]
        time.sleep(answer.delay_seconds)
        if answer.drop:
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        content = answer.body(instances) if answer.body else None
        data = json.dumps(content).encode() if content is not None else b""
        try:
            handler.send_response(answer.status)
            for name, value in answer.headers.items():
                handler.send_header(name, value)
            if data:
                handler.send_header("Content-Type", "application/dicom+json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except OSError:  # the client gave up waiting (a slow answer)
            pass

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def parse_multipart(content_type: str, body: bytes) -> list[Dataset]:
    """The application/dicom parts of a multipart/related body (RFC 2387), read by pydicom."""
    message = BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    parts = message.iter_parts() if message.is_multipart() else []
    return [pydicom.dcmread(io.BytesIO(part.get_payload(decode=True))) for part in parts]


def stow_response(instances: list[Dataset], failed: dict[int, int] | None = None) -> dict[str, Any]:
    """A PS3.18 10.5.3 response body: instance ``i`` of the request failed with reason
    ``failed[i]`` (Failed SOP Sequence), every other one stored (Referenced SOP Sequence)."""
    failed = failed or {}
    response = Dataset()
    stored, refused = [], []
    for index, instance in enumerate(instances):
        item = Dataset()
        item.ReferencedSOPClassUID = instance.SOPClassUID
        item.ReferencedSOPInstanceUID = instance.SOPInstanceUID
        if index in failed:
            item.FailureReason = failed[index]
            refused.append(item)
        else:
            stored.append(item)
    if stored:
        response.ReferencedSOPSequence = stored
    if refused:
        response.FailedSOPSequence = refused
    return response.to_json_dict()
