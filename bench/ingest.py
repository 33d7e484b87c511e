"""Ingest benchmark: DCMTK storescu -> DCMTK storescp, then storescu -> dicom-node, and
STOW-RS -> dicom-node, same run.

Generates N uncompressed 2048x2500 16-bit CR instances (about 10 MB each), sends them over
one association with ``storescu`` to ``storescp`` (writes files, no fsync) and to the node
(fsync of file and directory, SQLite WAL commit with synchronous=FULL, per instance), and
prints both throughputs and the ratio node/storescp.  Target: ratio >= 1.5.

Then STOW-RS receive beside C-STORE into the node, each on a fresh node: one client (one
association; one HTTP connection posting one instance per request), then 5 in parallel (5
storescu processes; 5 HTTP clients), same files.  Target: STOW-RS >= 0.8x the node's C-STORE.

The C-STORE comparison runs on each of ``--databases`` (default both: SQLite in the temp
folder, and a throwaway PostgreSQL cluster started for the run, fsync and synchronous_commit
on as shipped), each node on a fresh database.

Usage: python bench/ingest.py [--count 100] [--databases sqlite,postgresql] [--skip-stow]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
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
BOUNDARY = "dicom-node-bench"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def generate(folder: Path, count: int) -> list[Path]:
    template = make_cxr_dataset(modality="CR", rows=2500, columns=2048, bits_stored=12)
    paths = []
    for index in range(count):
        ds = make_cxr_dataset(
            modality="CR",
            rows=8,
            columns=8,
            bits_stored=12,
            study_instance_uid=template.StudyInstanceUID,
            series_instance_uid=template.SeriesInstanceUID,
        )
        ds.Rows, ds.Columns, ds.PixelData = template.Rows, template.Columns, template.PixelData
        ds.InstanceNumber = index + 1
        path = folder / f"cr{index:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(port: int, called: str, files: list[Path]) -> float:
    started = time.perf_counter()
    result = subprocess.run(
        ["storescu", "-aet", BENCH_AE, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or "E:" in result.stderr:
        raise SystemExit(f"storescu failed: {result.stderr[-2000:]}")
    return elapsed


def run_storescp(folder: Path, files: list[Path]) -> float:
    port = free_port()
    out = folder / "storescp"
    shutil.rmtree(out, ignore_errors=True)  # each comparison starts storescp on an empty folder
    out.mkdir()
    server = subprocess.Popen(
        ["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while echo(port, called="STORESCP") != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        return send(port, "STORESCP", files)
    finally:
        server.terminate()
        server.wait()


def send_parallel(port: int, files: list[Path], clients: int) -> float:
    """``clients`` storescu processes at once, each with its share of ``files``."""
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(lambda share: send(port, "DICOM_NODE", share), _shares(files, clients)))
    return time.perf_counter() - started


def _shares(files: list[Path], clients: int) -> list[list[Path]]:
    return [files[index::clients] for index in range(clients)]


def stow(url: str, token: str, files: list[Path], clients: int) -> float:
    """``clients`` HTTP clients at once, each posting its share one instance per request."""
    headers = {"Content-Type": MULTIPART, "Authorization": f"Bearer {token}"}

    def post_all(share: list[Path]) -> None:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            for path in share:
                body = b"".join(
                    (
                        f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                        path.read_bytes(),
                        f"\r\n--{BOUNDARY}--\r\n".encode(),
                    )
                )
                answer = client.post("/dicomweb/studies", content=body)
                if answer.status_code != 200:
                    raise SystemExit(f"STOW-RS answered {answer.status_code}: {answer.text[:300]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(post_all, _shares(files, clients)))
    return time.perf_counter() - started


def run_node(
    folder: Path, files: list[Path], database_url: str, how: str = "cstore", clients: int = 1
) -> float:
    """Seconds to send ``files`` to a fresh node by ``how`` (cstore or stowrs)."""
    folder.mkdir(parents=True, exist_ok=True)
    port, web_port = free_port(), free_port()
    config = write_config(
        folder / "node.toml",
        root=folder / "node",
        db_url=database_url,
        port=port,
        web_port=web_port,
        quiet_seconds=3600,
    )
    if run_cli(config, "db", "upgrade").returncode != 0:
        raise SystemExit("db upgrade failed")
    node = NodeProcess(config, folder / "node.log")
    node.start(port, 30, "scp", "web")
    try:
        if how == "cstore":
            return (
                send(port, "DICOM_NODE", files)
                if clients == 1
                else (send_parallel(port, files, clients))
            )
        made = run_cli(config, "users", "token", "bench", "--scope", "store")
        token = next(word for word in made.stdout.split() if word.startswith("dnt_"))
        return stow(f"http://127.0.0.1:{web_port}", token, files, clients)
    finally:
        node.stop()
        shutil.rmtree(folder / "node", ignore_errors=True)


@contextlib.contextmanager
def database_urls(databases: list[str]) -> Iterator[dict[str, str]]:
    """A fresh-database factory per name: SQLite is "" (the node's own file); PostgreSQL is
    one throwaway cluster for the run, a new database in it per call."""
    with contextlib.ExitStack() as stack:
        urls = {name: "" for name in databases if name == "sqlite"}
        if "postgresql" in databases:
            cluster = stack.enter_context(postgres_cluster("bench-ingest-pg-"))
            urls["postgresql"] = cluster.server_url
        yield urls


def fresh_database(server_url: str, name: str) -> str:
    """A new database ``name`` on the PostgreSQL server, its URL ("" for SQLite)."""
    if not server_url:
        return ""
    plain = server_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{plain}/postgres", autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"


def compare_stow(folder: Path, files: list[Path], megabytes: float) -> None:
    """STOW-RS beside C-STORE into the node, one client and then five, each on a fresh node
    with its own SQLite database."""
    for clients in (1, 5):
        cstore = run_node(folder / f"cstore{clients}", files, "", "cstore", clients)
        stowrs = run_node(folder / f"stowrs{clients}", files, "", "stowrs", clients)
        for name, seconds in ((f"C-STORE x{clients}", cstore), (f"STOW-RS x{clients}", stowrs)):
            print(
                f"{name:<30} {seconds:7.2f} s  {len(files) / seconds:7.1f} inst/s  "
                f"{megabytes / seconds:7.1f} MB/s"
            )
        print(f"ratio STOW-RS/C-STORE throughput x{clients}: {cstore / stowrs:.2f} (target >= 0.8)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="C-STORE runs per database")
    parser.add_argument("--skip-stow", action="store_true", help="C-STORE figures only")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))
    try:
        files = generate(folder, args.count)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"{args.count} CR instances, 2048x2500x16 bit, {megabytes:.0f} MB, one association")
        with database_urls(args.databases.split(",")) as servers:
            for database, server_url in servers.items():
                compare_cstore(folder, files, database, server_url, megabytes, args.repeats)
        if not args.skip_stow:
            compare_stow(folder, files, megabytes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def compare_cstore(
    folder: Path,
    files: list[Path],
    database: str,
    server_url: str,
    megabytes: float,
    repeats: int,
) -> None:
    """storescp, then the node on a fresh ``database``, with the same files, ``repeats``
    times in turn; the median of each, one line each (a busy machine moves single runs)."""
    baselines, nodes = [], []
    for repeat in range(repeats):
        baselines.append(run_storescp(folder, files))
        url = fresh_database(server_url, f"bench_{database}_{repeat}")
        nodes.append(run_node(folder / f"cstore-{database}-{repeat}", files, url))
    baseline, node = statistics.median(baselines), statistics.median(nodes)
    for name, seconds in (
        ("storescp (no fsync)", baseline),
        (f"dicom-node {database} (fsync+commit)", node),
    ):
        print(
            f"{name:<34} {seconds:7.2f} s  {len(files) / seconds:7.1f} inst/s  "
            f"{megabytes / seconds:7.1f} MB/s"
        )
    print(f"ratio node/storescp throughput, {database}: {baseline / node:.2f} (target >= 1.5)")


if __name__ == "__main__":
    raise SystemExit(main())
