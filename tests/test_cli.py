"""The dicom-node command: exit codes, messages, and the serve life cycle, as a subprocess."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dicom_node.dev.samples import make_cxr_dataset
from tests.helpers import NodeProcess, free_port, run_cli, send_datasets, write_config


def test_serve_refuses_unmigrated_database_and_prints_the_fix(tmp_path: Path, db_url: str) -> None:
    config = write_config(tmp_path / "n.toml", root=tmp_path / "s", db_url=db_url, port=free_port())
    result = run_cli(config, "serve")
    assert result.returncode == 1
    assert "run `dicom-node db upgrade`" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_value_exits_2_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[node]\nport = 99999\n")
    result = run_cli(config, "config", "check")
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: node.port = 99999: must be an integer 1-65535"


def test_unreachable_database_exits_1_without_traceback(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "n.toml",
        root=tmp_path / "s",
        port=free_port(),
        db_url="postgresql+psycopg://nobody@127.0.0.1:1/none",
    )
    result = run_cli(config, "db", "upgrade")
    assert result.returncode == 1
    assert "database unavailable" in result.stderr and "Traceback" not in result.stderr


def test_serve_role_web_serves_the_worklist_login_until_sigterm(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    import httpx

    web_port = free_port()
    config = write_config(
        tmp_path / "n.toml", root=tmp_path / "s", db_url="", port=free_port(), web_port=web_port
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "dicom_node", "--config", str(config), "serve", "--role", "web"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline, status = time.monotonic() + 60, None
        while time.monotonic() < deadline and status is None and process.poll() is None:
            try:
                status = httpx.get(f"http://127.0.0.1:{web_port}/login").status_code
            except httpx.TransportError:
                time.sleep(0.2)
        assert status == 200
        assert httpx.get(f"http://127.0.0.1:{web_port}/api/v1/worklist").status_code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0
    access = [line for line in stderr.splitlines() if "GET /login HTTP/1.1" in line]
    assert access and all(line.startswith("{") for line in access)  # through our JSON logging


def test_worker_refuses_to_start_without_weights_and_names_the_fix(tmp_path: Path) -> None:
    config = write_config(tmp_path / "n.toml", root=tmp_path / "s", db_url="", port=free_port())
    assert run_cli(config, "db", "upgrade").returncode == 0
    result = run_cli(config, "serve")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: no weights installed for densenet121-res224-all: run `dicom-node models pull "
        "densenet121-res224-all` (or `dicom-node models import FILE --name "
        "densenet121-res224-all` on a site without internet access)"
    )


def test_upgrade_serve_status_and_clean_stop(tmp_path: Path, db_url: str, models_dir: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "n.toml", root=tmp_path / "s", db_url=db_url, port=port, models_dir=models_dir
    )
    upgraded = run_cli(config, "db", "upgrade")
    assert upgraded.returncode == 0 and "(head)" in upgraded.stdout
    node = NodeProcess(config, tmp_path / "node.log")
    node.start(port)
    try:
        first = make_cxr_dataset(rows=32, columns=32)
        lateral = make_cxr_dataset(
            rows=32, columns=32, view_position="LL", study_instance_uid=first.StudyInstanceUID
        )
        assert send_datasets(port, [first, lateral]) == [0, 0]
        status = run_cli(config, "status")
        assert status.returncode == 0
        assert "studies: 1" in status.stdout and "instances: 2" in status.stdout
    finally:
        assert node.stop() == 0
    log = (tmp_path / "node.log").read_text()
    assert '"event": "node.stopped"' in log and "Traceback" not in log


def test_interactive_commands_print_human_text_not_json_log_lines(tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "n.toml",
        root=tmp_path / "s",
        port=free_port(),
        db_url=f"sqlite:///{tmp_path / 'n.db'}",
    )
    upgraded = run_cli(config, "db", "upgrade")
    assert upgraded.returncode == 0
    assert upgraded.stdout.startswith("database at revision ")
    # alembic's "Running upgrade ..." progress and any JSON log line stay out of a person's way
    assert "Running upgrade" not in upgraded.stderr and "{" not in upgraded.stderr
    status = run_cli(config, "status")
    assert status.returncode == 0 and status.stderr == ""
    assert status.stdout.splitlines()[0] == "studies: 0"


def test_debug_send_stores_compressed_files_in_their_own_syntax_and_reports_the_rest(
    tmp_path: Path, node: Any, shared_data: Path
) -> None:
    import shutil

    from sqlalchemy import func, select

    from dicom_node.db.models import Instance
    from dicom_node.db.session import make_engine

    cxr = shared_data / "dicom" / "cxr"
    folder = tmp_path / "study"
    folder.mkdir()
    for name in ("966_fixed_DX_chest_J2KR.dcm", "WG04_RG1_J2KI.dcm"):  # JPEG 2000 lossless, lossy
        shutil.copy(cxr / name, folder / name)
    (folder / "notes.txt").write_text("not DICOM")
    config = write_config(tmp_path / "n.toml", root=tmp_path / "s", db_url="", port=node.scp_port)
    sent = run_cli(config, "debug", "send", str(folder), "--calling", "TEST_SCU")
    assert sent.returncode == 1  # one file was not sent
    lines = sent.stdout.splitlines()
    assert sum(line.startswith("sent  ") and "0x0000 success" in line for line in lines) == 2
    assert any(
        line.startswith("NOT SENT  ") and "notes.txt: not a DICOM Part 10 file" in line
        for line in lines
    )
    assert lines[-1] == "2 of 3 files stored by the node"
    engine = make_engine(node.settings.database_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(select(func.count()).select_from(Instance)) == 2
    finally:
        engine.dispose()
