"""Many senders at once: 20 concurrent associations against a ``serve`` node, on SQLite (one
writer, so the others must queue on the busy timeout, not fail) and on PostgreSQL (a pool of
connections shared by the association threads).  Every instance is answered with success, and
every acknowledged instance has its row and its file, counted once in its study."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.config.settings import ScpSettings
from dicom_node.db.models import Event, Instance, Series, Study
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.store import sha256_of
from tests.conftest import wait_until
from tests.helpers import (
    NodeProcess,
    free_port,
    run_cli,
    send_datasets,
    split_file,
    write_config,
)

SENDERS = 20
PER_SENDER = 5
STUDIES = 4  # each study gets instances from SENDERS / STUDIES associations at once
# What a node must never say under load: a writer that failed instead of queueing, a pool
# that ran dry, or a C-STORE answered with anything but success.
FAILURE_WORDS = (
    "database is locked",
    "OperationalError",
    "TimeoutError",
    "QueuePool limit",
    "store.refused",
    "store.internal_error",
    "event.not_recorded",
    "audit.transfer_not_recorded",
)


def _batches() -> list[list[Dataset]]:
    """``SENDERS`` lists of ``PER_SENDER`` small CR instances; sender ``i`` adds to study
    ``i % STUDIES``, so several associations add to one study at the same time."""
    studies = [make_cxr_dataset(modality="CR", rows=8, columns=8) for _ in range(STUDIES)]
    batches = []
    for sender in range(SENDERS):
        study = studies[sender % STUDIES]
        batch = []
        for index in range(PER_SENDER):
            ds = make_cxr_dataset(
                modality="CR",
                rows=64,
                columns=64,
                study_instance_uid=study.StudyInstanceUID,
                series_instance_uid=study.SeriesInstanceUID,
                seed=sender * PER_SENDER + index,
            )
            ds.InstanceNumber = sender * PER_SENDER + index + 1
            batch.append(ds)
        batches.append(batch)
    return batches


def _send_at_once(port: int, batches: list[list[Dataset]]) -> dict[str, int | None]:
    """Each batch over its own association, all started together; status by SOP Instance UID."""
    start = threading.Barrier(len(batches))

    def send(batch: list[Dataset]) -> list[int | None]:
        start.wait(timeout=60)
        return send_datasets(port, batch)

    with ThreadPoolExecutor(len(batches)) as pool:
        answers = list(pool.map(send, batches))
    return {
        str(ds.SOPInstanceUID): status
        for batch, statuses in zip(batches, answers, strict=True)
        for ds, status in zip(batch, statuses, strict=True)
    }


@pytest.fixture
def busy_node(tmp_path: Path, db_url: str) -> Iterator[tuple[NodeProcess, int, Path]]:
    """A ``serve`` node (SCP role) that allows exactly ``SENDERS`` associations."""
    port = free_port()
    root = tmp_path / "store"
    config = write_config(
        tmp_path / "node.toml",
        root=root,
        db_url=db_url,
        port=port,
        quiet_seconds=3600,
        extra=f"[scp]\nmax_associations = {SENDERS}\n",
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    node = NodeProcess(config, tmp_path / "node.log")
    node.start(port, 60, "scp")
    try:
        yield node, port, root
    finally:
        node.stop()


@pytest.mark.slow
def test_twenty_concurrent_associations_store_every_instance_once(
    busy_node: tuple[NodeProcess, int, Path], db_url: str
) -> None:
    node, port, root = busy_node
    batches = _batches()
    statuses = _send_at_once(port, batches)
    assert len(statuses) == SENDERS * PER_SENDER
    assert {uid: s for uid, s in statuses.items() if s != 0x0000} == {}
    assert node.stop() == 0  # every association's audit rows written before the check
    engine = make_engine(db_url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
            studies = {row.study_instance_uid: row for row in session.scalars(select(Study))}
            series = list(session.scalars(select(Series)))
            bad_events = [
                (event.name, event.detail)
                for event in session.scalars(select(Event).where(Event.level == "error"))
            ]
    finally:
        engine.dispose()
    assert set(rows) == set(statuses)  # none lost, none extra
    for row in rows.values():
        stored = root / row.path
        assert stored.is_file()
        assert sha256_of(split_file(stored, row.sop_class_uid).payload) == row.sha256
    assert len(studies) == STUDIES and len(series) == STUDIES
    per_study = SENDERS * PER_SENDER // STUDIES
    assert {uid: study.instance_count for uid, study in studies.items()} == dict.fromkeys(
        studies, per_study
    )
    assert bad_events == []
    assert list((root / "tmp").iterdir()) == []
    log = node.log_path.read_text()
    assert [word for word in FAILURE_WORDS if word in log] == []


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def _settled(node: Any) -> bool:
    """No association left running (their threads are gone)."""
    return not node.server.active_associations


def test_concurrent_associations_leave_no_open_files_or_threads_behind(node_factory: Any) -> None:
    """Each association's sockets, wake-up pipe and threads go with it: after a second round
    of concurrent associations the node holds what it held after the first (which filled the
    connection pool and started the hash workers)."""
    node = node_factory(scp=ScpSettings(max_associations=SENDERS))
    _send_at_once(node.scp_port, _batches())
    assert wait_until(lambda: _settled(node), timeout=30)
    files, threads = _open_files(), threading.active_count()
    statuses = _send_at_once(node.scp_port, _batches())
    assert set(statuses.values()) == {0x0000}
    assert wait_until(lambda: _settled(node), timeout=30)
    assert wait_until(lambda: threading.active_count() == threads, timeout=30), (
        threading.active_count(),
        threads,
    )
    assert _open_files() == files
