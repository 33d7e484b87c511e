"""Backpressure: over ``[scp] max_backlog`` waiting analyses, associations are refused
transiently (A-ASSOCIATE-RJ 2/3/1, PS3.8 Table 9-21) and accepted again once it drains."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.settings import ScpSettings
from dicom_node.db.models import Event
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.worker import Worker
from dicom_node.scp.backlog import BacklogGauge
from dicom_node.studies import close_quiet_studies
from tests.helpers import NODE_AE, associate, echo, send_datasets

CACHE_SECONDS = 1.0  # BacklogGauge's default: a refusal may lag the queue by this much


def _storescu(port: int, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", NODE_AE, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _store_association(port: int) -> Any:
    return associate(port, [str(make_cxr_dataset(rows=8, columns=8).SOPClassUID)])


def test_over_the_backlog_bound_associations_are_refused_transiently_until_it_drains(
    node_factory: Any, tmp_path: Path
) -> None:
    node = node_factory(scp=ScpSettings(max_backlog=2))
    datasets = [make_cxr_dataset(rows=64, columns=64, seed=seed) for seed in range(3)]
    assert send_datasets(node.scp_port, datasets) == [0, 0, 0]  # nothing waits yet
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    time.sleep(CACHE_SECONDS + 0.1)  # three analyses wait now, over the bound of two

    refused = _store_association(node.scp_port)
    assert refused.is_rejected
    primitive = refused.acceptor.primitive
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 1)
    path = tmp_path / "late.dcm"
    late = make_cxr_dataset(rows=64, columns=64, seed=9)
    late.save_as(path, enforce_file_format=True)
    run = _storescu(node.scp_port, path)
    assert run.returncode != 0 and "Association Rejected" in run.stderr, run.stderr
    assert echo(node.scp_port) == 0  # a C-ECHO still answers: busy, not down
    with session_scope(node.session_factory) as session:
        events = [
            json.loads(e.detail or "{}")
            for e in session.scalars(select(Event).where(Event.name == "association.refused"))
        ]
    assert len(events) == 2 and {e["calling_ae_title"] for e in events} == {"TEST_SCU", "STORESCU"}
    assert all((e["waiting_analyses"], e["max_backlog"]) == (3, 2) for e in events)

    worker = Worker(node.settings, node.session_factory, load_bundle(node.settings))
    assert worker.run_once() == 3  # the backlog drains
    time.sleep(CACHE_SECONDS + 0.1)
    accepted = _store_association(node.scp_port)
    assert accepted.is_established
    accepted.release()
    run = _storescu(node.scp_port, path)
    assert run.returncode == 0 and "E:" not in run.stderr, run.stderr


def test_max_backlog_zero_never_refuses(node: Any) -> None:
    datasets = [make_cxr_dataset(rows=32, columns=32, seed=seed) for seed in range(3)]
    assert send_datasets(node.scp_port, datasets) == [0, 0, 0]
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    time.sleep(CACHE_SECONDS + 0.1)
    assoc = _store_association(node.scp_port)
    assert assoc.is_established
    assoc.release()


def test_the_backlog_count_is_cached_so_a_burst_costs_one_query(node: Any) -> None:
    clock = [100.0]
    gauge = BacklogGauge(max_age_seconds=1.0, clock=lambda: clock[0])
    assert gauge.current(node.session_factory) == 0
    assert send_datasets(node.scp_port, [make_cxr_dataset(rows=32, columns=32)]) == [0]
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    clock[0] += 0.5
    assert gauge.current(node.session_factory) == 0  # still the count of half a second ago
    clock[0] += 0.5
    assert gauge.current(node.session_factory) == 1
