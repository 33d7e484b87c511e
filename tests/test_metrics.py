"""Metrics and health checks: a real scrape over HTTP, parsed by prometheus_client's parser,
counts what was really sent; /readyz names the check that fails (storage, database, model)."""

from __future__ import annotations

import shutil
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom.dsutils import encode
from sqlalchemy import func, select

from dicom_node import __version__
from dicom_node.clock import utcnow
from dicom_node.config.settings import PeerSettings, SchedulerSettings
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import Delivery, Instance, Job
from dicom_node.db.session import make_engine, session_scope
from dicom_node.dev.samples import CR_STORAGE, make_cxr_dataset
from dicom_node.ops.metrics.collect import QUEUE_STATES
from dicom_node.service import start_node
from dicom_node.studies import close_quiet_studies
from tests.conftest import make_settings, wait_until
from tests.helpers import (
    SCU_AE,
    NodeProcess,
    PostgresCluster,
    RawInstance,
    free_port,
    run_cli,
    send_datasets,
    send_raw_one,
    split_file,
    write_config,
)
from tests.peers import ScriptedPacs

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(base_url: str) -> Samples:
    """GET /metrics and parse it with prometheus_client's own parser."""
    response = httpx.get(f"{base_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def _queue_counts(factory: Any) -> dict[tuple[str, str], int]:
    with session_scope(factory) as session:
        rows = session.execute(
            select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state)
        ).all()
    return {(kind, state): count for kind, state, count in rows}


def test_scrape_counts_instances_bytes_statuses_and_queue_depth_as_sent(
    node: Any, shared_data: Path
) -> None:
    raws = [
        split_file(path, CR_STORAGE)
        for path in sorted((shared_data / "dicom" / "cxr").glob("*.dcm"))
    ]
    assert [send_raw_one(node.scp_port, raw) for raw in raws] == [0x0000] * len(raws)
    assert send_raw_one(node.scp_port, raws[0]) == 0x0000  # an identical resend: not new
    ds = make_cxr_dataset(rows=32, columns=32)
    uid = str(ds.SOPInstanceUID)
    other = uid[:-1] + ("1" if uid[-1] != "1" else "2")  # the command names another instance
    mismatched = RawInstance(
        str(ds.SOPClassUID), other, ExplicitVRLittleEndian, encode(ds, False, True)
    )
    assert send_raw_one(node.scp_port, mismatched) == 0xA900
    garbage = RawInstance(
        CR_STORAGE, "1.2.3.4", ExplicitVRLittleEndian, b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 300
    )
    assert send_raw_one(node.scp_port, garbage) == 0xC000
    later = utcnow().replace(year=utcnow().year + 1)
    close_quiet_studies(node.session_factory, quiet_seconds=1, max_attempts=3, now=later)

    samples = scrape(node.metrics_url)
    root = Path(node.settings.storage.root)
    with session_scope(node.session_factory) as session:
        rows = list(session.scalars(select(Instance)))
    assert len(rows) == len(raws)
    on_disk = sum((root / row.path).stat().st_size for row in rows)
    assert on_disk == sum(row.size_bytes for row in rows)
    assert value(samples, "dicom_node_received_bytes_total") == on_disk
    by_class: dict[str, int] = {}
    for row in rows:
        by_class[row.sop_class_uid] = by_class.get(row.sop_class_uid, 0) + 1
    for sop_class, count in by_class.items():
        assert value(samples, "dicom_node_instances_received_total", sop_class=sop_class) == count
    assert sum(
        v for (name, _), v in samples.items() if name == "dicom_node_instances_received_total"
    ) == len(raws)
    assert value(samples, "dicom_node_cstore_responses_total", status="0x0000") == len(raws) + 1
    assert value(samples, "dicom_node_cstore_responses_total", status="0xA900") == 1
    assert value(samples, "dicom_node_cstore_responses_total", status="0xC000") == 1
    counts = _queue_counts(node.session_factory)
    assert counts[("analysis", "queued")] >= 1
    for kind in ("analysis", "delivery"):
        for state in QUEUE_STATES:
            assert value(samples, "dicom_node_queue_jobs", kind=kind, state=state) == counts.get(
                (kind, state), 0
            )
    assert value(samples, "dicom_node_up") == 1
    free = value(samples, "dicom_node_storage_free_bytes")
    assert abs(free - shutil.disk_usage(root).free) < 512 * 1024 * 1024
    assert value(samples, "dicom_node_info", roles="scp", version=__version__) == 1
    health = httpx.get(f"{node.metrics_url}/healthz")
    assert (health.status_code, health.text) == (200, "ok\n")
    ready = httpx.get(f"{node.metrics_url}/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "checks": {"database": "ok", "storage": "ok"},
        "failed": [],
    }


def test_readyz_names_storage_when_the_storage_root_is_replaced_by_a_file(node: Any) -> None:
    root = Path(node.settings.storage.root)
    assert httpx.get(f"{node.metrics_url}/readyz").status_code == 200
    moved = root.with_name("store-moved")
    root.rename(moved)
    root.write_bytes(b"not a folder")  # root may write anywhere: chmod would not stop it
    try:
        ready = httpx.get(f"{node.metrics_url}/readyz")
        assert ready.status_code == 503
        body = ready.json()
        assert body["failed"] == ["storage"] and body["ready"] is False
        assert body["checks"]["database"] == "ok"
        assert "not writable" in body["checks"]["storage"]
        assert value(scrape(node.metrics_url), "dicom_node_up") == 1  # the scrape still works
    finally:
        root.unlink()
        moved.rename(root)
    assert httpx.get(f"{node.metrics_url}/readyz").status_code == 200


def test_readyz_names_database_and_scrape_reports_down_when_postgresql_is_stopped(
    own_postgres: PostgresCluster, tmp_path: Path, models_dir: Path
) -> None:
    url, stop_server = own_postgres.url, own_postgres.stop
    settings = make_settings(tmp_path / "store", url, models_dir)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    node = start_node(settings, ("scp", "web"), port=0, web_port=0, metrics_port=0)
    try:
        assert send_datasets(node.scp_port, [make_cxr_dataset(rows=32, columns=32)]) == [0]
        before = scrape(node.metrics_url)
        assert value(before, "dicom_node_up") == 1
        assert httpx.get(f"{node.web_url}/readyz").status_code == 200
        stop_server()
        for base_url in (node.metrics_url, node.web_url):  # the same checks on both
            ready = httpx.get(f"{base_url}/readyz", timeout=60)
            assert ready.status_code == 503, base_url
            body = ready.json()
            assert body["failed"] == ["database"] and body["checks"]["storage"] == "ok"
            assert "database unavailable" in body["checks"]["database"]
            assert httpx.get(f"{base_url}/healthz").status_code == 200
        after = scrape(node.metrics_url)
        assert value(after, "dicom_node_up") == 0
        assert "dicom_node_queue_jobs" not in names(after)
        assert value(after, "dicom_node_storage_free_bytes") > 0
        assert (
            value(after, "dicom_node_received_bytes_total")
            == value(before, "dicom_node_received_bytes_total")
            > 0
        )
    finally:
        node.stop()


def _settled(factory: Any) -> bool:
    states = {state for (kind, state) in _queue_counts(factory) if kind == "delivery"}
    analysis = {state for (kind, state) in _queue_counts(factory) if kind == "analysis"}
    return analysis == {"done"} and states == {"done", "dead"}


def _ledger(factory: Any) -> dict[tuple[str, str], int]:
    with session_scope(factory) as session:
        rows = session.execute(
            select(Delivery.peer, Delivery.outcome, func.count()).group_by(
                Delivery.peer, Delivery.outcome
            )
        ).all()
    return {(peer, outcome): count for peer, outcome, count in rows}


@pytest.mark.timeout(300)
def test_analysis_and_delivery_fill_latency_inference_and_delivery_metrics(
    node_factory: Any, shared_data: Path
) -> None:
    pacs, refusing = ScriptedPacs([0x0000]), ScriptedPacs([0xC000])
    try:
        node = node_factory(
            roles=("scp", "worker"),
            peers=(
                PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
                PeerSettings(
                    name="pacs",
                    ae_title="PACS",
                    host="127.0.0.1",
                    port=pacs.port,
                    send_results=True,
                ),
                PeerSettings(
                    name="refusing",
                    ae_title="PACS",
                    host="127.0.0.1",
                    port=refusing.port,
                    send_results=True,
                ),
            ),
            scheduler=SchedulerSettings(study_quiet_seconds=1.0, tick_seconds=0.2),
        )
        wait_until(lambda: node.worker_running(), timeout=10)
        ready = httpx.get(f"{node.metrics_url}/readyz").json()
        assert ready["checks"] == {"database": "ok", "storage": "ok", "model": "ok"}
        image = split_file(
            shared_data / "dicom" / "cxr" / "SIIM_1.2.276.0.7230010.3.1.4."
            "8323329.6904.1517875201.850819.dcm",
            CR_STORAGE,
        )
        assert send_raw_one(node.scp_port, image) == 0x0000
        assert wait_until(lambda: _settled(node.session_factory), timeout=240, interval=0.5), (
            _queue_counts(node.session_factory)
        )
        samples = scrape(node.metrics_url)
        ledger = _ledger(node.session_factory)
    finally:
        pacs.stop()
        refusing.stop()
    delivered = ledger[("pacs", "delivered")]
    assert delivered == len(pacs.received) >= 2  # the SR and at least one SC
    assert value(samples, "dicom_node_instances_delivered_total", peer="pacs") == delivered
    assert (
        value(samples, "dicom_node_delivery_failures_total", peer="refusing", outcome="rejected")
        == ledger[("refusing", "rejected")]
        == len(refusing.received)
    )
    assert (
        value(samples, "dicom_node_delivery_failures_total", peer="refusing", outcome="dead") == 1
    )
    assert value(samples, "dicom_node_queue_jobs", kind="delivery", state="dead") == 1
    assert value(samples, "dicom_node_inference_seconds_count") >= 1
    assert value(samples, "dicom_node_inference_seconds_sum") > 0
    assert value(samples, "dicom_node_inference_images_total") == 1
    for name in ("received_to_analysed", "analysed_to_delivered", "received_to_delivered"):
        assert value(samples, f"dicom_node_{name}_seconds_count") == 1, name
    # From the last image to the analysis: at least the study's quiet time.
    assert value(samples, "dicom_node_received_to_analysed_seconds_sum") >= 1.0
    assert value(samples, "dicom_node_received_to_delivered_seconds_sum") >= value(
        samples, "dicom_node_received_to_analysed_seconds_sum"
    )
    # The analysis loop ending makes the worker process unready, naming the model check.
    node.worker_stop.set()
    node.worker.wake.set()
    node.worker_thread.join(timeout=60)
    ready = httpx.get(f"{node.metrics_url}/readyz")
    assert ready.status_code == 503 and ready.json()["failed"] == ["model"]


def test_serve_listens_on_the_configured_metrics_port_and_a_busy_port_fails_in_one_line(
    tmp_path: Path,
) -> None:
    port, metrics_port = free_port(), free_port()
    config = write_config(
        tmp_path / "n.toml",
        root=tmp_path / "s",
        port=port,
        db_url=f"sqlite:///{tmp_path / 'n.db'}",
        metrics_port=metrics_port,
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    process = NodeProcess(config, tmp_path / "n.log")
    process.start(port, 60, "scp")
    try:
        samples = scrape(f"http://127.0.0.1:{metrics_port}")
        assert value(samples, "dicom_node_info", roles="scp", version=__version__) == 1
        assert httpx.get(f"http://127.0.0.1:{metrics_port}/healthz").status_code == 200
    finally:
        assert process.stop() == 0
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        clash = write_config(
            tmp_path / "clash.toml",
            root=tmp_path / "s",
            port=free_port(),
            db_url=f"sqlite:///{tmp_path / 'n.db'}",
            metrics_port=busy_port,
        )
        run = run_cli(clash, "serve", "--role", "scp", timeout=60)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"127.0.0.1:{busy_port}" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
