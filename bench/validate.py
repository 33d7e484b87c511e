"""Validation benchmark: the report over 10,000 labelled studies, one drift recomputation, and
C-STORE ingest while the drift job runs, on one temporary embedded SQLite database.

The database (migrated with ``upgrade``) is seeded with bulk inserts: ``--reference`` studies
31-60 days old (the drift reference: the model's first jobs) and ``--studies`` of the last 30
days, each with one done shadow analysis job of "bench-model", its result (the header fields
of ``validation.features``) and 18 findings (densenet121-res224-all's labels, scores that
follow the truth); the recent studies have a CSV label of every finding (boxes on a third of
the positives of ChestX-ray8's eight boxed findings).  In the last 7 days a quarter of the
studies come from a new detector, so the drift alarms (and writes its audit event).

(1) ``build_report`` of the last 30 days (``--studies`` studies x 18 findings, ``--resamples``
    bootstrap resamples); its JSON and HTML are timed beside it.  Target: at most 60 s.
(2) one ``recompute`` in its own transaction, as the scheduler runs it: reference "first"
    (``--reference`` jobs), recent window the last ``--studies`` jobs of the last 30 days.
    Target: at most 5 s.
    (1) and (2) each run in a fresh process; peak RSS is that process's
    ``getrusage(RUSAGE_SELF).ru_maxrss``, printed beside its RSS before the phase (imports).
(3) ingest: the node (``serve --role scp --role worker``: one process, as ``serve`` runs it; an
    untrained network, nothing to analyse) on the seeded database receives ``--ingest-count``
    DX instances (1024 x 1024 x 16 bit, one study each, one pynetdicom association) with the
    drift job off, then with its scheduler recomputing the drift every ``--drift-every``
    seconds (1: the worst case of ``[drift] interval_minutes``, 60 by default), then off.
    The ratio is the throughput with the drift job over the mean of the two without; each
    C-STORE's round trip shows the stall.  Target (our reading of "not slowing ingest"):
    at least 0.9.
Always exits 0; a missed target is printed as MISSED.  Usage:
    python bench/validate.py [--studies 10000] [--reference 5000] [--resamples 2000]
                             [--ingest-count 100] [--drift-every 1] [--no-ingest]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import resource
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from queue import Empty
from typing import Any

import numpy as np
from scipy.special import expit, logit
from sqlalchemy import insert

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.config.models import DriftSettings  # noqa: E402
from dicom_node.db.migrate import upgrade  # noqa: E402
from dicom_node.db.models import AnalysisResult, Finding, Job, Study  # noqa: E402
from dicom_node.db.session import make_engine, make_session_factory  # noqa: E402
from dicom_node.db.validation import GroundTruthLabel  # noqa: E402
from dicom_node.dev.samples import SAMPLE_UID_ROOT  # noqa: E402
from dicom_node.results import reported_labels  # noqa: E402

MODEL = "bench-model"
CATALOGUE = "densenet121-res224-all"
LABELS = reported_labels(CATALOGUE)
BOXED = frozenset(  # ChestX-ray8's boxed findings
    "Atelectasis Cardiomegaly Effusion Infiltration Mass Nodule Pneumonia Pneumothorax".split()
)
THRESHOLD = 0.5
WEIGHTS = hashlib.sha256(b"bench-model weights").hexdigest()
# manufacturer, model, rows, columns, photometric interpretation, bits stored, modality
DETECTORS = (
    ("Agfa", "DX-D 300", 2832, 2320, "MONOCHROME2", "12", "DX"),
    ("Carestream", "DRX-1", 2500, 2048, "MONOCHROME2", "12", "DX"),
    ("Fujifilm", "FCR Capsula XLII", 2140, 1760, "MONOCHROME1", "10", "CR"),
)
NEW_DETECTOR = ("Nova Imaging", "Nova DR 2", 3072, 3072, "MONOCHROME2", "16", "DX")
TARGET_REPORT_S, TARGET_DRIFT_S, TARGET_INGEST_RATIO = 60.0, 5.0, 0.9
INGEST_SHAPE = (1024, 1024)


def drift_settings(studies: int, reference: int) -> DriftSettings:
    return DriftSettings(
        reference="first", reference_studies=reference, window_studies=studies, window_days=30
    )


# ----------------------------------------------------------------------------- seeding


def finish_times(rng: np.random.Generator, studies: int, reference: int, now: datetime) -> list:
    """When each job finished, oldest first: the reference 31-60 days ago, the rest in the
    last 30 days."""
    old = np.sort(rng.uniform(31 * 86400, 60 * 86400, reference))[::-1]
    new = np.sort(rng.uniform(60, 30 * 86400 - 60, studies))[::-1]
    return [now - timedelta(seconds=float(s)) for s in np.concatenate([old, new])]


def features(rng: np.random.Generator, finished: list, now: datetime) -> list[str]:
    """Header fields per job (JSON); a quarter of the last 7 days' from the new detector."""
    n = len(finished)
    late = np.array([t >= now - timedelta(days=7) for t in finished]) & (rng.random(n) < 0.25)
    maker = rng.choice(len(DETECTORS), size=n, p=[0.5, 0.3, 0.2])
    age = np.clip(rng.normal(58, 17, n), 18, 99).round(0)
    kvp, mas = rng.normal(120, 4, n).round(0), rng.gamma(4.0, 0.8, n).round(2)
    ms, ma = rng.normal(12, 3, n).clip(2).round(1), rng.normal(320, 60, n).clip(50).round(0)
    index = rng.normal(400, 80, n).clip(50).round(0) + 150 * late
    view, sex = rng.random(n) < 0.75, rng.random(n) < 0.5
    rows = []
    for i in range(n):
        make, model, height, width, photometric, bits, modality = (
            NEW_DETECTOR if late[i] else DETECTORS[maker[i]]
        )
        values = {"Rows": height, "Columns": width, "PatientAge": age[i], "KVP": kvp[i]}
        values |= {"Exposure": mas[i], "ExposureTime": ms[i], "XRayTubeCurrent": ma[i]}
        values |= {"ExposureIndex": index[i], "ViewPosition": "PA" if view[i] else "AP"}
        values |= {"Manufacturer": make, "ManufacturerModelName": model, "Modality": modality}
        values |= {"PhotometricInterpretation": photometric, "BitsStored": bits}
        values["PatientSex"] = "F" if sex[i] else "M"
        rows.append(
            json.dumps({k: v.item() if hasattr(v, "item") else v for k, v in values.items()})
        )
    return rows


def plain(value: object) -> object:
    """A numpy scalar as the Python number JSON takes."""
    return value.item() if isinstance(value, np.generic) else value


def truth_and_scores(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 18) labels (prevalence 2-30%) and probabilities (AUROC about 0.75-0.95)."""
    k = len(LABELS)
    prevalence = rng.permutation(np.linspace(0.02, 0.30, k))
    separation = rng.permutation(np.linspace(1.0, 2.6, k))
    truth = rng.random((n, k)) < prevalence
    score = logit(prevalence) + separation * (truth - 0.5) + rng.normal(0.0, 1.0, (n, k))
    return truth.astype(int), expit(score)


def regions(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 18, 4) lesion boxes (x, y, width, height) in a 2048 x 2500 image."""
    size = rng.uniform(150, 600, (n, len(LABELS), 2))
    corner = rng.uniform((100, 200), (1400, 1800), (n, len(LABELS), 2))
    return np.concatenate([corner, size], axis=2).round(1)


def finding_rows(rng: np.random.Generator, prob: np.ndarray, region: np.ndarray) -> list[dict]:
    """18 findings per job; a positive boxed finding gets its region, jittered, as its box."""
    jitter = rng.normal(0.0, 0.2, region.shape) * region[..., [2, 3, 2, 3]]
    rows = []
    for job in range(prob.shape[0]):
        for k, label in enumerate(LABELS):
            p = float(prob[job, k])
            boxes = None
            if p >= THRESHOLD and label in BOXED:
                x, y, w, h = (region[job, k] + jitter[job, k]).tolist()
                boxes = json.dumps([[round(x, 1), round(y, 1), round(x + w, 1), round(y + h, 1)]])
            rows.append(
                {"job_id": job + 1, "label": label, "probability": p, "threshold": THRESHOLD}
                | {"positive": p >= THRESHOLD, "boxes": boxes, "heatmap_path": None}
            )
    return rows


def label_rows(
    rng: np.random.Generator, uids: list[str], truth: np.ndarray, region: np.ndarray, now: datetime
) -> list[dict]:
    """One CSV-imported label per study and finding; a box on a third of boxed positives."""
    with_box = rng.random(truth.shape) < 1 / 3
    rows: list[dict] = []
    for i, uid in enumerate(uids):
        for k, label in enumerate(LABELS):
            box = truth[i, k] == 1 and label in BOXED and with_box[i, k]
            x, y, w, h = region[i, k].tolist() if box else (None,) * 4
            rows.append(
                {"study_instance_uid": uid, "finding": label, "label": int(truth[i, k])}
                | {"box_x": x, "box_y": y, "box_width": w, "box_height": h}
                | {"source_sha256": WEIGHTS, "line": len(rows) + 2, "imported_at": now}
                | {"imported_by": "bench"}
            )
    return rows


def seed_database(url: str, studies: int, reference: int, now: datetime) -> float:
    """Migrate and fill the database; returns the seconds it took."""
    start = time.perf_counter()
    engine = make_engine(url)
    upgrade(engine)
    rng = np.random.default_rng(20240601)
    finished = finish_times(rng, studies, reference, now)
    n = len(finished)
    uids = [f"{SAMPLE_UID_ROOT}77.{i + 1}" for i in range(n)]
    truth, prob = truth_and_scores(rng, n)
    region = regions(rng, n)
    sex = rng.random(n) < 0.5
    headers = features(rng, finished, now)
    studies_, jobs, results = [], [], []
    for i, (uid, t, header) in enumerate(zip(uids, finished, headers, strict=True)):
        studies_.append(
            {"study_instance_uid": uid, "first_received_at": t, "last_received_at": t}
            | {"revision": 1, "closed_revision": 1, "instance_count": 1}
            | {"accession_number": f"BN{i + 1:08d}", "patient_sex": "F" if sex[i] else "M"}
        )
        jobs.append(
            {"id": i + 1, "kind": "analysis", "state": "done", "study_instance_uid": uid}
            | {"study_revision": 1, "target": MODEL, "mode": "shadow", "attempts": 1}
            | {"max_attempts": 3, "created_at": t - timedelta(seconds=40), "updated_at": t}
        )
        results.append(
            {"job_id": i + 1, "study_instance_uid": uid, "sop_instance_uid": f"{uid}.1.1"}
            | {"model_name": MODEL, "model_version": "bench-1", "weights_sha256": WEIGHTS}
            | {"weights_status": "verified", "thresholds_source": "model", "mode": "shadow"}
            | {"features": header, "created_at": t}
        )
    with engine.begin() as conn:
        conn.execute(insert(Study), studies_)
        conn.execute(insert(Job), jobs)
        conn.execute(insert(AnalysisResult), results)
        conn.execute(insert(Finding), finding_rows(rng, prob, region))
        recent = slice(reference, n)
        conn.execute(
            insert(GroundTruthLabel),
            label_rows(rng, uids[recent], truth[recent], region[recent], now),
        )
    engine.dispose()
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- measured phases


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def report_phase(url: str, now: datetime, resamples: int, out: Any) -> None:
    """Child process: build the report of the last 30 days, then its JSON and HTML."""
    from dicom_node.validation.html import render_report_html
    from dicom_node.validation.report import ReportRequest, build_report, report_bytes

    factory = make_session_factory(make_engine(url))
    request = ReportRequest(
        MODEL, "shadow", since=now - timedelta(days=30), bootstrap_resamples=resamples
    )
    before = _rss_kib()
    start = time.perf_counter()
    with factory() as session:
        report = build_report(session, request, now)
    built = time.perf_counter() - start
    size = len(report_bytes(report)) + len(render_report_html(report))
    total = time.perf_counter() - start
    auroc = [f["auroc"] for f in report["findings"].values() if f["auroc"] is not None]
    out.put(
        {"wall": built, "total": total, "rss_before": before, "bytes": size}
        | {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        | {"studies": report["studies"], "findings": len(report["findings"]), "auroc": auroc}
    )


def drift_phase(url: str, now: datetime, settings: DriftSettings, out: Any) -> None:
    """Child process: one recomputation, as the scheduler runs it."""
    from dicom_node.logs import configure_logging
    from dicom_node.validation.monitor import recompute

    configure_logging("ERROR", "console")  # not the alarm's warning amid the figures
    factory = make_session_factory(make_engine(url))
    before = _rss_kib()
    start = time.perf_counter()
    result, _ = recompute(factory, MODEL, settings, now)
    wall = time.perf_counter() - start
    out.put(
        {"wall": wall, "rss_before": before, "n_reference": result.n_reference}
        | {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
        | {"n_recent": result.n_recent, "combined": result.combined, "alarm": result.alarm}
        | {"moved": list(result.moved), "fields": len(result.statistics)}
    )


def in_child(context: Any, target: Any, *args: Any) -> dict:
    """Run ``target(*args, queue)`` in a fresh process; what it put on the queue."""
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    try:
        while True:
            try:
                return dict(queue.get(timeout=1))
            except Empty:
                if not process.is_alive():
                    raise SystemExit(f"bench: {target.__name__} failed") from None
    finally:
        process.join(timeout=60)


# ----------------------------------------------------------------------------- ingest


def generate(folder: Path, count: int) -> list[Path]:
    """``count`` DX instances of INGEST_SHAPE, each its own study, sharing one phantom."""
    from dicom_node.dev.samples import make_cxr_dataset

    folder.mkdir(parents=True)
    rows, columns = INGEST_SHAPE
    template = make_cxr_dataset(rows=rows, columns=columns, bits_stored=12)
    paths = []
    for index in range(count):
        ds = make_cxr_dataset(rows=8, columns=8, bits_stored=12, seed=index)
        ds.Rows, ds.Columns, ds.PixelData = template.Rows, template.Columns, template.PixelData
        path = folder / f"dx{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, files: list[Path]) -> tuple[float, list[float]]:
    """Send ``files`` over one association: total seconds, and each C-STORE's round trip."""
    import pydicom

    from tests.helpers import associate

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    start = time.perf_counter()
    assoc = associate(port, [str(first.SOPClassUID)])
    if not assoc.is_established:
        raise SystemExit("bench: the node refused the association")
    latencies = []
    try:
        for path in files:
            ds = pydicom.dcmread(path)
            sent = time.perf_counter()
            status = assoc.send_c_store(ds)
            latencies.append(time.perf_counter() - sent)
            if int(getattr(status, "Status", -1)) != 0:
                raise SystemExit(f"bench: C-STORE of {path.name} answered {status}")
    finally:
        assoc.release()
    return time.perf_counter() - start, latencies


def node_config(folder: Path, url: str, port: int, settings: DriftSettings, every: float) -> Path:
    """The node's config: the seeded model (shadow, untrained network), drift every ``every``
    seconds (0: drift off), the bench's drift windows."""
    from tests.helpers import write_config

    drift = f"enabled = {'true' if every else 'false'}\ninterval_minutes = {every / 60 or 60}\n"
    drift += f"reference_studies = {settings.reference_studies}\n"
    drift += f"window_studies = {settings.window_studies}\nwindow_days = {settings.window_days}\n"
    extra = f'[models.{MODEL}]\ncatalogue = "{CATALOGUE}"\nmode = "shadow"\n'
    extra += f"allow_untrained = true\n[drift]\n{drift}"
    return write_config(
        folder / f"node-{every:g}.toml",
        root=folder / "node",
        db_url=url,
        port=port,
        quiet_seconds=3600,  # no study closes: the worker's only work is the drift job
        level="WARNING",
        extra=extra,
    )


def ingest_run(
    folder: Path, url: str, settings: DriftSettings, every: float, name: str, count: int
) -> dict:
    """Start the node (SCP and worker, one process), send one set, stop; with ``every`` the
    scheduler recomputes the drift every that many seconds (first run awaited before sending)."""
    from sqlalchemy import func, select

    from dicom_node.db.validation import DriftPoint
    from tests.helpers import NodeProcess, free_port

    files = generate(folder / name, count)
    port = free_port()
    node = NodeProcess(node_config(folder, url, port, settings, every), folder / f"{name}.log")
    engine = make_engine(url)

    def points() -> int:
        with engine.connect() as conn:
            return int(conn.scalar(select(func.count()).select_from(DriftPoint)) or 0)

    node.start(port, 180, "scp", "worker")
    try:
        before, deadline = points(), time.monotonic() + 120
        while every and points() == before and time.monotonic() < deadline:
            time.sleep(0.2)  # the drift job is running before the first instance is sent
        started = points()
        total, latencies = send(port, files)
        ran = points() - started
    finally:
        node.stop()
        engine.dispose()
    return {"seconds": total, "latencies": latencies, "recomputes": ran}


def ingest_phase(
    folder: Path, url: str, settings: DriftSettings, count: int, drift_every: float
) -> dict:
    """Ingest with the drift job off, with it every ``drift_every`` seconds, and off again."""
    runs = {}
    for name, every in (("alone-1", 0.0), ("drift", drift_every), ("alone-2", 0.0)):
        runs[name] = ingest_run(folder, url, settings, every, name, count)
    return runs


# ----------------------------------------------------------------------------- summary


Row = tuple[str, str, str, str]


def row(name: str, value: str, target: str = "", met: bool | None = None) -> Row:
    return (name, value, target, "" if met is None else "met" if met else "MISSED")


# fmt: off
def print_summary(args: argparse.Namespace, report: dict, drift: dict, ingest: dict | None):
    aurocs = f"{min(report['auroc']):.3f}-{max(report['auroc']):.3f}"
    print(f"(1) report: {report['studies']} studies, {report['findings']} findings, AUROC "
          f"{aurocs}, {args.resamples} bootstrap resamples; with its JSON and HTML "
          f"({report['bytes'] / 1e6:.1f} MB) {report['total']:.1f} s")
    print(f"(2) drift: reference the first {drift['n_reference']} jobs, recent window "
          f"{drift['n_recent']} jobs of the last 30 days, {drift['fields']} fields; combined "
          f"{drift['combined']:.1f}, alarm {drift['alarm']}, moved {', '.join(drift['moved'])}")
    rows = [
        row("report (build_report)", f"{report['wall']:.1f} s", f"<= {TARGET_REPORT_S:g} s",
            report["wall"] <= TARGET_REPORT_S),
        row("  peak RSS (before the phase)", f"{report['peak'] / 1024:.0f} MiB",
            f"({report['rss_before'] / 1024:.0f} MiB)"),
        row("drift recompute", f"{drift['wall']:.2f} s", f"<= {TARGET_DRIFT_S:g} s",
            drift["wall"] <= TARGET_DRIFT_S),
        row("  peak RSS (before the phase)", f"{drift['peak'] / 1024:.0f} MiB",
            f"({drift['rss_before'] / 1024:.0f} MiB)"),
    ]
    if ingest is not None:
        rows += ingest_rows(args.ingest_count, args.drift_every, ingest)
    print(f"\n{'measure':<36} {'value':>14}  {'target':<12} verdict")
    for name, value, target, met in rows:
        print(f"{name:<36} {value:>14}  {target:<12} {met}")


def ingest_rows(count: int, every: float, runs: dict) -> list[Row]:
    def rate(name: str) -> float:
        return count / runs[name]["seconds"]

    def stalls(name: str) -> str:
        values = np.asarray(runs[name]["latencies"]) * 1000
        return f"{np.median(values):.0f}/{np.percentile(values, 99):.0f}/{values.max():.0f}"

    ratio = rate("drift") / ((rate("alone-1") + rate("alone-2")) / 2)
    print(f"(3) ingest: {count} DX instances of {INGEST_SHAPE[0]} x {INGEST_SHAPE[1]} x 16 bit "
          f"per run; node = SCP + worker in one process; {runs['drift']['recomputes']} drift "
          f"recomputations by its scheduler (every {every:g} s) during the second run")
    return [
        row("ingest without drift (before, after)",
            f"{rate('alone-1'):.1f}, {rate('alone-2'):.1f}", "inst/s"),
        row("ingest with the drift job", f"{rate('drift'):.1f}", "inst/s"),
        row("ingest ratio with / without", f"{ratio:.2f}", f">= {TARGET_INGEST_RATIO:g}",
            ratio >= TARGET_INGEST_RATIO),
        row("  C-STORE ms p50/p99/max, without", stalls("alone-1")),
        row("  C-STORE ms p50/p99/max, with", stalls("drift")),
    ]
# fmt: on


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10000)
    parser.add_argument("--reference", type=int, default=5000)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--ingest-count", type=int, default=100)
    parser.add_argument("--drift-every", type=float, default=1.0, help="seconds, while ingesting")
    parser.add_argument("--no-ingest", action="store_true")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-bench-validate-"))
    now = datetime.now(UTC).replace(microsecond=0)
    url = f"sqlite:///{folder / 'node' / 'dicom-node.db'}"
    settings = drift_settings(args.studies, args.reference)
    try:
        seconds = seed_database(url, args.studies, args.reference, now)
        print(
            f"seeded {args.reference} + {args.studies} studies x {len(LABELS)} findings, "
            f"{args.studies * len(LABELS)} labels in {seconds:.1f} s"
        )
        report = in_child(context, report_phase, url, now, args.resamples)
        drift = in_child(context, drift_phase, url, now, settings)
        ingest = None
        if not args.no_ingest:
            ingest = ingest_phase(folder, url, settings, args.ingest_count, args.drift_every)
        print_summary(args, report, drift, ingest)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
