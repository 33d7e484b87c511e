"""scripts/install (and ``make install``): a staged install under DESTDIR in tmp_path.

The repo's own venv is reused (``--no-venv --venv``), so no package is installed; the storage
root points into tmp_path, so ``db upgrade`` migrates a database there.  Nothing outside
tmp_path is touched: the real /etc, /opt and /usr/lib entries are compared before and after.
"""

from __future__ import annotations

import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.db import migrate
from dicom_node.db.session import make_engine

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install"
VENV = Path(sys.executable).parent.parent  # the venv running these tests
UNITS = (
    "dicom-node.service",
    "dicom-node-scp.service",
    "dicom-node-worker.service",
    "dicom-node-web.service",
)
REAL_PATHS = (
    Path("/etc/dicom-node"),
    Path("/opt/dicom-node"),
    Path("/etc/systemd/system/dicom-node.service"),
    Path("/usr/lib/sysusers.d/dicom-node.conf"),
    Path("/usr/lib/tmpfiles.d/dicom-node.conf"),
    Path("/var/lib/dicom-node"),
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _real_state() -> dict[Path, float | None]:
    return {p: (p.stat().st_mtime if p.exists() else None) for p in REAL_PATHS}


def _install(*args: str, via_make: bool = False, **env: str) -> subprocess.CompletedProcess[str]:
    if via_make:
        flags = " ".join(args)
        command = [
            "make",
            "-s",
            "-C",
            str(REPO),
            "install",
            f"INSTALL_FLAGS={flags}",
            *(f"{key}={value}" for key, value in env.items()),
        ]
    else:
        command = [str(SCRIPT), *args]
    run = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        env={
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            **({} if via_make else env),
        },
    )
    return run


def _staged_args(storage: Path) -> list[str]:
    return ["--no-venv", "--venv", str(VENV), "--storage-root", str(storage), "--db-upgrade"]


@pytest.mark.slow
def test_staged_install_lands_every_file_with_its_mode_and_migrates_the_database(
    tmp_path: Path,
) -> None:
    if not (VENV / "bin" / "dicom-node").exists():
        pytest.fail(f"{VENV}/bin/dicom-node missing: run `make venv`")
    before = _real_state()
    stage, storage = tmp_path / "stage", tmp_path / "state"
    run = _install(*_staged_args(storage), DESTDIR=str(stage))
    assert run.returncode == 0, run.stdout + run.stderr

    config = stage / "etc/dicom-node/dicom-node.toml"
    assert _mode(config.parent) == 0o750 and _mode(config) == 0o640
    assert f'root = "{storage}"' in config.read_text()
    assert _mode(stage / "etc/dicom-node/dicom-node.toml.dist") == 0o640
    for unit in UNITS:
        path = stage / "etc/systemd/system" / unit
        text = path.read_text()
        assert _mode(path) == 0o644
        assert f"ExecStart={VENV}/bin/dicom-node serve" in text
        assert "Environment=DICOM_NODE_CONFIG=/etc/dicom-node/dicom-node.toml" in text
        assert f"ReadWritePaths={storage}\n" in text and str(stage) not in text
    for entry in ("usr/lib/sysusers.d/dicom-node.conf", "usr/lib/tmpfiles.d/dicom-node.conf"):
        assert _mode(stage / entry) == 0o644
    assert (
        f"d {storage} 0750 dicom-node dicom-node"
        in (stage / "usr/lib/tmpfiles.d/dicom-node.conf").read_text()
    )

    code = stage / "opt/dicom-node"
    assert _mode(code / "dicom_node") == 0o755 and _mode(code / "dicom_node/cli/main.py") == 0o644
    assert _mode(code / "scripts/install") == 0o755
    assert (code / "migrations/versions").is_dir() and (code / "README.md").is_file()
    assert not list(code.rglob("__pycache__"))

    engine = make_engine(f"sqlite:///{storage / 'dicom-node.db'}")
    try:
        assert migrate.current_revision(engine) == migrate.head_revision(engine)
    finally:
        engine.dispose()
    assert "systemctl enable --now dicom-node" in run.stdout
    assert "dicom-node models pull densenet121-res224-all" in run.stdout

    # An edited config survives a second run (through `make install`), which still succeeds.
    edited = config.read_text().replace('ae_title = "DICOM_NODE"', 'ae_title = "SITE_NODE"')
    config.write_text(edited + "# edited by the site\n")
    (code / "dicom_node" / "stale_module.py").write_text("# removed upstream\n")
    again = _install(*_staged_args(storage), via_make=True, DESTDIR=str(stage))
    assert again.returncode == 0, again.stdout + again.stderr
    assert config.read_text() == edited + "# edited by the site\n"
    assert "kept the existing /etc/dicom-node/dicom-node.toml" in again.stdout
    assert not (code / "dicom_node" / "stale_module.py").exists()
    assert _real_state() == before


def test_staged_install_migrates_nothing_unless_asked(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    run = _install(
        "--no-venv",
        "--venv",
        str(VENV),
        "--storage-root",
        str(tmp_path / "state"),
        DESTDIR=str(stage),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "database: not migrated here" in run.stdout
    assert "DESTDIR set, so no user" in run.stdout
    assert not (tmp_path / "state").exists()
    assert (stage / "etc/systemd/system/dicom-node-worker.service").is_file()


def test_install_options_can_move_prefix_config_and_units(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    run = _install(
        "--no-venv",
        "--prefix",
        "/srv/dn",
        "--sysconfdir",
        "/usr/local/etc",
        "--systemd-dir",
        "/usr/lib/systemd/system",
        DESTDIR=str(stage),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    unit = (stage / "usr/lib/systemd/system/dicom-node-web.service").read_text()
    assert "ExecStart=/srv/dn/.venv/bin/dicom-node serve --role web" in unit
    assert "Environment=DICOM_NODE_CONFIG=/usr/local/etc/dicom-node/dicom-node.toml" in unit
    assert "/opt/dicom-node" not in unit
    assert (stage / "usr/local/etc/dicom-node/dicom-node.toml").is_file()
    assert (stage / "srv/dn/dicom_node/cli/main.py").is_file()
    assert (
        "d /usr/local/etc/dicom-node 0750 root dicom-node"
        in (stage / "usr/lib/tmpfiles.d/dicom-node.conf").read_text()
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown option --bogus"),
        (["--prefix", "relative/dir"], "relative/dir: paths must be absolute"),
    ],
)
def test_install_refuses_bad_options_with_one_line(
    tmp_path: Path, args: list[str], message: str
) -> None:
    run = _install(*args, DESTDIR=str(tmp_path / "stage"))
    assert run.returncode == 1 and f"install: error: {message}" in run.stderr
    assert not (tmp_path / "stage").exists()


def test_install_pins_torch_like_the_makefile() -> None:
    makefile = (REPO / "Makefile").read_text()
    script = SCRIPT.read_text()
    pins = re.search(r"-c constraints.txt (torch==\S+ torchvision==\S+)", makefile)
    assert pins, "the Makefile's venv target pins torch"
    assert f"TORCH_PINS=({pins.group(1)})" in script
