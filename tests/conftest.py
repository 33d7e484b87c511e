"""Shared fixtures: real SQLite and PostgreSQL databases, settings, and a running node.

PostgreSQL: ``DICOM_NODE_TEST_POSTGRES_URL`` (a server URL whose user may create databases),
or else a throwaway cluster this session starts itself as the ``postgres`` user on a free
loopback port.  Every test that takes ``db_url`` runs on both databases.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pydicom.config
import pytest
from sqlalchemy import Engine

from dicom_node.config.settings import (
    DatabaseSettings,
    ModelSettings,
    NodeSettings,
    PeerSettings,
    SchedulerSettings,
    Settings,
    StorageSettings,
)
from dicom_node.db.migrate import upgrade
from dicom_node.db.session import make_engine
from dicom_node.inference.registry import install
from dicom_node.logs import configure_logging
from dicom_node.service import Node, start_node
from tests.helpers import SCU_AE, PostgresCluster, postgres_cluster, small_tmpfs_at

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _process_settings() -> None:
    """What the CLI sets for the node's process; tests run the node in-process too."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    configure_logging("INFO", "json")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server URL (without database name) for the whole test session (under
    pytest-xdist: one per worker process, each on its own port and folder)."""
    if os.environ.get("DICOM_NODE_TEST_POSTGRES_URL"):
        yield os.environ["DICOM_NODE_TEST_POSTGRES_URL"].rstrip("/")
        return
    with postgres_cluster("dicom-node-pg-", "max_connections=200") as cluster:
        yield cluster.server_url


@pytest.fixture
def own_postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of this test alone, for tests that stop and start the server
    (the session's one must never be stopped)."""
    with postgres_cluster("dicom-node-pg-own-") as cluster:
        yield cluster


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 40 MB tmpfs mounted at ``tmp_path / "store"``: a disk that really fills up."""
    with small_tmpfs_at(tmp_path / "store") as mount_point:
        yield mount_point


def _create_postgres_database(server_url: str) -> tuple[str, str]:
    name = f"test_{uuid.uuid4().hex[:12]}"
    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}", name


def _drop_postgres_database(server_url: str, name: str) -> None:
    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database, once on SQLite (a file, not :memory:) and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'node.db'}"
        return
    server = request.getfixturevalue("postgres_server")
    url, name = _create_postgres_database(server)
    try:
        yield url
    finally:
        _drop_postgres_database(server, name)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to head by the real migrations."""
    engine = make_engine(db_url)
    upgrade(engine)
    try:
        yield engine
    finally:
        engine.dispose()


MODEL_NAME = "densenet121-res224-all"


def make_release_file(path: Path, seed: int = 0) -> Path:
    """A checkpoint in the release format: a whole pickled xrv DenseNet with 18 outputs."""
    import torch
    import torchxrayvision as xrv

    torch.manual_seed(seed)
    torch.save(xrv.models.DenseNet(num_classes=18).eval(), path)
    return path


@pytest.fixture(scope="session")
def release_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_release_file(tmp_path_factory.mktemp("release") / "release.pt")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, release_file: Path) -> Path:
    """A models folder with the test checkpoint installed (verified) as the default model."""
    folder = tmp_path_factory.mktemp("models")
    install(folder, MODEL_NAME, release_file, "test checkpoint")
    return folder


def make_settings(
    root: Path, db_url: str = "", models_dir: Path | None = None, **sections: Any
) -> Settings:
    """Settings for a node in ``root`` that accepts ``SCU_AE`` from 127.0.0.1."""
    base = Settings(
        model=ModelSettings(models_dir=str(models_dir or root / "models"), batch_size=4),
        node=NodeSettings(ae_title="DICOM_NODE", host="127.0.0.1", port=0),
        storage=StorageSettings(root=str(root), min_free_mb=10),
        database=DatabaseSettings(url=db_url),
        peers=(
            PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
            PeerSettings(name="dcmtk", ae_title="STORESCU", host="127.0.0.1"),
        ),
        scheduler=SchedulerSettings(study_quiet_seconds=1.0, tick_seconds=0.2),
    )
    return dataclasses.replace(base, **sections)


@pytest.fixture
def node_factory(tmp_path: Path, db_url: str, models_dir: Path) -> Iterator[Any]:
    """Start nodes in this process (migrated database, port chosen by the OS); stops them."""
    nodes: list[Node] = []

    def start(roles: tuple[str, ...] = ("scp",), **sections: Any) -> Node:
        settings = make_settings(tmp_path / "store", db_url, models_dir, **sections)
        engine = make_engine(settings.database_url)
        upgrade(engine)
        engine.dispose()
        node = start_node(settings, roles, port=0, metrics_port=0)
        nodes.append(node)
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def node(node_factory: Any) -> Node:
    """A running SCP-only node (no scheduler: tests drive ticks themselves)."""
    return node_factory()


@pytest.fixture
def seeded(node_factory: Any) -> Iterator[Any]:
    """A node with every role, the worklist's sample studies analysed, users and tokens."""
    from tests.web_support import seed

    running = seed(node_factory)
    try:
        yield running
    finally:
        running.stop()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
