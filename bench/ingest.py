"""Ingest benchmark: DCMTK storescu -> DCMTK storescp, then storescu -> dicom-node, same run.

Generates N uncompressed 2048x2500 16-bit CR instances (about 10 MB each), sends them over
one association with ``storescu`` to ``storescp`` (writes files, no fsync) and to the node
(fsync of file and directory, SQLite WAL commit with synchronous=FULL, per instance), and
prints both throughputs and the ratio node/storescp.  Target: ratio >= 1.5.

Usage: python bench/ingest.py [--count 100] [--database-url URL]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.dev.samples import make_cxr_dataset  # noqa: E402
from tests.helpers import NodeProcess, echo, free_port, run_cli, write_config  # noqa: E402

BENCH_AE = "TEST_SCU"  # the peer the test config accepts


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


def run_node(folder: Path, files: list[Path], database_url: str) -> float:
    port = free_port()
    config = write_config(
        folder / "node.toml",
        root=folder / "node",
        db_url=database_url,
        port=port,
        quiet_seconds=3600,
    )
    if run_cli(config, "db", "upgrade").returncode != 0:
        raise SystemExit("db upgrade failed")
    node = NodeProcess(config, folder / "node.log")
    node.start(port, 30, "scp")
    try:
        return send(port, "DICOM_NODE", files)
    finally:
        node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--database-url", default="", help="default: SQLite in the temp folder")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="dicom-node-bench-"))
    try:
        files = generate(folder, args.count)
        megabytes = sum(p.stat().st_size for p in files) / 1e6
        print(f"{args.count} CR instances, 2048x2500x16 bit, {megabytes:.0f} MB, one association")
        baseline = run_storescp(folder, files)
        node = run_node(folder, files, args.database_url)
        for name, seconds in (
            ("storescp (no fsync)", baseline),
            ("dicom-node (fsync + commit)", node),
        ):
            print(
                f"{name:<30} {seconds:7.2f} s  {args.count / seconds:7.1f} inst/s  "
                f"{megabytes / seconds:7.1f} MB/s"
            )
        print(f"ratio node/storescp throughput: {baseline / node:.2f} (target >= 1.5)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
