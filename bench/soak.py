"""Bounded memory: the RSS, open files and threads of ``dicom-node serve`` (every role, analysis
running) through a steady soak, or through a burst sent as fast as possible.

A fresh node in a temporary folder (its storage, its SQLite database or a throwaway
PostgreSQL cluster, its model), removed at the end; loopback only.  The model is the
catalogue's DenseNet-121 with random weights in the TorchXRayVision release format (as the
tests build it): the real network, so the figures hold the memory a real model takes.

* soak (default): studies of two CR instances of ``--image-mb`` each, at ``--rate`` instances
  per second for ``--hours``, one association per study;
* ``--burst N``: N instances sent as fast as ``--senders`` associations at once can.

Afterwards it waits (at most ``--drain-minutes``) for the analyses to finish, still sampling.
Every ``--sample-seconds`` it reads the node's /proc/<pid>/status (VmRSS, VmHWM),
/proc/<pid>/fd and /proc/<pid>/task, and prints peak RSS, the RSS growth over the second half
of the sending (targets: peak <= 1.5 GB; growth over the second hour of the 2-hour soak
<= 20 MB), and the open files and threads at start, middle and end (they must stay flat).

Usage: python bench/soak.py [--rate 0.2] [--hours 2] [--image-mb 10] [--burst N]
       [--senders 4] [--database sqlite|postgresql] [--sample-seconds 10] [--workdir /tmp]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from pydicom.dataset import Dataset
from sqlalchemy import func, select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.db.models import Instance, Job, JobKind, Study  # noqa: E402
from dicom_node.db.session import make_engine, make_session_factory, read_scope  # noqa: E402
from dicom_node.dev.samples import make_cxr_dataset  # noqa: E402
from tests.helpers import (  # noqa: E402
    NodeProcess,
    free_port,
    postgres_cluster,
    run_cli,
    send_datasets,
    write_config,
)

MEGABYTE = 1_000_000
PEAK_TARGET_MB = 1536.0
GROWTH_TARGET_MB = 20.0
MODEL_NAME = "densenet121-res224-all"
WAITING = ("queued", "running", "failed")


@dataclass(frozen=True)
class Sample:
    """One reading of the node process."""

    seconds: float  # since the node started
    rss_mb: float
    hwm_mb: float
    fds: int
    threads: int
    stored: int = -1  # instances with a row (-1: not read)
    analyses_waiting: int = -1  # studies not yet closed, and analyses not finished


@dataclass
class Sent:
    """What the senders did."""

    instances: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # status (hex) or reason -> count
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str) -> None:
        with self.lock:
            self.failed[what] = self.failed.get(what, 0) + 1


def read_process(pid: int) -> tuple[float, float, int, int]:
    """VmRSS and VmHWM (MB), open file descriptors and threads of ``pid``."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    kilobytes = {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    threads = len(os.listdir(f"/proc/{pid}/task"))
    return kilobytes["VmRSS"] / 1024, kilobytes["VmHWM"] / 1024, fds, threads


def progress(database_url: str) -> tuple[int, int]:
    """Instances stored, and studies not yet closed plus analyses not yet finished (read
    without the write lock)."""
    engine = make_engine(database_url)
    try:
        with read_scope(make_session_factory(engine)) as session:
            stored = session.scalar(select(func.count()).select_from(Instance)) or 0
            waiting = (
                session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .where(Job.kind == JobKind.ANALYSIS.value, Job.state.in_(WAITING))
                )
                or 0
            )
            open_studies = (
                session.scalar(
                    select(func.count())
                    .select_from(Study)
                    .where(Study.closed_revision < Study.revision)
                )
                or 0
            )
        return int(stored), int(waiting) + int(open_studies)
    finally:
        engine.dispose()


def sample_until(
    pid: int, database_url: str, every: float, stop: threading.Event, into: list[Sample]
) -> None:
    """Append a :class:`Sample` every ``every`` seconds until ``stop``."""
    started = time.monotonic()
    while True:
        try:
            rss, hwm, fds, threads = read_process(pid)
        except (FileNotFoundError, ProcessLookupError):
            return  # the node is gone
        try:
            stored, waiting = progress(database_url)
        except Exception:  # a busy moment of the database: the memory sample still counts
            stored, waiting = -1, -1
        into.append(Sample(time.monotonic() - started, rss, hwm, fds, threads, stored, waiting))
        if stop.wait(every):
            return


def make_study(template: Dataset) -> list[Dataset]:
    """Two instances of a new study, sharing the template's pixels (no copy)."""
    study = make_cxr_dataset(modality="CR", rows=8, columns=8)
    pair = []
    for number in (1, 2):
        ds = make_cxr_dataset(
            modality="CR",
            rows=8,
            columns=8,
            study_instance_uid=study.StudyInstanceUID,
            series_instance_uid=study.SeriesInstanceUID,
        )
        ds.Rows, ds.Columns, ds.PixelData = template.Rows, template.Columns, template.PixelData
        ds.InstanceNumber = number
        pair.append(ds)
    return pair


def send_study(port: int, template: Dataset, sent: Sent, attempts: int = 5) -> None:
    """One association for one study; a refused association is tried again (transient)."""
    datasets = make_study(template)
    for _ in range(attempts):
        try:
            statuses = send_datasets(port, datasets)
        except AssertionError:  # the association was rejected
            sent.note("association rejected")
            time.sleep(2)
            continue
        for status in statuses:
            if status != 0x0000:
                sent.note("no response" if status is None else f"0x{status:04X}")
        with sent.lock:
            sent.instances += len(datasets)
        return


def soak(port: int, template: Dataset, rate: float, seconds: float, sent: Sent) -> None:
    """A study every 2 / ``rate`` seconds for ``seconds`` (sends that overrun do not pile up)."""
    interval = 2 / rate
    started = time.monotonic()
    due = started
    while due - started < seconds:
        time.sleep(max(0.0, due - time.monotonic()))
        send_study(port, template, sent)
        due = max(due + interval, time.monotonic() - interval)


def burst(port: int, template: Dataset, count: int, senders: int, sent: Sent) -> None:
    """``count`` instances (``count`` / 2 studies) over ``senders`` associations at once."""
    with ThreadPoolExecutor(senders) as pool:
        list(pool.map(lambda _: send_study(port, template, sent), range((count + 1) // 2)))


def needed_megabytes(args: argparse.Namespace) -> float:
    """Disk the run fills: the instances, a fifth more for results and the database, 2 GB."""
    count = args.burst or args.rate * args.hours * 3600
    return count * args.image_mb * 1.2 + 2048


def check_space(workdir: Path, args: argparse.Namespace) -> None:
    free = shutil.disk_usage(workdir).free / MEGABYTE
    need = needed_megabytes(args)
    if free < need:
        raise SystemExit(
            f"refused: this run needs about {need / 1000:.1f} GB in {workdir} and "
            f"{free / 1000:.1f} GB is free (lower --burst, --rate, --hours or --image-mb, "
            "or pass --workdir on a larger disk)"
        )


@contextlib.contextmanager
def database(kind: str, folder: Path) -> Iterator[str]:
    """The node's database URL: a SQLite file in ``folder``, or a throwaway cluster."""
    if kind == "sqlite":
        yield f"sqlite:///{folder / 'node.db'}"
        return
    with postgres_cluster("dicom-node-soak-pg-", "max_connections=200") as cluster:
        plain = cluster.server_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(f"{plain}/postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE soak")
        yield f"{cluster.server_url}/soak"


def install_model(folder: Path) -> Path:
    """A models folder with a random-weight DenseNet-121 release file installed."""
    from dicom_node.inference.registry import install
    from tests.conftest import make_release_file  # imports torch: only here

    models = folder / "models"
    models.mkdir()
    install(models, MODEL_NAME, make_release_file(folder / "release.pt"), "soak checkpoint")
    return models


def start_node(
    folder: Path, database_url: str, args: argparse.Namespace
) -> tuple[NodeProcess, int]:
    """A node with every role (the model loads first) and its DICOM port."""
    port = free_port()
    config = write_config(
        folder / "node.toml",
        root=folder / "store",
        db_url=database_url,
        port=port,
        quiet_seconds=args.quiet_seconds,
        models_dir=install_model(folder),
        extra=f"[scp]\nmax_associations = {max(10, args.senders + 2)}\n",
    )
    if run_cli(config, "db", "upgrade").returncode != 0:
        raise SystemExit("db upgrade failed")
    env = {"OMP_NUM_THREADS": str(args.model_threads)} if args.model_threads else {}
    node = NodeProcess(config, folder / "node.log", env=env)
    node.start(port, 300)
    return node, port


def at(samples: list[Sample], seconds: float, window: float) -> list[Sample]:
    """The samples within ``window`` of ``seconds`` (the nearest one if none)."""
    near = [s for s in samples if abs(s.seconds - seconds) <= window]
    return near or [min(samples, key=lambda s: abs(s.seconds - seconds))]


def report(samples: list[Sample], send_seconds: float, sent: Sent, args: argparse.Namespace) -> int:
    """Print the figures; 1 when a target is missed or a send failed."""
    if not samples:
        print("no samples: the node did not run")
        return 1
    window = max(args.sample_seconds * 1.5, send_seconds * 0.025)
    start, middle, end = samples[0], at(samples, send_seconds / 2, 0)[0], samples[-1]
    mid_rss = statistics.median(s.rss_mb for s in at(samples, send_seconds / 2, window))
    end_rss = statistics.median(s.rss_mb for s in at(samples, send_seconds, window))
    peak = max(s.hwm_mb for s in samples)
    growth = end_rss - mid_rss
    print(
        f"sent {sent.instances} instances in {send_seconds:.0f} s; failures: "
        f"{sum(sent.failed.values())} {sent.failed or ''}"
    )
    print(
        f"stored {end.stored}, analyses still waiting at the end: {end.analyses_waiting}, "
        f"{len(samples)} samples over {end.seconds:.0f} s"
    )
    print(
        f"{'t (s)':>8} {'RSS MB':>8} {'HWM MB':>8} {'fds':>5} {'threads':>7} "
        f"{'stored':>7} {'wait':>5}"
    )
    for sample in samples[:: max(1, len(samples) // 12)] + [end]:
        print(
            f"{sample.seconds:8.0f} {sample.rss_mb:8.1f} {sample.hwm_mb:8.1f} {sample.fds:5d} "
            f"{sample.threads:7d} {sample.stored:7d} {sample.analyses_waiting:5d}"
        )
    peak_met = peak <= PEAK_TARGET_MB
    growth_met = growth <= GROWTH_TARGET_MB
    print(
        f"peak RSS (VmHWM): {peak:.0f} MB (target <= {PEAK_TARGET_MB:.0f} MB: "
        f"{'met' if peak_met else 'MISSED'})"
    )
    if not args.burst:
        print(
            f"RSS growth over the second half of the sending: {growth:+.1f} MB "
            f"(median {mid_rss:.1f} -> {end_rss:.1f} MB; target <= {GROWTH_TARGET_MB:.0f} MB "
            f"over the second hour of a 2-hour soak: {'met' if growth_met else 'MISSED'})"
        )
    print(
        f"fds     start/middle/end: {start.fds}/{middle.fds}/{end.fds} "
        f"(max {max(s.fds for s in samples)})"
    )
    print(
        f"threads start/middle/end: {start.threads}/{middle.threads}/{end.threads} "
        f"(max {max(s.threads for s in samples)})"
    )
    return 0 if peak_met and (args.burst or growth_met) and not sent.failed else 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=0.2, help="soak: instances per second")
    parser.add_argument("--hours", type=float, default=2.0, help="soak: hours of sending")
    parser.add_argument("--image-mb", type=float, default=10.0, help="size of each instance")
    parser.add_argument("--burst", type=int, default=0, help="send N instances at once instead")
    parser.add_argument("--senders", type=int, default=4, help="burst: associations at once")
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--sample-seconds", type=float, default=10.0)
    parser.add_argument("--drain-minutes", type=float, default=30.0)
    parser.add_argument("--quiet-seconds", type=float, default=5.0, help="study close after")
    parser.add_argument("--model-threads", type=int, default=1, help="torch threads (0: all)")
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    workdir = Path(args.workdir)
    check_space(workdir, args)
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-soak-", dir=workdir))
    rows = max(64, int(args.image_mb * MEGABYTE / (2048 * 2)))
    template = make_cxr_dataset(modality="CR", rows=rows, columns=2048, bits_stored=12)
    mode = (
        f"burst of {args.burst} over {args.senders} associations"
        if args.burst
        else f"soak of {args.hours:g} h at {args.rate:g} inst/s"
    )
    print(
        f"{mode}: CR 2048x{rows} ({len(template.PixelData) / MEGABYTE:.1f} MB), analysis on "
        f"(DenseNet-121, random weights, {args.model_threads or 'all'} torch threads), "
        f"{args.database}; in {folder}"
    )
    samples: list[Sample] = []
    sent, stop = Sent(), threading.Event()
    try:
        with database(args.database, folder) as database_url:
            node, port = start_node(folder, database_url, args)
            assert node.process is not None
            sampler = threading.Thread(
                target=sample_until,
                args=(node.process.pid, database_url, args.sample_seconds, stop, samples),
            )
            sampler.start()
            try:
                began = time.monotonic()
                if args.burst:
                    burst(port, template, args.burst, args.senders, sent)
                else:
                    soak(port, template, args.rate, args.hours * 3600, sent)
                send_seconds = time.monotonic() - began
                drain(samples, args.drain_minutes * 60)
            finally:
                stop.set()
                sampler.join()
                node.stop()
            errors = [line for line in node.log_path.read_text().splitlines() if '"error"' in line]
            print(f"error lines in the node's log: {len(errors)}")
            for line in errors[:5]:
                print(f"  {line[:300]}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return report(samples, send_seconds, sent, args) or (1 if errors else 0)


def drain(samples: list[Sample], seconds: float) -> None:
    """Wait until the last sample shows no analysis waiting, or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if samples and samples[-1].analyses_waiting == 0 and samples[-1].stored > 0:
            return
        time.sleep(1)


if __name__ == "__main__":
    raise SystemExit(main())
