"""Scale-out: node processes sharing one PostgreSQL and one storage root.

Any node receives, either node's worker analyses, either node's delivery worker sends, and
still every study revision is analysed once and every output reaches the PACS once.  Also:
one instance sent to both nodes at once, a node that cannot see the shared files, and the
start-up check of each node's clock against the database's.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select
from structlog.testing import capture_logs

from dicom_node.clock import utcnow
from dicom_node.config.settings import AnalysisSettings
from dicom_node.db.models import AnalysisResult, Instance, Job, JobClaim, Output, Study
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.dev.samples import DX_PRESENTATION_STORAGE, make_cxr_dataset
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.worker import Worker
from dicom_node.ops.scaleout import CLOCK_SKEW_WARNING_SECONDS, check_clock, database_clock_skew
from dicom_node.store import sha256_of
from dicom_node.studies import close_quiet_studies
from tests.conftest import _create_postgres_database, _drop_postgres_database, wait_until
from tests.helpers import (
    NodeProcess,
    associate,
    free_port,
    run_cli,
    send_datasets,
    split_file,
    write_config,
)
from tests.peers import PACS_AE, ScriptedPacs

# Once-only needs both nodes' workers racing for one queue, not volume: 46 studies (20
# one-image studies sent to each node, and the split ones) are at least 6 analysis claims
# (at most 8 a batch) and 46 delivery jobs, so each node's workers claim again while the
# other node's hold leases; each node must take a quarter of the analyses.
SINGLE_STUDIES = 40
SPLIT_STUDIES = 6  # two instances each, one sent to each node at the same moment
UID_ROOT = "1.2.826.0.1.3680043.10.9999."
SOURCE = Path("dicom") / "cxr" / "CR-MONO1-10-chest_noFileMeta.dcm"  # 440 x 440 CR, chest PA
_SETTLED = ("done", "skipped", "superseded")


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """One empty PostgreSQL database both nodes share."""
    url, name = _create_postgres_database(postgres_server)
    try:
        yield url
    finally:
        _drop_postgres_database(postgres_server, name)


def _real_cxr(shared_data: Path) -> Dataset:
    """The real chest radiograph every test study is made of (it has no File Meta)."""
    ds = pydicom.dcmread(shared_data / SOURCE, force=True)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    return ds


def _instance(source: Dataset, study_instance_uid: str, series_instance_uid: str) -> Dataset:
    """The real image as a new instance of the given study and series."""
    ds = copy.deepcopy(source)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_instance_uid, series_instance_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(UID_ROOT)
    return ds


def _workloads(source: Dataset) -> tuple[list[list[Dataset]], set[str]]:
    """Per node what it is sent: the split studies' halves first (so each study's two
    instances arrive at both nodes at once), then the one-image studies, alternately."""
    loads: list[list[Dataset]] = [[], []]
    split = set()
    for _ in range(SPLIT_STUDIES):
        study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
        split.add(study)
        for load in loads:
            load.append(_instance(source, study, series))
    for index in range(SINGLE_STUDIES):
        loads[index % 2].append(_instance(source, generate_uid(UID_ROOT), generate_uid(UID_ROOT)))
    return loads, split


def _send_all(
    port: int, datasets: list[Dataset], start: threading.Barrier, statuses: list[int | None]
) -> None:
    """Send over one association to one node (real C-STORE), recording each status."""
    assoc = associate(
        port,
        [str(datasets[0].SOPClassUID)],
        transfer_syntaxes=[ImplicitVRLittleEndian, ExplicitVRLittleEndian],
    )
    try:
        start.wait(timeout=60)
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else None)
    finally:
        assoc.release()


def _config(
    tmp_path: Path, name: str, *, root: Path, db_url: str, models_dir: Path, pacs: ScriptedPacs
) -> tuple[Path, int]:
    """Both nodes: the same file but for the DICOM and web ports (no metrics port: two
    processes on one host would want the same one)."""
    port = free_port()
    path = write_config(
        tmp_path / f"{name}.toml",
        root=root,
        db_url=db_url,
        port=port,
        models_dir=models_dir,
        quiet_seconds=1.0,
        batch_size=8,
        extra=f'[[peers]]\nname = "pacs"\nae_title = "{PACS_AE}"\nhost = "127.0.0.1"\n'
        f"port = {pacs.port}\nsend_results = true\n[metrics]\nenabled = false\n",
    )
    return path, port


def _settled(factory: object, studies: int) -> bool:
    with session_scope(factory) as session:  # type: ignore[arg-type]
        closed = session.scalar(
            select(func.count()).select_from(Study).where(Study.closed_revision == Study.revision)
        )
        jobs = Counter(session.execute(select(Job.kind, Job.state)).all())
    unsettled = sum(n for (_, state), n in jobs.items() if state not in _SETTLED)
    analysed = sum(n for (kind, state), n in jobs.items() if kind == "analysis" and state == "done")
    return closed == studies and unsettled == 0 and analysed >= studies


def _log_problems(path: Path) -> list[str]:
    """Log lines at error level or above, and anything that is not one of our JSON lines."""
    problems = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            problems.append(line)
            continue
        if entry.get("level") in ("error", "critical") or entry.get("event") == "job.lease_lost":
            problems.append(line)
    return problems


@pytest.mark.slow
@pytest.mark.timeout(1200)  # about 1.5 CPU-seconds per job (DenseNet forward, SR build)
def test_two_nodes_on_one_postgresql_analyse_each_study_once_and_deliver_each_result_once(
    tmp_path: Path, postgres_url: str, models_dir: Path, shared_data: Path
) -> None:
    root, pacs = tmp_path / "shared-store", ScriptedPacs()
    configs = [
        _config(tmp_path, name, root=root, db_url=postgres_url, models_dir=models_dir, pacs=pacs)
        for name in ("node-a", "node-b")
    ]
    assert run_cli(configs[0][0], "db", "upgrade").returncode == 0
    nodes = [NodeProcess(path, tmp_path / f"{path.stem}.log") for path, _ in configs]
    loads, split = _workloads(_real_cxr(shared_data))
    engine = make_engine(postgres_url)
    factory = make_session_factory(engine)
    try:
        for node in nodes:
            node.spawn()  # side by side: each takes seconds to load its model
        for node, (_, port) in zip(nodes, configs, strict=True):
            node.wait_answering(port, 60)
        pids = {
            str(node.process.pid): node.log_path.stem  # type: ignore[union-attr]
            for node in nodes
        }
        begun, barrier = time.monotonic(), threading.Barrier(2)
        statuses: list[list[int | None]] = [[], []]
        senders = [
            threading.Thread(target=_send_all, args=(port, load, barrier, answers))
            for (_, port), load, answers in zip(configs, loads, statuses, strict=True)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(timeout=600)
        sent_seconds = time.monotonic() - begun
        assert [set(answers) for answers in statuses] == [{0}, {0}], statuses
        studies = SINGLE_STUDIES + SPLIT_STUDIES
        assert wait_until(lambda: _settled(factory, studies), timeout=900, interval=1.0)
        settled_seconds = time.monotonic() - begun
        with session_scope(factory) as session:
            revisions = dict(
                session.execute(select(Study.study_instance_uid, Study.revision)).tuples().all()
            )
            counts = dict(
                session.execute(select(Study.study_instance_uid, Study.instance_count))
                .tuples()
                .all()
            )
            jobs = list(session.scalars(select(Job)))
            claims = list(session.scalars(select(JobClaim)))
            results = set(session.scalars(select(AnalysisResult.job_id)))
            outputs = dict(
                session.execute(select(Output.sop_instance_uid, Output.state)).tuples().all()
            )
    finally:
        codes = [node.stop() for node in nodes]
        pacs.stop()
        engine.dispose()
    assert codes == [0, 0]

    # Every instance sent to either node was stored, the split studies under one study row.
    assert len(revisions) == studies
    assert all(counts[study] == (2 if study in split else 1) for study in revisions)
    # Exactly one analysis job per study revision, and each revision's latest job analysed.
    analysis = [job for job in jobs if job.kind == "analysis"]
    per_revision = Counter((job.study_instance_uid, job.study_revision) for job in analysis)
    assert set(per_revision.values()) == {1}
    assert set(per_revision) == {
        (study, revision) for study, last in revisions.items() for revision in range(1, last + 1)
    }
    latest = {
        job.study_instance_uid: job
        for job in analysis
        if job.study_revision == revisions[job.study_instance_uid]
    }
    assert {job.state for job in latest.values()} == {"done"}
    # Each job was claimed once (no lease expired), and each done analysis has one result.
    claimed = Counter(claim.job_id for claim in claims)
    assert all(claimed[job.id] == job.attempts == 1 for job in jobs if job.state != "superseded")
    assert results == {job.id for job in analysis if job.state == "done"}
    # The work was shared: both node processes claimed analysis and delivery jobs.
    kinds = {job.id: job.kind for job in jobs}
    shares = Counter((pids[claim.worker_id.split(":")[1]], kinds[claim.job_id]) for claim in claims)
    print(
        f"\nsent in {sent_seconds:.1f} s, settled in {settled_seconds:.1f} s; "
        f"claims per node: {dict(shares)}"
    )
    assert {node for node, _ in shares} == {"node-a", "node-b"}
    assert all(
        shares[(node, kind)] > 0
        for node in ("node-a", "node-b")
        for kind in ("analysis", "delivery")
    )
    analysis_claims = sum(n for (_, kind), n in shares.items() if kind == "analysis")
    assert all(
        shares[(node, "analysis")] >= analysis_claims // 4  # each a substantial share
        for node in ("node-a", "node-b")
    ), shares
    # The PACS got every current output exactly once, and nothing else.
    received = Counter(pacs.received)
    assert received and set(received.values()) == {1}, received.most_common(3)
    current = {uid for uid, state in outputs.items() if state == "current"}
    assert current <= set(received) <= set(outputs)
    assert {job.state for job in jobs if job.kind == "delivery"} <= {"done", "superseded"}
    for node in nodes:
        assert _log_problems(node.log_path) == [], node.log_path.name


def test_a_node_whose_clock_is_30_seconds_off_the_databases_is_warned_at_start(
    postgres_url: str,
) -> None:
    engine = make_engine(postgres_url)
    try:
        assert abs(database_clock_skew(engine) or 0.0) < CLOCK_SKEW_WARNING_SECONDS
        with capture_logs() as logs:
            ahead = check_clock(engine, clock=lambda: utcnow() + timedelta(seconds=30))
            behind = check_clock(engine, clock=lambda: utcnow() - timedelta(seconds=30))
            in_step = check_clock(engine)
    finally:
        engine.dispose()
    assert ahead is not None and 29 < ahead < 31
    assert behind is not None and -31 < behind < -29
    assert in_step is not None and abs(in_step) < CLOCK_SKEW_WARNING_SECONDS
    warnings = [entry for entry in logs if entry["event"] == "clock.skew"]
    assert [round(entry["skew_seconds"]) for entry in warnings] == [30, -30]
    assert {entry["log_level"] for entry in warnings} == {"warning"}


def test_sqlite_has_no_second_clock_to_compare(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        assert check_clock(engine) is None
    finally:
        engine.dispose()


def test_a_node_that_cannot_see_the_shared_files_retries_the_job_and_finishes_once_they_are_back(
    node_factory: Any,
) -> None:
    node = node_factory(analysis=AnalysisSettings(backoff_seconds=0.01))
    assert send_datasets(node.scp_port, [make_cxr_dataset(rows=64, columns=64)]) == [0]
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    root = Path(node.settings.storage.root)
    (root / "instances").rename(root / "elsewhere")  # as on a node whose share is not mounted
    worker = Worker(node.settings, node.session_factory, load_bundle(node.settings))
    assert worker.run_once() == 1
    with session_scope(node.session_factory) as session:
        job = session.scalars(select(Job)).one()
    assert (job.state, job.attempts) == ("failed", 1)  # not dead: retrying can help
    assert "is the storage root mounted" in (job.last_error or "")
    (root / "elsewhere").rename(root / "instances")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and job.state != "done":
        worker.run_once()
        time.sleep(0.02)
        with session_scope(node.session_factory) as session:
            job = session.scalars(select(Job).where(Job.kind == "analysis")).one()
    assert (job.state, job.attempts) == ("done", 2)


def _waiting_on_locks(plain_url: str) -> int:
    with psycopg.connect(plain_url, autocommit=True) as connection:
        row = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def test_one_instance_sent_to_two_nodes_at_the_same_moment_is_stored_once_and_both_succeed(
    node_factory: Any, db_url: str
) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("nodes share a database only on PostgreSQL")
    nodes = [node_factory(), node_factory()]  # one database, one storage root
    source = make_cxr_dataset(rows=64, columns=64)
    plain = db_url.replace("postgresql+psycopg://", "postgresql://")
    answers: dict[int, list[int | None]] = {}

    def send(index: int) -> None:
        answers[index] = send_datasets(nodes[index].scp_port, [source])

    senders = [threading.Thread(target=send, args=(index,)) for index in range(2)]
    with psycopg.connect(plain) as blocker:  # holds back both nodes' commits
        blocker.execute("LOCK TABLE instances IN EXCLUSIVE MODE")
        for waiting, sender in enumerate(senders, 1):
            sender.start()  # each node looks the instance up, finds none, writes the file
            assert wait_until(
                lambda waiting=waiting: _waiting_on_locks(plain) >= waiting, timeout=30
            )
        blocker.rollback()
    for sender in senders:
        sender.join(timeout=60)
    assert answers == {0: [0], 1: [0]}  # the second node answers as for a duplicate
    root = Path(nodes[0].settings.storage.root)
    with session_scope(nodes[0].session_factory) as session:
        rows = session.scalars(select(Instance)).all()
        study = session.get(Study, str(source.StudyInstanceUID))
    assert len(rows) == 1 and study is not None and study.instance_count == 1
    assert (
        sha256_of(split_file(root / rows[0].path, DX_PRESENTATION_STORAGE).payload)
        == rows[0].sha256
    )
