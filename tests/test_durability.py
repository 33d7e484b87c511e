"""Nothing acknowledged is ever lost: kill -9 during a send, then restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from dicom_node.db.models import Instance
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.dev.samples import DX_PRESENTATION_STORAGE, make_cxr_dataset
from dicom_node.store import file_sha256, sha256_of
from tests.helpers import (
    NODE_AE,
    SCU_AE,
    NodeProcess,
    free_port,
    run_cli,
    send_datasets,
    split_file,
    write_config,
)


def _send_until_dead(port: int, datasets: list[pydicom.Dataset], acknowledged: list[str]) -> None:
    ae = AE(ae_title=SCU_AE)
    ae.add_requested_context(DX_PRESENTATION_STORAGE)
    ae.dimse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
    for ds in datasets:
        if not assoc.is_established:
            return
        status = assoc.send_c_store(ds)
        if "Status" in status and status.Status == 0x0000:
            acknowledged.append(str(ds.SOPInstanceUID))
    if assoc.is_established:
        assoc.release()


@pytest.mark.slow
def test_kill_9_during_200_instance_send_loses_no_acknowledged_instance(
    tmp_path: Path, db_url: str
) -> None:
    port, root = free_port(), tmp_path / "store"
    config = write_config(tmp_path / "n.toml", root=root, db_url=db_url, port=port)
    assert run_cli(config, "db", "upgrade").returncode == 0
    study = make_cxr_dataset(rows=8, columns=8).StudyInstanceUID
    datasets = [
        make_cxr_dataset(rows=256, columns=256, seed=i, study_instance_uid=study)
        for i in range(200)
    ]
    node = NodeProcess(config, tmp_path / "node.log")
    node.start(port, 30, "scp")
    acknowledged: list[str] = []
    sender = threading.Thread(target=_send_until_dead, args=(port, datasets, acknowledged))
    sender.start()
    deadline = time.monotonic() + 120
    while len(acknowledged) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    node.kill()
    sender.join(timeout=60)
    assert 60 <= len(acknowledged) < 200, "the kill must land mid-send"

    engine = make_engine(db_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
        for sop_instance_uid in acknowledged:  # every 0x0000 is in the database and on disk
            row = rows[sop_instance_uid]
            assert (
                sha256_of(split_file(root / row.path, DX_PRESENTATION_STORAGE).payload)
                == row.sha256
            )
        for path in (root / "instances").rglob("*.dcm"):  # no file is half-written
            pydicom.dcmread(path)
            assert file_sha256(path)
    finally:
        engine.dispose()

    node.start(port, 30, "scp")  # restart: temp files cleared, everything resent is accepted once
    try:
        assert list((root / "tmp").iterdir()) == []
        assert send_datasets(port, datasets) == [0] * 200
        status = run_cli(config, "status")
        assert "instances: 200" in status.stdout
    finally:
        assert node.stop() == 0
