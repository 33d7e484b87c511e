"""No patient name, ID or birth date in any log line, at DEBUG, on success and error paths."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom.dsutils import encode

from dicom_node.dev.samples import make_cxr_dataset
from tests.conftest import wait_until
from tests.helpers import (
    NodeProcess,
    RawInstance,
    associate,
    free_port,
    run_cli,
    send_datasets,
    send_raw,
    write_config,
)
from tests.peers import PACS_AE, ScriptedPacs

CANARIES = ("CANARY^PHI", "CANARY", "PHI-CANARY-123", "19010203")


def _canary(**kwargs: object) -> pydicom.Dataset:
    return make_cxr_dataset(
        rows=32, columns=32, patient_name="CANARY^PHI", patient_id="PHI-CANARY-123", **kwargs
    )  # type: ignore[arg-type]


def test_phi_canary_never_reaches_the_logs_at_debug(
    tmp_path: Path, db_url: str, models_dir: Path
) -> None:
    port, pacs = free_port(), ScriptedPacs()
    config = write_config(
        tmp_path / "n.toml",
        root=tmp_path / "s",
        db_url=db_url,
        port=port,
        level="DEBUG",
        quiet_seconds=0.5,
        models_dir=models_dir,
        extra=f'[[peers]]\nname = "pacs"\nae_title = "{PACS_AE}"\n'
        f'host = "127.0.0.1"\nport = {pacs.port}\nsend_results = true\n',
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    node = NodeProcess(config, tmp_path / "node.log")
    node.start(port)
    try:
        one_name = _canary(seed=3)  # SR and SC built and delivered, logged at DEBUG
        one_name.PatientName = "CANARY"  # a one-part name: highdicom warns, quoting it
        assert send_datasets(port, [one_name]) == [0]
        stored = _canary()
        stored.PatientBirthDate = "19010203"
        conflict = _canary(
            seed=9,
            study_instance_uid=stored.StudyInstanceUID,
            series_instance_uid=stored.SeriesInstanceUID,
            sop_instance_uid=stored.SOPInstanceUID,
        )
        discarded = _canary()
        discarded.SOPClassUID = discarded.file_meta.MediaStorageSOPClassUID = (
            "1.2.840.10008.5.1.4.1.1.2"
        )
        assert send_datasets(port, [stored, stored, conflict, discarded]) == [0, 0, 0, 0]
        mismatched = _canary()
        assoc = associate(port, [str(mismatched.SOPClassUID)])
        payload = encode(mismatched, True, True)
        assert (
            send_raw(
                assoc,
                RawInstance(
                    str(mismatched.SOPClassUID),
                    "1.2.3.4",
                    str(assoc.accepted_contexts[0].transfer_syntax[0]),
                    payload,
                ),
            )
            == 0xA900
        )
        garbage = payload[:200] + b"\xff" * 64
        assert send_raw(
            assoc,
            RawInstance(
                str(mismatched.SOPClassUID),
                "1.2.3.5",
                str(assoc.accepted_contexts[0].transfer_syntax[0]),
                garbage,
            ),
        ) in (0xC000, 0xA900)
        assoc.release()
        time.sleep(1.5)  # let the scheduler close the study, logging at DEBUG
        assert wait_until(lambda: len(pacs.received) >= 2, timeout=120)
    finally:
        node.stop()
        pacs.stop()
    log = (tmp_path / "node.log").read_text()
    assert '"event": "instance.stored"' in log and '"event": "study.closed"' in log
    assert '"event": "store.refused"' in log and '"level": "debug"' in log
    assert '"kind": "delivery", "outcome": "done"' in log
    for canary in CANARIES:
        assert canary not in log, f"{canary!r} leaked into the log"


@pytest.mark.parametrize("key", ["patient_name", "patient_id", "PatientBirthDate"])
def test_phi_keys_are_dropped_even_if_a_developer_logs_them(
    key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import structlog

    from dicom_node.logs import configure_logging

    # The session's stream, restored after: capsys's own is closed when this test ends, and
    # threads of later tests would log into it ("I/O operation on closed file").
    session_stream = logging.getLogger().handlers[0].stream
    configure_logging("DEBUG", "json")
    try:
        structlog.get_logger("test").info("oops", **{key: "CANARY^PHI"})
        captured = capsys.readouterr()
    finally:
        configure_logging("INFO", "json", stream=session_stream)
    assert "oops" in captured.err and "CANARY" not in captured.err


def test_phi_canary_never_reaches_the_logs_from_the_web_worklist_api_and_export(
    tmp_path: Path, db_url: str, models_dir: Path
) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("what the web role logs does not depend on the database; one run is enough")
    import subprocess
    import sys

    import httpx

    from tests.helpers import REPO
    from tests.web_support import csrf_from

    port, web_port = free_port(), free_port()
    config = write_config(
        tmp_path / "n.toml",
        root=tmp_path / "s",
        db_url=db_url,
        port=port,
        level="DEBUG",
        quiet_seconds=0.5,
        models_dir=models_dir,
        web_port=web_port,
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    assert (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "dicom_node",
                "--config",
                str(config),
                "users",
                "add",
                "rad",
                "--role",
                "admin",
            ],
            input="a long password\n",
            text=True,
            capture_output=True,
            cwd=REPO,
        ).returncode
        == 0
    )
    token = run_cli(config, "users", "token", "ris", "--scope", "write").stdout.split()[-1]
    node = NodeProcess(config, tmp_path / "node.log")
    node.start(port)
    try:
        study = _canary(seed=4)
        assert send_datasets(port, [study]) == [0]
        uid = str(study.StudyInstanceUID)
        api = httpx.Client(
            base_url=f"http://127.0.0.1:{web_port}", headers={"Authorization": f"Bearer {token}"}
        )
        assert wait_until(
            lambda: api.get(f"/api/v1/studies/{uid}").json()["study"]["status"] == "done",
            timeout=120,
        )
        assert "CANARY^PHI" in api.get("/api/v1/worklist").text
        body = {"label": "Pneumothorax", "verdict": "agree", "comment": "CANARY^PHI seen"}
        assert api.post(f"/api/v1/studies/{uid}/feedback", json=body).status_code == 201
        browser = httpx.Client(base_url=f"http://127.0.0.1:{web_port}")
        login = browser.get("/login")
        assert (
            browser.post(
                "/login",
                data={
                    "username": "rad",
                    "password": "a long password",
                    "csrf_token": csrf_from(login.text),
                },
            ).status_code
            == 303
        )
        for path in (
            "/worklist",
            f"/studies/{uid}",
            f"/studies/{uid}/image.png?finding=Edema",
            "/feedback.csv",
            "/admin",
            "/studies/1.2.3",
        ):
            assert browser.get(path).status_code in (200, 404), path
        assert "PHI-CANARY-123" in browser.get("/worklist").text
        assert "CANARY^PHI seen" in browser.get("/feedback.csv").text
    finally:
        node.stop()
    log = (tmp_path / "node.log").read_text()
    assert f"GET /studies/{uid} HTTP/1.1" in log and '"level": "debug"' in log
    for canary in CANARIES:
        assert canary not in log, f"{canary!r} leaked into the log"


def test_json_log_lines_carry_no_terminal_colour_codes() -> None:
    import io
    import json

    from dicom_node.logs import configure_logging

    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    try:  # what uvicorn does when it starts: a plain message plus a coloured copy as an extra
        logging.getLogger("uvicorn.error").info(
            "Uvicorn running on %s",
            "http://127.0.0.1:8080",
            extra={"color_message": "Uvicorn running on \x1b[1m%s\x1b[0m"},
        )
    finally:
        configure_logging("INFO", "json")
    line = json.loads(stream.getvalue().strip().splitlines()[-1])
    assert line["event"] == "Uvicorn running on http://127.0.0.1:8080"
    assert "color_message" not in line and "\x1b" not in stream.getvalue()
