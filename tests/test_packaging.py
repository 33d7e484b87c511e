"""The built wheel is complete: installed without the source tree, it migrates and serves pages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port, write_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The node's wheel, built from this checkout and installed (no deps) into a folder."""
    base = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(base / "dist"),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    # setuptools names data folders it would leave out of the wheel, and deprecated metadata
    assert "would be ignored" not in built.stdout + built.stderr
    assert "SetuptoolsDeprecationWarning" not in built.stdout + built.stderr
    wheel = next((base / "dist").glob("dicom_node-*.whl"))
    site = base / "site"
    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr[-2000:]
    return site


def _from_wheel(site: Path, cwd: Path) -> dict[str, str]:
    """An environment whose ``dicom_node`` is the wheel's (the checkout is not on the path)."""
    return {**os.environ, "PYTHONPATH": str(site), "PYTHONSAFEPATH": "1"} | {"PWD": str(cwd)}


def test_wheel_install_migrates_and_serves_the_login_page_and_stylesheet(
    wheel_site: Path, tmp_path: Path
) -> None:
    env = _from_wheel(wheel_site, tmp_path)
    where = subprocess.run(
        [sys.executable, "-c", "import dicom_node; print(dicom_node.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert where.stdout.strip().startswith(str(wheel_site)), where.stdout + where.stderr
    web_port = free_port()
    config = write_config(
        tmp_path / "n.toml", root=tmp_path / "s", db_url="", port=free_port(), web_port=web_port
    )
    command = [sys.executable, "-m", "dicom_node", "--config", str(config)]
    upgraded = subprocess.run(
        [*command, "db", "upgrade"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert upgraded.returncode == 0, upgraded.stderr  # the migrations travel in the wheel
    process = subprocess.Popen(
        [*command, "serve", "--role", "web"],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        login = _get_when_up(f"http://127.0.0.1:{web_port}/login", process)
        assert login.status_code == 200 and "<form" in login.text
        stylesheet = httpx.get(f"http://127.0.0.1:{web_port}/static/style.css")
        assert stylesheet.status_code == 200 and "{" in stylesheet.text
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-2000:]


def _get_when_up(url: str, process: subprocess.Popen[str]) -> httpx.Response:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        try:
            return httpx.get(url)
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"the web role did not answer {url} (exit {process.poll()})")
