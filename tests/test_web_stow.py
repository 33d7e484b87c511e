"""STOW-RS receive (POST /dicomweb/studies): stored as C-STORE stores, answered per PS3.18.

Real parts only: a node with the SCP, worker and web roles in this process (or ``serve`` in a
subprocess for kill -9), dicomweb-client and curl as senders, DCMTK's dcmconv and pydicom to
make the files, SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import shutil
import subprocess
import uuid
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.settings import WebSettings
from dicom_node.db.models import AuditEvent, Instance, Job, JobState
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.web.users import create_token
from tests.conftest import wait_until
from tests.helpers import NodeProcess, free_port, run_cli, write_config

DCMTK_SOURCE = "dicom/cxr/CR-MONO1-10-chest_noFileMeta.dcm"  # under ../shared/data
FAILED_SOP_SEQUENCE, REFERENCED_SOP_SEQUENCE, FAILURE_REASON = "00081198", "00081199", "00081197"
BOUNDARY = "dicom-node-test-boundary"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def _file_bytes(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _pydicom_file(**keys: Any) -> bytes:
    return _file_bytes(make_cxr_dataset(**keys))


def _dcmtk_file(shared_data: Path, tmp_path: Path) -> bytes:
    """A CR that DCMTK wrote: dcmconv gives the shared file (no File Meta) a PS3.10 form."""
    if shutil.which("dcmconv") is None:
        pytest.skip("needs DCMTK's dcmconv (apt-get install dcmtk)")
    target = tmp_path / "dcmtk.dcm"
    subprocess.run(["dcmconv", "+te", str(shared_data / DCMTK_SOURCE), str(target)], check=True)
    return target.read_bytes()


def _body(*parts: bytes, content_type: str = "application/dicom") -> bytes:
    chunks = [
        f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    ]
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


def _token(node: Any, name: str, scope: str) -> str:
    with session_scope(node.session_factory) as session:
        return create_token(session, name=name, scope=scope, now=utcnow())


def _start(node_factory: Any, **web: Any) -> Any:
    return node_factory(
        roles=("scp", "worker", "web"),
        web=WebSettings(host="127.0.0.1", port=0, refresh_seconds=0, **web),
    )


def _post(node: Any, token: str | None, body: bytes, **headers: str) -> httpx.Response:
    sent = {"Content-Type": MULTIPART, **headers}
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{node.web_url}/dicomweb/studies", content=body, headers=sent, timeout=60)


def _stored_files(node: Any) -> dict[str, bytes]:
    root = Path(node.settings.storage.root)
    with session_scope(node.session_factory) as session:
        rows = session.scalars(select(Instance)).all()
        return {row.sop_instance_uid: (root / row.path).read_bytes() for row in rows}


def _failure_reasons(answer: httpx.Response) -> list[int]:
    return [
        item[FAILURE_REASON]["Value"][0] for item in answer.json()[FAILED_SOP_SEQUENCE]["Value"]
    ]


def _done_studies(node: Any) -> set[str]:
    with session_scope(node.session_factory) as session:
        jobs = session.scalars(select(Job).where(Job.state == JobState.DONE)).all()
        return {job.study_instance_uid for job in jobs}


def test_stow_stores_dcmtk_and_pydicom_files_byte_identical_audits_and_analyses_them(
    node_factory: Any, shared_data: Path, tmp_path: Path
) -> None:
    node = _start(node_factory)
    token = _token(node, "modality", "store")
    dcmtk = _dcmtk_file(shared_data, tmp_path)
    made = _pydicom_file(modality="CR")
    client = DICOMwebClient(
        f"{node.web_url}/dicomweb", headers={"Authorization": f"Bearer {token}"}
    )
    answer = client.store_instances([pydicom.dcmread(BytesIO(made))])
    assert len(answer.ReferencedSOPSequence) == 1 and "FailedSOPSequence" not in answer
    by_curl = tmp_path / "body.bin"
    by_curl.write_bytes(_body(dcmtk))
    curl = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-X", "POST",
         "-H", f"Content-Type: {MULTIPART}", "-H", f"Authorization: Bearer {token}",
         "--data-binary", f"@{by_curl}", f"{node.web_url}/dicomweb/studies"],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    assert curl.stdout.rsplit("\n", 1)[1] == "200", curl.stdout
    stored = _stored_files(node)
    made_uid = pydicom.dcmread(BytesIO(made)).SOPInstanceUID
    dcmtk_ds = pydicom.dcmread(BytesIO(dcmtk))
    assert stored[dcmtk_ds.SOPInstanceUID] == dcmtk  # byte for byte as posted
    # dicomweb-client re-encodes the data set it is given: the node keeps what it was sent
    assert pydicom.dcmread(BytesIO(stored[made_uid])).PixelData == (
        pydicom.dcmread(BytesIO(made)).PixelData
    )
    studies = {dcmtk_ds.StudyInstanceUID, pydicom.dcmread(BytesIO(made)).StudyInstanceUID}
    assert wait_until(lambda: studies <= _done_studies(node), timeout=120), "not analysed"
    with session_scope(node.session_factory) as session:
        audited = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "instances.received")
        ).all()
        assert {row.study_instance_uid for row in audited} == studies
        assert {json.loads(row.details or "{}")["calling_ae_title"] for row in audited} == {
            "modality"
        }


def test_stow_of_a_held_instance_again_is_success_and_keeps_one_copy(node_factory: Any) -> None:
    node = _start(node_factory)
    token = _token(node, "router", "store")
    made = _pydicom_file(modality="DX")
    for _ in range(2):
        assert _post(node, token, _body(made)).status_code == 200
    assert list(_stored_files(node).values()) == [made]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_stow_without_token_is_401_and_other_scopes_are_403_and_store_tokens_read_nothing(
    node_factory: Any,
) -> None:
    node = _start(node_factory)
    store, read, write = (
        _token(node, n, s) for n, s in [("s", "store"), ("r", "read"), ("w", "write")]
    )
    made = _pydicom_file()
    anonymous = _post(node, None, _body(made))
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
    assert _failure_reasons(anonymous) == [0x0124]
    assert "Warning" in anonymous.headers
    assert _post(node, "dnt_not-a-token", _body(made)).status_code == 401
    for token in (read, write):
        refused = _post(node, token, _body(made))
        assert refused.status_code == 403 and _failure_reasons(refused) == [0x0124]
    api = httpx.get(f"{node.web_url}/api/v1/worklist", headers={"Authorization": f"Bearer {store}"})
    assert api.status_code == 403
    assert _stored_files(node) == {}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_stow_refuses_bad_bodies_with_defined_statuses_and_stores_nothing_of_them(
    node_factory: Any,
) -> None:
    node = _start(node_factory, max_stow_mb=1)
    token = _token(node, "modality", "store")
    made = _pydicom_file(rows=256, columns=256)
    cut_short = _body(made)[: -len(f"--{BOUNDARY}--\r\n") - 10]
    malformed = _post(node, token, cut_short)
    assert malformed.status_code == 400 and _failure_reasons(malformed) == [0xC000]
    not_dicom = _post(node, token, _body(b"%PDF-1.4 not a DICOM file" * 20))
    assert not_dicom.status_code == 409 and _failure_reasons(not_dicom) == [0xC000]
    wrong_part_type = _post(node, token, _body(made, content_type="application/pdf"))
    assert wrong_part_type.status_code == 409
    for content_type in (
        "application/json",
        'multipart/related; type="application/dicom+json"; boundary=x',
    ):
        wrong = _post(node, token, _body(made), **{"Content-Type": content_type})
        assert wrong.status_code == 415 and FAILED_SOP_SEQUENCE in wrong.json()
    no_boundary = _post(node, token, _body(made), **{"Content-Type": "multipart/related"})
    assert no_boundary.status_code == 400
    oversized = _post(node, token, _body(_pydicom_file(rows=1024, columns=1024)))
    assert oversized.status_code == 413 and _failure_reasons(oversized) == [0xA700]
    assert _stored_files(node) == {}


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_stow_answers_each_instance_202_for_a_mixed_body_and_409_for_another_study(
    node_factory: Any,
) -> None:
    node = _start(node_factory)
    token = _token(node, "modality", "store")
    good, other = _pydicom_file(), _pydicom_file()
    good_ds = pydicom.dcmread(BytesIO(good))
    mixed = _post(node, token, _body(good, b"not DICOM at all"))
    assert mixed.status_code == 202
    body = mixed.json()
    stored = body[REFERENCED_SOP_SEQUENCE]["Value"]
    assert [item["00081155"]["Value"][0] for item in stored] == [good_ds.SOPInstanceUID]
    assert _failure_reasons(mixed) == [0xC000]
    wrong_study = httpx.post(
        f"{node.web_url}/dicomweb/studies/{good_ds.StudyInstanceUID}",
        content=_body(other),
        headers={"Content-Type": MULTIPART, "Authorization": f"Bearer {token}"},
        timeout=60,
    )
    assert wrong_study.status_code == 409 and _failure_reasons(wrong_study) == [0xC409]
    assert set(_stored_files(node)) == {good_ds.SOPInstanceUID}


@pytest.mark.slow
def test_kill_9_mid_post_loses_nothing_that_got_200_and_leaves_nothing_partial(
    tmp_path: Path, db_url: str, models_dir: Path
) -> None:
    root, port, web_port = tmp_path / "store", free_port(), free_port()
    config = write_config(
        tmp_path / "node.toml", root=root, db_url=db_url, port=port, web_port=web_port,
        models_dir=models_dir,
    )  # fmt: skip
    process = NodeProcess(config, tmp_path / "node.log")
    assert run_cli(config, "db", "upgrade").returncode == 0
    token = _cli_token(config)
    process.start(port, 60)
    acknowledged = _pydicom_file()
    url = f"http://127.0.0.1:{web_port}"
    answer = httpx.post(
        f"{url}/dicomweb/studies", content=_body(acknowledged), timeout=60,
        headers={"Content-Type": MULTIPART, "Authorization": f"Bearer {token}"},
    )  # fmt: skip
    assert answer.status_code == 200
    body = _body(_pydicom_file(rows=2048, columns=2048))
    connection = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
    connection.putrequest("POST", "/dicomweb/studies")
    for name, value in (
        ("Content-Type", MULTIPART),
        ("Authorization", f"Bearer {token}"),
        ("Content-Length", str(len(body))),
    ):
        connection.putheader(name, value)
    connection.endheaders()
    connection.send(body[: len(body) // 2])
    spool = root / "tmp"
    assert wait_until(lambda: any(spool.glob("*.stow")), timeout=30), "the post never started"
    process.kill()
    connection.close()
    process.start(port, 60)
    try:
        stored = httpx.get(
            f"{url}/api/v1/worklist", timeout=30, headers={"Authorization": f"Bearer {token}"}
        )
        assert stored.status_code == 403  # a store token reads nothing, even after a restart
        assert not any(spool.glob("*.stow")), "the spooled half body outlived the restart"
        files = sorted(p for p in (root / "instances").rglob("*") if p.is_file())
        assert [hashlib.sha256(p.read_bytes()).hexdigest() for p in files] == [
            hashlib.sha256(acknowledged).hexdigest()
        ]
    finally:
        process.stop()


def _cli_token(config: Path) -> str:
    name = f"modality-{uuid.uuid4().hex[:6]}"
    made = run_cli(config, "users", "token", name, "--scope", "store")
    assert made.returncode == 0, made.stderr
    return next(word for word in made.stdout.split() if word.startswith("dnt_"))
