"""The JSON API: a valid OpenAPI schema, token scopes, results and feedback, and a bounded
schemathesis run that finds no server error."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import schemathesis
from sqlalchemy import select

from dicom_node.db.models import AuditEvent
from dicom_node.db.session import session_scope
from tests.web_support import Seeded, login, seed

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


def _sop_of(part10: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(part10)).SOPInstanceUID)


def test_openapi_schema_is_public_valid_and_every_data_route_needs_a_token(seeded: Seeded) -> None:
    raw = httpx.get(f"{seeded.url}/openapi.json").json()
    schemathesis.openapi.from_dict(raw).validate()  # the OpenAPI 3.x meta-schema
    assert raw["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operations = [(method.upper(), path) for path, item in raw["paths"].items() for method in item]
    assert len(operations) == 6 and all(p.startswith("/api/v1/") for _, p in operations)
    study = seeded.uids["critical_old"]
    for method, path in operations:
        url = seeded.url + path.replace("{study_instance_uid}", study).replace(
            "{sop_instance_uid}", "1.2.3"
        )
        assert httpx.request(method, url).status_code == 401, path
        assert "security" in raw["paths"][path][method.lower()], path


def test_api_serves_worklist_results_and_feedback_and_read_tokens_cannot_write(
    seeded: Seeded,
) -> None:
    read = httpx.Client(
        base_url=seeded.url, headers={"Authorization": f"Bearer {seeded.read_token}"}
    )
    write = httpx.Client(
        base_url=seeded.url, headers={"Authorization": f"Bearer {seeded.write_token}"}
    )
    items = read.get("/api/v1/worklist").json()["items"]
    assert [i["study_instance_uid"] for i in items] == [
        seeded.uids["script"],
        seeded.uids["critical_old"],
        seeded.uids["lateral"],
    ]
    assert [i["priority"] for i in items] == ["critical", "critical", "routine"]
    assert items[2]["status"] == "not_analysed" and "lateral" in items[2]["status_detail"]
    done = read.get("/api/v1/worklist", params={"status": "done"}).json()["items"]
    assert len(done) == 2 and all(i["status"] == "done" for i in done)
    assert seeded.uids["lateral"] not in {i["study_instance_uid"] for i in done}
    assert read.get("/api/v1/worklist", params={"status": "bogus"}).status_code == 422
    study = seeded.uids["critical_old"]
    result = read.get(f"/api/v1/studies/{study}").json()
    assert result["notice"] == "AI result – decision support"
    assert len(result["model"]["weights_sha256"]) == 64
    pneumothorax = next(f for f in result["findings"] if f["label"] == "Pneumothorax")
    assert pneumothorax["threshold"] == 0.01 and pneumothorax["decision"] == "positive"
    assert {o["kind"] for o in result["outputs"]} == {"sr", "sc"}
    assert result["deliveries"][0]["peer"] == "pacs"
    _downloads_are_part10_files_audited_and_the_heatmap_is_not_cached(seeded, read, study, result)
    body = {"label": "Pneumothorax", "verdict": "disagree", "comment": "no pleural line"}
    assert read.post(f"/api/v1/studies/{study}/feedback", json=body).status_code == 403
    created = write.post(f"/api/v1/studies/{study}/feedback", json=body)
    assert created.status_code == 201 and created.json()["username"] == "token:ris-writer"
    assert (
        write.post(
            f"/api/v1/studies/{study}/feedback", json={**body, "label": "Not A Finding"}
        ).status_code
        == 422
    )
    assert write.post("/api/v1/studies/1.2.3/feedback", json=body).status_code == 404
    listed = read.get(f"/api/v1/studies/{study}/feedback").json()
    assert [(f["verdict"], f["comment"]) for f in listed] == [("disagree", "no pleural line")]
    assert len(read.get("/api/v1/feedback").json()) == 1


def _downloads_are_part10_files_audited_and_the_heatmap_is_not_cached(
    seeded: Any, read: httpx.Client, study: str, result: dict[str, Any]
) -> None:
    for output in result["outputs"]:  # a token client can fetch what the API advertises
        assert output["download_url"] == (
            f"/api/v1/studies/{study}/outputs/{output['sop_instance_uid']}"
        )
        downloaded = read.get(output["download_url"])
        assert downloaded.status_code == 200, downloaded.text
        assert downloaded.headers["content-type"] == "application/dicom"
        assert downloaded.content[128:132] == b"DICM"  # a Part 10 file
        assert _sop_of(downloaded.content) == output["sop_instance_uid"]
    assert read.get(f"/api/v1/studies/{study}/outputs/1.2.3").status_code == 404
    rad = login(seeded.url)  # the study page's own SR link returns the file too
    sr = next(o for o in result["outputs"] if o["kind"] == "sr")
    page_sr = rad.get(f"/studies/{study}/outputs/{sr['sop_instance_uid']}.dcm")
    assert page_sr.status_code == 200 and page_sr.content[128:132] == b"DICM"
    assert pydicom.dcmread(io.BytesIO(page_sr.content)).Modality == "SR"
    heatmap = rad.get(f"/studies/{study}/image.png", params={"finding": "Pneumothorax"})
    assert heatmap.status_code == 200 and heatmap.headers["cache-control"] == "no-store"
    with session_scope(seeded.node.session_factory) as session:
        audited = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.event_type == "output.downloaded")
            .order_by(AuditEvent.id)
        ).all()
    assert [a.username for a in audited] == ["token:ris", "token:ris", "rad"]


def test_schemathesis_run_with_a_token_finds_no_server_error(
    node_factory: Any, db_url: str, tmp_path: Path
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("one database is enough for the fuzzing run; the routes are the same")
    seeded = seed(node_factory)
    try:
        result = subprocess.run(
            [
                str(SCHEMATHESIS),
                "run",
                f"{seeded.url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "15",
                "--seed",
                "1",
                "--phases",
                "examples,coverage,fuzzing",
                "--no-color",
                "--generation-database",
                "none",
                "-H",
                f"Authorization: Bearer {seeded.write_token}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,  # its cache stays there
            env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
        )
        assert result.returncode == 0, result.stdout[-4000:]
        assert "No issues found" in result.stdout and "Tested: 6" in result.stdout
    finally:
        seeded.stop()
