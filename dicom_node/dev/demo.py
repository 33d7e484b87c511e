"""``make demo``: run the node end to end on the embedded defaults in a temporary folder.

Starts the node (SCP, scheduler, analysis and delivery workers) on 127.0.0.1 and a local
receiver standing in for the PACS, sends sample chest X-rays by C-STORE (or the user's own
files), shows each instance arriving, each study's analysis, the SR and SC objects written
and delivered to the receiver, and the findings summary read back from the delivered SR,
then stops cleanly.  Needs nothing outside the package: when no model weights are
installed (``dicom-node models pull``), it falls back to an untrained network, and then every
line about results says UNTRAINED DEMO MODEL.
"""

from __future__ import annotations

import secrets
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from dicom_node.clock import utcnow
from dicom_node.config.settings import (
    ModelSettings,
    NodeSettings,
    PeerSettings,
    SchedulerSettings,
    Settings,
    StorageSettings,
    WebSettings,
    load_settings,
)
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import AnalysisResult, Delivery, Finding, Instance, Job, Output, Study
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.outputs.codes import SUMMARY
from dicom_node.scp.server import ANALYSED_SOP_CLASSES
from dicom_node.service import Node, start_node
from dicom_node.web.users import add_user

OUTPUT_SOP_CLASSES = (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    KeyObjectSelectionDocumentStorage,
)
DEMO_SCU_AE = "DEMO_MODALITY"
DEMO_PACS_AE = "DEMO_PACS"
QUIET_SECONDS = 2.0


def demo_settings(root: Path, receiver_port: int) -> Settings:
    """The embedded defaults, with storage in ``root``, a loopback modality as sender and
    the demo receiver (on ``receiver_port``) as the PACS that gets the results.

    Models come from the default models folder when weights are installed there.
    """
    models_dir = load_settings(None, {}).models_dir
    return Settings(
        node=NodeSettings(host="127.0.0.1", port=11112),
        storage=StorageSettings(root=str(root), min_free_mb=100),
        model=ModelSettings(models_dir=str(models_dir), allow_untrained=True, batch_size=4),
        peers=(
            PeerSettings(name="demo-modality", ae_title=DEMO_SCU_AE, host="127.0.0.1"),
            PeerSettings(
                name="demo-pacs",
                ae_title=DEMO_PACS_AE,
                host="127.0.0.1",
                port=receiver_port,
                send_results=True,
            ),
        ),
        scheduler=SchedulerSettings(study_quiet_seconds=QUIET_SECONDS, tick_seconds=0.5),
        web=WebSettings(host="127.0.0.1", port=0, refresh_seconds=10),
    )


def start_receiver(folder: Path) -> Any:
    """A Storage SCP standing in for the PACS: it keeps every SR, SC and KOS it receives."""
    folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title=DEMO_PACS_AE)
    for sop_class in OUTPUT_SOP_CLASSES:
        ae.add_supported_context(sop_class)

    def store(event: Any) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        dataset.save_as(folder / f"{dataset.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    return ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, store)])


def sample_studies() -> list[Dataset]:
    """Three fictitious studies: PA + lateral, AP (CR), and PA alone."""
    first = make_cxr_dataset(
        view_position="PA", patient_id="DEMO-0001", seed=1, accession_number="DEMO0001"
    )
    lateral = make_cxr_dataset(
        view_position="LL",
        patient_id="DEMO-0001",
        seed=2,
        accession_number="DEMO0001",
        study_instance_uid=first.StudyInstanceUID,
    )
    second = make_cxr_dataset(
        modality="CR",
        view_position="AP",
        patient_id="DEMO-0002",
        seed=3,
        accession_number="DEMO0002",
    )
    third = make_cxr_dataset(
        view_position="PA",
        patient_id="DEMO-0003",
        seed=4,
        accession_number="DEMO0003",
        rows=600,
        columns=520,
    )
    return [first, lateral, second, third]


def load_user_files(directory: Path) -> list[Dataset]:
    """Every readable DICOM file under ``directory`` (others are reported and skipped)."""
    datasets: list[Dataset] = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:  # report and go on: one bad file must not end the demo
            print(f"  skipped {path.name}: not readable as DICOM ({type(exc).__name__})")
    return datasets


def send(datasets: list[Dataset], port: int, called_ae_title: str) -> list[int]:
    """Send over one association; returns each response status (-1: no response)."""
    ae = AE(ae_title=DEMO_SCU_AE)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets} | ANALYSED_SOP_CLASSES):
        ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES[:4])
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae_title)
    if not assoc.is_established:
        raise SystemExit("demo: the node refused the association")
    statuses = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if "Status" in status else -1)
    finally:
        assoc.release()
    return statuses


def run_demo(dicom_dir: str | None = None, keep: bool = False, serve_web: bool = False) -> int:
    """Run the demo; returns the exit code.

    It ends by printing the worklist's URL and a demo log-in.  With ``serve_web``, or when
    standard input is a terminal, it keeps serving the worklist until Ctrl-C; otherwise (as
    under ``make demo`` in CI and in the tests) it stops on its own.
    """
    root = Path(tempfile.mkdtemp(prefix="dicom-node-demo-"))
    receiver = start_receiver(root / "demo-pacs")
    settings = demo_settings(root / "node", int(receiver.server_address[1]))
    print(f"dicom-node demo: storage and database in {root / 'node'}")
    engine = make_engine(settings.database_url)
    upgrade(engine)
    node = start_node(settings, ("scp", "worker", "web"), port=0, metrics_port=0)
    try:
        datasets = load_user_files(Path(dicom_dir)) if dicom_dir else sample_studies()
        print(
            f"node {settings.node.ae_title} listening on 127.0.0.1:{node.scp_port}; "
            f"sending {len(datasets)} instances by C-STORE from {DEMO_SCU_AE}"
        )
        print(f"metrics and health checks: {node.metrics_url}/metrics, /healthz, /readyz")
        statuses = send(datasets, node.scp_port, settings.node.ae_title)
        for ds, status in zip(datasets, statuses, strict=True):
            print(
                f"  C-STORE {ds.Modality:<3} {str(ds.get('ViewPosition', '-')):<3} "
                f"study ...{str(ds.StudyInstanceUID)[-12:]}  status 0x{status:04X}"
            )
        warning = node.worker.bundle.warning_label
        if warning:
            print(f"*** {warning}: no weights installed; results below are NOT findings ***")
        print(f"waiting for studies to go quiet ({QUIET_SECONDS:.0f} s) and be analysed ...")
        _wait_for_jobs(engine, expected=len({str(ds.StudyInstanceUID) for ds in datasets}))
        _print_summary(engine, warning)
        _print_received(root / "demo-pacs")
        _offer_worklist(node, engine, wait=serve_web or sys.stdin.isatty())
    finally:
        node.stop()
        receiver.shutdown()
        engine.dispose()
        if keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(
        "demo finished: instances stored durably, one analysis per study, "
        "results delivered as SR and SC"
    )
    return 0


def _offer_worklist(node: Node, engine: Engine, *, wait: bool) -> None:
    """Create the demo user, print the worklist URL and log-in, and serve until Ctrl-C if asked."""
    password = secrets.token_urlsafe(12)
    with session_scope(make_session_factory(engine)) as session:
        add_user(
            session,
            username="demo",
            password=password,
            role="admin",
            now=utcnow(),
            created_by="demo",
        )
    print(f"AI worklist: {node.web_url}/worklist  (log in as demo / {password})")
    if not wait:
        print("  (run `dicom-node demo --serve-web` to keep the worklist open)")
        return
    print("serving the worklist; press Ctrl-C to stop the demo")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        print()


def _wait_for_jobs(engine: Engine, expected: int, timeout: float = 120.0) -> None:
    """Until every study is analysed and delivered: no job queued, running or failed."""
    deadline = time.monotonic() + timeout
    with session_scope(make_session_factory(engine)) as session:
        while time.monotonic() < deadline:
            analyses = session.scalars(select(Job.state).where(Job.kind == "analysis")).all()
            states = session.scalars(select(Job.state)).all()
            if len(analyses) >= expected and not {"queued", "running", "failed"} & set(states):
                return
            session.rollback()
            time.sleep(0.25)


def _print_summary(engine: Engine, warning: str | None) -> None:
    prefix = f"[{warning}] " if warning else ""
    with session_scope(make_session_factory(engine)) as session:
        for study in session.scalars(select(Study).order_by(Study.first_received_at)):
            count = len(
                session.scalars(
                    select(Instance.sop_instance_uid).where(
                        Instance.study_instance_uid == study.study_instance_uid
                    )
                ).all()
            )
            jobs = session.scalars(
                select(Job).where(Job.study_instance_uid == study.study_instance_uid)
            ).all()
            job_text = ", ".join(f"job {j.id} {j.kind} {j.state}" for j in jobs) or "no job yet"
            print(
                f"  study ...{study.study_instance_uid[-12:]} accession "
                f"{study.accession_number or '-'}: {count} instance(s); {job_text}"
            )
            for job in jobs:
                _print_job(session, job, prefix)


def _print_job(session: Session, job: Job, prefix: str) -> None:
    if job.kind == "delivery":
        ledger = session.scalars(select(Delivery).where(Delivery.job_id == job.id)).all()
        print(
            f"      delivered to {job.target}: "
            + ", ".join(
                f"{_kind(session, row.sop_instance_uid)} status 0x{row.status_code or 0:04X}"
                for row in ledger
            )
            if ledger
            else f"      delivery to {job.target}: {job.state}"
        )
        return
    if job.state == "skipped" or job.state == "dead":
        print(f"      {job.reason or job.last_error}")
        return
    result = session.get(AnalysisResult, job.id)
    if result is None:
        return
    findings = session.scalars(
        select(Finding)
        .where(Finding.job_id == job.id)
        .order_by(Finding.positive.desc(), Finding.probability.desc())
    ).all()
    notes = f" ({result.notes})" if result.notes else ""
    print(
        f"      {prefix}{result.model_name}{notes}: "
        f"{sum(f.positive for f in findings)} of {len(findings)} findings above threshold"
    )
    for finding in findings[:3]:
        decision = "POSITIVE" if finding.positive else "below threshold"
        print(
            f"      {prefix}{finding.label:<28} p={finding.probability:.3f} "
            f"threshold={_number(finding.threshold)} "
            f"{decision}"
        )


def _kind(session: Session, sop_instance_uid: str) -> str:
    output = session.get(Output, sop_instance_uid)
    return output.kind.upper() if output else "?"


def _print_received(folder: Path) -> None:
    """What the stand-in PACS holds, and each SR's findings summary read back from it."""
    received = sorted(folder.glob("*.dcm"))
    print(f"the demo PACS ({DEMO_PACS_AE}) received {len(received)} object(s):")
    for path in received:
        ds = pydicom.dcmread(path)
        print(f"  {ds.Modality:<3} {ds.SeriesDescription}  study ...{ds.StudyInstanceUID[-12:]}")
        for text in _texts(ds):
            print(f"      {text}")


def _texts(ds: Dataset) -> list[str]:
    found = []
    for item in ds.get("ContentSequence", []):
        name = item.get("ConceptNameCodeSequence")
        if item.get("ValueType") == "TEXT" and name and name[0].CodeValue == SUMMARY.value:
            found.append(str(item.TextValue))
        found.extend(_texts(item))
    return found


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"
