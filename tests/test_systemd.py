"""The systemd units are hardened (systemd-analyze) and keep only the documented exceptions.

``dicom-node.service`` runs every role in one process; ``dicom-node-scp``, ``-worker`` and
``-web`` run one role each and conflict with it.  Only units that run the model keep the GPU
device nodes; the others have no devices at all.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
UNITS = (
    "dicom-node.service",
    "dicom-node-scp.service",
    "dicom-node-worker.service",
    "dicom-node-web.service",
)
ROLES = {
    "dicom-node.service": None,
    "dicom-node-scp.service": "scp",
    "dicom-node-worker.service": "worker",
    "dicom-node-web.service": "web",
}
GPU_UNITS = ("dicom-node.service", "dicom-node-worker.service")


def _settings(unit: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in (SYSTEMD / unit).read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_every_unit_in_the_folder_is_checked() -> None:
    assert sorted(p.name for p in SYSTEMD.glob("*.service")) == sorted(UNITS)


@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_at_most_2_by_systemd_analyze(unit: str) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze not found: apt-get install systemd")
    run = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", str(SYSTEMD / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", run.stdout)
    assert match, run.stdout[-2000:] + run.stderr
    assert float(match.group(1)) <= 2.0, run.stdout
    assert "Unknown key" not in run.stderr and "Invalid" not in run.stderr, run.stderr


@pytest.mark.parametrize("unit", UNITS)
def test_unit_runs_unprivileged_and_writes_only_the_storage_root(unit: str) -> None:
    settings = _settings(unit)
    assert settings["User"] == ["dicom-node"] and settings["CapabilityBoundingSet"] == [""]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["ReadWritePaths"] == ["/var/lib/dicom-node"]
    assert settings["Restart"] == ["on-failure"] and settings["NoNewPrivileges"] == ["yes"]
    assert settings["DevicePolicy"] == ["closed"]
    assert "MemoryDenyWriteExecute" not in settings  # every role imports torch (see the unit)
    assert (
        "Environment=DICOM_NODE_CONFIG=/etc/dicom-node/dicom-node.toml"
        in (SYSTEMD / unit).read_text()
    )


@pytest.mark.parametrize("unit", UNITS)
def test_unit_serves_its_role(unit: str) -> None:
    settings, role = _settings(unit), ROLES[unit]
    command = "/opt/dicom-node/.venv/bin/dicom-node serve"
    assert settings["ExecStart"] == [command if role is None else f"{command} --role {role}"]
    assert settings["ExecStartPre"] == ["/opt/dicom-node/.venv/bin/dicom-node config check"]
    if role is not None:
        assert settings["Conflicts"] == ["dicom-node.service"]


def test_split_units_serve_metrics_on_ports_of_their_own() -> None:
    ports = {
        unit: [
            v
            for v in _settings(unit).get("Environment", [])
            if v.startswith("DICOM_NODE__METRICS__PORT=")
        ]
        for unit in UNITS[1:]
    }
    assert ports == {
        "dicom-node-scp.service": [],  # the receiver keeps [metrics] port
        "dicom-node-worker.service": ["DICOM_NODE__METRICS__PORT=9465"],
        "dicom-node-web.service": ["DICOM_NODE__METRICS__PORT=9466"],
    }


@pytest.mark.parametrize("unit", UNITS)
def test_only_units_that_run_the_model_see_the_gpus(unit: str) -> None:
    settings, text = _settings(unit), (SYSTEMD / unit).read_text()
    if unit in GPU_UNITS:
        # PrivateDevices would hide the GPUs; the unit says why it is absent.
        assert "PrivateDevices" not in settings and "/dev/nvidiactl rw" in settings["DeviceAllow"]
        assert "pytorch#143651" in text
    else:
        assert settings["PrivateDevices"] == ["yes"] and "DeviceAllow" not in settings
