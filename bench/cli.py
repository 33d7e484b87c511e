"""CLI start-up benchmark: how long the quick commands take, against importing the two
libraries every command needs anyway.

Times (wall clock, best of 5, each a fresh process) ``dicom-node --help``, ``dicom-node status``
and ``dicom-node config check`` on a temporary copy of ``config/dicom-node.toml`` whose storage
root (and so its embedded SQLite database, upgraded first) lies in a temporary folder; the
baseline is ``python -c "import sqlalchemy, pydicom"``.  Target: each command at most twice the
baseline.  Always exits 0; a command over the target is printed as MISSED.
Usage:
    python bench/cli.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 2.0
COMMANDS = (
    ("dicom-node --help", ("--help",)),
    ("dicom-node status", ("status",)),
    ("dicom-node config check", ("config", "check")),
)


def dicom_node_command() -> list[str]:
    """The installed console script beside this interpreter, else ``python -m dicom_node``."""
    script = Path(sys.executable).with_name("dicom-node")
    return [str(script)] if script.exists() else [sys.executable, "-m", "dicom_node"]


def write_config(folder: Path) -> Path:
    """The shipped config with the storage root (and so the SQLite file) under ``folder``."""
    text = (REPO / "config" / "dicom-node.toml").read_text()
    shipped = 'root = "/var/lib/dicom-node"'
    if shipped not in text:
        raise SystemExit(f"config/dicom-node.toml no longer has {shipped!r}: update bench/cli.py")
    path = folder / "dicom-node.toml"
    path.write_text(text.replace(shipped, f'root = "{folder / "storage"}"', 1))
    (folder / "storage").mkdir()
    return path


def best_of(argv: list[str], repeat: int, environ: dict[str, str]) -> tuple[float, float]:
    """The fastest of ``repeat`` runs: wall clock and CPU (user + system) seconds.

    The CPU time is printed beside the wall time because it is steadier on a loaded machine;
    the target is on the wall time.  A failing command stops the benchmark."""
    walls, cpus = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=environ)
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if result.returncode != 0:
            raise SystemExit(
                f"{' '.join(argv)} failed ({result.returncode}):\n"
                f"{result.stdout[-1000:]}{result.stderr[-2000:]}"
            )
    return min(walls), min(cpus)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicom-node-bench-") as temp:
        config = write_config(Path(temp))
        environ = {**os.environ, "DICOM_NODE_CONFIG": str(config)}
        command = dicom_node_command()
        upgrade = subprocess.run(
            [*command, "--config", str(config), "db", "upgrade"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=environ,
        )
        if upgrade.returncode != 0:
            raise SystemExit(f"db upgrade failed:\n{upgrade.stderr[-2000:]}")
        baseline, baseline_cpu = best_of(
            [sys.executable, "-c", "import sqlalchemy, pydicom"], args.repeat, environ
        )
        print(
            f"{'baseline: import sqlalchemy, pydicom':<36} {baseline * 1000:6.0f} ms wall "
            f"{baseline_cpu * 1000:6.0f} ms CPU"
        )
        missed = []
        for name, arguments in COMMANDS:
            argv = (
                [*command, "--help"]
                if arguments == ("--help",)
                else [*command, "--config", str(config), *arguments]
            )
            elapsed, cpu = best_of(argv, args.repeat, environ)
            ratio = elapsed / baseline
            verdict = "ok" if ratio <= TARGET_RATIO else "MISSED"
            if verdict == "MISSED":
                missed.append(name)
            print(
                f"{name:<36} {elapsed * 1000:6.0f} ms wall {cpu * 1000:6.0f} ms CPU  "
                f"{ratio:4.2f}x wall ({cpu / baseline_cpu:4.2f}x CPU), "
                f"target <= {TARGET_RATIO:g}x  {verdict}"
            )
    print(f"MISSED: {', '.join(missed)}" if missed else "all commands within the target")
    return 0


if __name__ == "__main__":
    sys.exit(main())
