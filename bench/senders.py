"""Many senders benchmark: 5 and 20 concurrent associations of small instances, DCMTK
storescp beside a fresh ``dicom-node serve`` on SQLite and on PostgreSQL, same senders.

Generates uncompressed 512x512 16-bit CR instances (about 0.5 MB each, two per study), then,
for each number of senders, starts that many ``storescu`` processes at once, each sending its
own ``--count`` instances over one association, to:

* ``storescp --fork`` (one process per association, files written, no fsync): the baseline,
  and the machine's own limit for these senders;
* a fresh node per database (SCP role only: fsync of file and directory, and the rows
  committed, per instance), on SQLite (WAL, synchronous=FULL: one writer at a time) and on
  PostgreSQL (a throwaway cluster of this run, fsync on).

Prints instances/s and MB/s for each, the ratio node/storescp, the target (PostgreSQL >= 250
instances/s, Orthanc's published figure with 5 clients, or the machine's limit, said beside
it), every C-STORE answered with another status than 0x0000 Success, and every line of the
node's log that says a writer failed instead of queueing ("database is locked", a lock or
pool timeout).  There must be none of either.

Usage: python bench/senders.py [--count 100] [--senders 5,20] [--databases sqlite,postgresql]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.dev.samples import make_cxr_dataset  # noqa: E402
from tests.helpers import (  # noqa: E402
    NodeProcess,
    echo,
    free_port,
    postgres_cluster,
    run_cli,
    write_config,
)

BENCH_AE = "TEST_SCU"  # the peer the test config accepts
TARGET_POSTGRESQL = 250.0  # instances/s (Orthanc book, faq/db-benchmark: 5 clients)
# Lines of a node's log that mean a writer failed instead of waiting its turn.
LOCK_WORDS = ("database is locked", "OperationalError", "TimeoutError", "QueuePool limit")


@dataclass(frozen=True)
class Run:
    """One measured run: seconds, C-STORE answers by status text, lock failures logged."""

    seconds: float
    statuses: Counter[str]
    lock_lines: int = 0
    cpu_seconds: float = 0.0  # the node process's user + system CPU during the sending

    @property
    def failures(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "Success")


def generate(folder: Path, count: int) -> list[Path]:
    """``count`` 512x512 CR files, two instances per study; the pixels of one phantom."""
    template = make_cxr_dataset(modality="CR", rows=512, columns=512, bits_stored=12)
    paths = []
    for index in range(count):
        if index % 2 == 0:
            study = make_cxr_dataset(modality="CR", rows=8, columns=8)
        ds = make_cxr_dataset(
            modality="CR",
            rows=8,
            columns=8,
            bits_stored=12,
            study_instance_uid=study.StudyInstanceUID,
            series_instance_uid=study.SeriesInstanceUID,
        )
        ds.Rows, ds.Columns, ds.PixelData = template.Rows, template.Columns, template.PixelData
        ds.InstanceNumber = index % 2 + 1
        path = folder / f"cr{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def send_one(port: int, called: str, files: list[Path]) -> Counter[str]:
    """One ``storescu`` association sending ``files``; its answers counted by status text."""
    result = subprocess.run(
        ["storescu", "-v", "-aet", BENCH_AE, "-aec", called, "127.0.0.1", str(port)]
        + [str(path) for path in files],
        capture_output=True,
        text=True,
    )
    answers: Counter[str] = Counter()
    for line in (result.stdout + result.stderr).splitlines():
        if "Received Store Response (" in line:
            answers[line.split("Received Store Response (", 1)[1].rstrip(")")] += 1
        elif line.startswith(("E:", "F:")):
            answers[f"storescu error: {line[2:].strip()[:80]}"] += 1
    unanswered = len(files) - sum(answers.values())
    if unanswered > 0 or result.returncode != 0:
        answers[f"not answered (storescu exit {result.returncode})"] += max(unanswered, 1)
    return answers


def send_all(port: int, called: str, files: list[Path], senders: int, count: int) -> Run:
    """``senders`` storescu processes started together, sender i sending its ``count`` files."""
    shares = [files[index * count : (index + 1) * count] for index in range(senders)]
    started = time.perf_counter()
    with ThreadPoolExecutor(senders) as pool:
        answers = list(pool.map(lambda share: send_one(port, called, share), shares))
    seconds = time.perf_counter() - started
    return Run(seconds, sum(answers, Counter()))


def run_storescp(folder: Path, files: list[Path], senders: int, count: int) -> Run:
    port, out = free_port(), folder / f"storescp-{senders}"
    out.mkdir()
    server = subprocess.Popen(
        ["storescp", "--fork", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while echo(port, called="STORESCP") != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        return send_all(port, "STORESCP", files, senders, count)
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(out, ignore_errors=True)


def run_node(folder: Path, files: list[Path], database_url: str, senders: int, count: int) -> Run:
    """The same senders against a fresh node (SCP role) on ``database_url``."""
    folder.mkdir(parents=True)
    port = free_port()
    config = write_config(
        folder / "node.toml",
        root=folder / "node",
        db_url=database_url,
        port=port,
        quiet_seconds=3600,  # no study closes during the run: ingest alone is measured
        extra=f"[scp]\nmax_associations = {senders}\n",
    )
    if run_cli(config, "db", "upgrade").returncode != 0:
        raise SystemExit("db upgrade failed")
    node = NodeProcess(config, folder / "node.log")
    node.start(port, 60, "scp")
    assert node.process is not None
    try:
        cpu_before = cpu_seconds(node.process.pid)
        run = send_all(port, "DICOM_NODE", files, senders, count)
        cpu = cpu_seconds(node.process.pid) - cpu_before
    finally:
        node.stop()
    log = node.log_path.read_text(errors="replace")
    locks = sum(1 for line in log.splitlines() if any(word in line for word in LOCK_WORDS))
    shutil.rmtree(folder / "node", ignore_errors=True)
    return Run(run.seconds, run.statuses, locks, cpu)


@contextmanager
def postgres_databases() -> Iterator[Iterator[str]]:
    """A throwaway cluster of this run, handing out a fresh database per node."""
    with postgres_cluster("dicom-node-bench-pg-", "max_connections=200") as cluster:
        plain = cluster.server_url.replace("postgresql+psycopg://", "postgresql://")

        def fresh() -> Iterator[str]:
            number = 0
            while True:
                number += 1
                with psycopg.connect(f"{plain}/postgres", autocommit=True) as connection:
                    connection.execute(f"CREATE DATABASE bench_{number}")
                yield f"{cluster.server_url}/bench_{number}"

        yield fresh()


def report(name: str, run: Run, count: int, megabytes: float, baseline: Run | None) -> None:
    ratio = f"  {baseline.seconds / run.seconds:5.2f}x storescp" if baseline else ""
    print(
        f"  {name:<28} {run.seconds:7.2f} s  {count / run.seconds:7.1f} inst/s  "
        f"{megabytes / run.seconds:7.1f} MB/s{ratio}"
    )
    refused = {status: n for status, n in run.statuses.items() if status != "Success"}
    print(
        f"  {'':<28} non-success answers: {run.failures}"
        + (f" {dict(refused)}" if refused else "")
        + (f"  lock/pool failures in log: {run.lock_lines}" if baseline else "")
    )
    if baseline:
        print(
            f"  {'':<28} node CPU: {1000 * run.cpu_seconds / count:.1f} ms per instance "
            f"({run.cpu_seconds / run.seconds:.2f} cores)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="instances per sender")
    parser.add_argument("--senders", default="5,20", help="comma-separated sender counts")
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    sender_counts = [int(n) for n in args.senders.split(",")]
    databases = [name.strip() for name in args.databases.split(",") if name.strip()]
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-senders-"))
    problems = 0
    try:
        files = generate(folder, max(sender_counts) * args.count)
        with postgres_databases() as fresh_postgres:
            for senders in sender_counts:
                problems += measure(folder, files, senders, args.count, databases, fresh_postgres)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print("no C-STORE failure, no lock failure" if problems == 0 else f"FAILURES: {problems}")
    return 0 if problems == 0 else 1


def measure(
    folder: Path,
    files: list[Path],
    senders: int,
    count: int,
    databases: list[str],
    fresh_postgres: Iterator[str],
) -> int:
    """One sender count: storescp, then each database; prints and returns the failures."""
    total = senders * count
    megabytes = sum(path.stat().st_size for path in files[:total]) / 1e6
    print(f"{senders} senders x {count} CR 512x512 ({total} instances, {megabytes:.0f} MB)")
    baseline = run_storescp(folder, files, senders, count)
    report("storescp --fork (no fsync)", baseline, total, megabytes, None)
    problems = baseline.failures
    for database in databases:
        url = "" if database == "sqlite" else next(fresh_postgres)
        run = run_node(folder / f"node-{database}-{senders}", files, url, senders, count)
        report(f"dicom-node on {database}", run, total, megabytes, baseline)
        problems += run.failures + run.lock_lines
        if database == "postgresql":
            rate, limit = total / run.seconds, total / baseline.seconds
            print(
                f"  target: PostgreSQL >= {TARGET_POSTGRESQL:.0f} inst/s: {rate:.0f} inst/s, "
                + ("met" if rate >= TARGET_POSTGRESQL else "MISSED")
                + f" (the machine's limit for these senders, storescp: {limit:.0f} inst/s)"
            )
    return problems


if __name__ == "__main__":
    raise SystemExit(main())
