"""The store: atomic durable writes, validated paths, and refusal when space or database fail."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import psycopg
import pytest

from dicom_node.config.settings import DatabaseSettings, StorageSettings
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.errors import InvalidInstanceError, StorageError
from dicom_node.store import (
    DurableFolders,
    instance_relative_path,
    prepare_store,
    put_instance,
    write_atomic,
)
from tests.helpers import send_datasets, stored_relative_paths


@pytest.mark.parametrize(
    "bad", ["..", "1.2/../3", "1.2." + "3" * 61, "1.2\x003", "", "1..2", ".1.2", "1.2.", "1.2.a"]
)
def test_instance_path_refuses_anything_but_a_valid_uid(bad: str) -> None:
    with pytest.raises(InvalidInstanceError):
        instance_relative_path(bad, "1.2.3", "1.2.4")
    with pytest.raises(InvalidInstanceError):
        instance_relative_path("1.2.3", "1.2.3", bad)


def test_put_instance_writes_whole_file_and_no_temp(tmp_path: Path) -> None:
    prepare_store(tmp_path)
    relative = instance_relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    size, written = put_instance(tmp_path, [b"head", b"body"], relative, min_free_mb=0)
    assert written == relative and (tmp_path / relative).read_bytes() == b"headbody"
    assert size == 8 and list((tmp_path / "tmp").iterdir()) == []


def test_put_instance_never_replaces_a_file_another_copy_may_have_acknowledged(
    tmp_path: Path,
) -> None:
    # Two nodes on one shared storage root storing the same SOP Instance UID: the first file
    # stays as it is; the second copy goes beside it and the caller records where.
    prepare_store(tmp_path)
    relative = instance_relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    put_instance(tmp_path, [b"first"], relative, min_free_mb=0)
    _, second = put_instance(tmp_path, [b"second"], relative, min_free_mb=0)
    assert second != relative and second.endswith(".dcm")
    assert (tmp_path / relative).read_bytes() == b"first"
    assert (tmp_path / second).read_bytes() == b"second"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_remembered_folder_removed_since_is_made_again(tmp_path: Path) -> None:
    # The record of durable folders spares mkdir for a known folder; a folder removed behind
    # its back (an operator, another node's clean-up) must not turn the write into a failure.
    prepare_store(tmp_path)
    durable = DurableFolders()
    first = instance_relative_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    put_instance(tmp_path, [b"one"], first, min_free_mb=0, durable=durable)
    assert (tmp_path / first).parent in durable
    (tmp_path / first).unlink()
    (tmp_path / first).parent.rmdir()
    second = instance_relative_path("1.2.3", "1.2.3.4", "1.2.3.4.6")
    _, written = put_instance(tmp_path, [b"two"], second, min_free_mb=0, durable=durable)
    assert (tmp_path / written).read_bytes() == b"two"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_durable_folders_stay_bounded(tmp_path: Path) -> None:
    durable = DurableFolders(capacity=3)
    for index in range(10):
        durable.add(tmp_path / str(index))
    assert tmp_path / "0" not in durable and tmp_path / "9" in durable
    assert sum(tmp_path / str(index) in durable for index in range(10)) == 3


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    prepare_store(tmp_path)
    blocker = tmp_path / "instances" / "1.2.3"
    blocker.write_bytes(b"a file where a folder must go")
    with pytest.raises(StorageError):
        write_atomic(tmp_path, blocker / "1.2.4" / "1.2.5.dcm", [b"data"])
    assert list((tmp_path / "tmp").iterdir()) == []


def test_prepare_store_removes_only_temp_files_of_dead_processes(tmp_path: Path) -> None:
    import os
    import socket
    import subprocess

    (tmp_path / "tmp").mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    (tmp_path / "tmp" / f"{host}~{dead.pid}~abc.part").write_bytes(b"half")
    alive = tmp_path / "tmp" / f"{host}~{os.getppid()}~def.part"
    alive.write_bytes(b"being written by a live process")
    assert prepare_store(tmp_path) == 1
    assert list((tmp_path / "tmp").iterdir()) == [alive]


def test_low_free_space_answers_a700_leaves_nothing_and_recovers_without_restart(
    small_tmpfs: Path, node_factory: Any
) -> None:
    node = node_factory(storage=StorageSettings(root=str(small_tmpfs), min_free_mb=10))
    assert send_datasets(node.scp_port, [make_cxr_dataset(rows=64, columns=64)]) == [0]
    ballast = small_tmpfs / "ballast"
    ballast.write_bytes(b"\0" * (35 * 1024 * 1024))  # leaves < 10 MB free
    refused = make_cxr_dataset(rows=64, columns=64)
    assert send_datasets(node.scp_port, [refused]) == [0xA700]
    assert len(stored_relative_paths(small_tmpfs)) == 1
    assert list((small_tmpfs / "tmp").iterdir()) == []
    ballast.unlink()
    assert send_datasets(node.scp_port, [refused]) == [0]
    assert len(stored_relative_paths(small_tmpfs)) == 2


def _block_database(db_url: str) -> Any:
    """Make the database refuse the node; returns a function that lets it back in."""
    if db_url.startswith("sqlite"):
        holder = sqlite3.connect(db_url.split("///", 1)[1], isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # held past the node's busy timeout
        return lambda: (holder.execute("COMMIT"), holder.close())
    server, name = db_url.rsplit("/", 1)
    admin = psycopg.connect(f"{server.replace('+psycopg', '')}/postgres", autocommit=True)
    admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
    )
    return lambda: (admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'), admin.close())


def test_database_unavailable_answers_a700_and_recovers(node_factory: Any, db_url: str) -> None:
    node = node_factory(database=DatabaseSettings(url=db_url, busy_timeout_ms=300))
    assert send_datasets(node.scp_port, [make_cxr_dataset(rows=32, columns=32)]) == [0]
    release = _block_database(db_url)
    refused = make_cxr_dataset(rows=32, columns=32)
    try:
        assert send_datasets(node.scp_port, [refused]) == [0xA700]
    finally:
        release()
    assert send_datasets(node.scp_port, [refused]) == [0]
    root = Path(node.settings.storage.root)
    assert list((root / "tmp").iterdir()) == []
    assert len(stored_relative_paths(root)) == 2
