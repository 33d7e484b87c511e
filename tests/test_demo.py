"""``make demo`` runs the node end to end on a fresh machine's embedded defaults."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from dicom_node.dev.samples import make_cxr_dataset

REPO = Path(__file__).resolve().parents[1]


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dicom_node", "demo", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=REPO,
        stdin=subprocess.DEVNULL,
    )  # not a terminal: the demo ends by itself


def test_demo_runs_receive_analysis_and_delivery_with_every_result_line_labelled() -> None:
    result = _demo()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert sum(line.strip().startswith("C-STORE") and "0x0000" in line for line in lines) == 4
    assert result.stdout.count("analysis done") == 3
    assert result.stdout.count("delivery done") == 3
    assert result.stdout.count("SC status 0x0000, SR status 0x0000") == 3
    assert "received 6 object(s)" in result.stdout
    result_lines = [
        line
        for line in lines
        if ("p=" in line or "findings above" in line) and not line.startswith("***")
    ]
    assert len(result_lines) == 12  # per study: a summary and its three strongest findings
    received = [line for line in lines if line.strip().startswith(("SR ", "OT "))]
    summaries = [line for line in lines if "AI result – decision support." in line]
    assert len(received) == 6 and len(summaries) == 3
    # No weights are installed on a fresh machine: the untrained network says so everywhere.
    assert all("UNTRAINED DEMO MODEL" in line for line in result_lines + received + summaries)
    assert "Traceback" not in result.stderr
    assert re.search(
        r"AI worklist: http://127\.0\.0\.1:\d+/worklist  \(log in as demo / \S{12,}\)",
        result.stdout,
    )


def test_demo_accepts_a_folder_of_the_users_own_files(tmp_path: Path) -> None:
    ds = make_cxr_dataset(rows=64, columns=64)
    ds.save_as(tmp_path / "mine.dcm", enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not DICOM")
    result = _demo("--dicom-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "skipped notes.txt" in result.stdout
    assert result.stdout.count("analysis done") == 1
    assert result.stdout.count("delivery done") == 1
