"""``dicom-node doctor``: check everything a node needs and say how to fix what is wrong.

Each check is a plain function that looks at one thing (the config file, the database, the
storage root, files a crash left without a row, audit rows spooled during an outage, the
model weights, each peer, the DICOM TLS files, the listening ports) and
returns :class:`CheckResult` rows: ``ok``, ``warn`` (works, but look at it) or ``fail`` (the
node will not work as configured), with a one-line detail and the command or edit that fixes
it.  Checks change nothing: the storage probe writes, fsyncs and deletes one temp file, the
port probe binds and closes a socket, and each peer gets one C-ECHO association.
The TLS checks live in :mod:`dicom_node.ops.doctor.tls`, the crash-leftover checks in
:mod:`dicom_node.ops.doctor.store`, the peers' in :mod:`dicom_node.ops.doctor.peers`, the
listening ports' in :mod:`dicom_node.ops.doctor.ports`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path

from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from dicom_node.config.settings import Settings, load_settings
from dicom_node.db import migrate
from dicom_node.db.session import make_engine
from dicom_node.errors import ConfigError, DicomNodeError
from dicom_node.inference.catalogue import CATALOGUE
from dicom_node.inference.registry import read_registry, verify
from dicom_node.ops.doctor.peers import check_peers
from dicom_node.ops.doctor.ports import check_ports
from dicom_node.ops.doctor.result import FAIL, OK, WARN, CheckResult, service_user
from dicom_node.ops.doctor.store import check_audit_spool, check_orphan_files
from dicom_node.ops.doctor.tls import check_tls
from dicom_node.store import file_sha256, probe_writable


def run_checks(
    config_path: Path, environ: Mapping[str, str], *, now: datetime
) -> list[CheckResult]:
    """Every check, in the order an administrator fixes things; the config must load first."""
    try:
        settings = load_settings(config_path, environ)
    except ConfigError as exc:
        fix = (
            f"edit {config_path} (or the DICOM_NODE__ variable named), then run "
            "`dicom-node doctor` again"
        )
        if any("not found" in problem for problem in exc.problems):
            fix = (
                f"install a config file at {config_path} (scripts/install does), "
                "or pass --config PATH"
            )
        rows = [CheckResult("config", FAIL, problem, fix) for problem in exc.problems]
        return [
            *rows,
            CheckResult(
                "other checks",
                WARN,
                "not run: the configuration must load first",
                "fix the config lines above",
            ),
        ]
    results = [CheckResult("config", OK, f"{config_path} is valid")]
    single: list[Callable[[Settings], CheckResult]] = [
        check_storage,
        check_free_space,
        check_database,
        check_orphan_files,
        check_audit_spool,
        check_model_weights,
    ]
    results += [guarded(check.__name__, _as_list(check, settings))[0] for check in single]
    results += guarded("peers", lambda: check_peers(settings, now=now))
    results += guarded("tls", lambda: check_tls(settings, now=now))
    results += guarded("ports", lambda: check_ports(settings))
    return results


def _as_list(
    check: Callable[[Settings], CheckResult], settings: Settings
) -> Callable[[], list[CheckResult]]:
    """``check`` for ``settings`` as :func:`guarded` runs it."""
    return lambda: [check(settings)]


def guarded(name: str, check: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """Run one check; an error nobody foresaw becomes a ``fail`` row, never a traceback."""
    try:
        return check()
    except DicomNodeError as exc:
        return [
            CheckResult(
                name.removeprefix("check_").replace("_", " "), FAIL, str(exc), "see the message"
            )
        ]
    except Exception as exc:
        return [
            CheckResult(
                name.removeprefix("check_").replace("_", " "),
                FAIL,
                f"the check itself failed ({type(exc).__name__}: {exc})",
                "report this with the output of `dicom-node doctor --json`",
            )
        ]


def check_storage(settings: Settings) -> CheckResult:
    """The storage root exists and a file written there reaches the disk (write, fsync, delete)."""
    root = Path(settings.storage.root)
    create = (
        f"create it: install -d -m 750 -o dicom-node -g dicom-node {root} "
        "(for /var/lib/dicom-node, `systemd-tmpfiles --create` does this)"
    )
    if not root.exists():
        return CheckResult("storage root", FAIL, f"{root} does not exist", create)
    if not root.is_dir():
        return CheckResult(
            "storage root",
            FAIL,
            f"{root} is not a directory",
            f"set [storage] root to a directory, or {create}",
        )
    try:
        probe_writable(root, f".doctor-{os.getpid()}.tmp")
    except OSError as exc:
        return CheckResult(
            "storage root",
            FAIL,
            f"cannot write in {root} as {service_user()} ({exc.strerror or exc})",
            f"chown -R dicom-node:dicom-node {root}, and check it is not "
            "mounted read-only (or immutable: lsattr -d)",
        )
    return CheckResult("storage root", OK, f"{root} is writable by {service_user()} (write+fsync)")


def check_free_space(settings: Settings) -> CheckResult:
    """Free space in the storage root against ``[storage] min_free_mb`` (C-STORE refuses below)."""
    root = Path(settings.storage.root)
    if not root.is_dir():
        return CheckResult(
            "free space",
            WARN,
            f"not checked: {root} is not a directory",
            "fix the storage root first",
        )
    free_mb = shutil.disk_usage(root).free // (1024 * 1024)
    minimum = settings.storage.min_free_mb
    detail = f"{free_mb} MB free in {root}, [storage] min_free_mb = {minimum}"
    fix = (
        f"free space on the file system of {root}, move the root to a bigger disk, or "
        "lower [storage] min_free_mb"
    )
    if free_mb < minimum:
        return CheckResult("free space", FAIL, f"{detail}: C-STORE answers 0xA700", fix)
    if free_mb < 2 * minimum:
        return CheckResult("free space", WARN, f"{detail}: less than twice the minimum", fix)
    return CheckResult("free space", OK, detail)


def _redacted(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split(":", 1)[0] + "://..."


def check_database(settings: Settings) -> CheckResult:
    """The database answers and its schema is at this release's head revision."""
    url = settings.database_url
    shown = _redacted(url)
    upgrade = "dicom-node db upgrade"
    if url.startswith("sqlite"):
        path = Path(url.split("///", 1)[-1])
        if not path.is_file():  # checked first: connecting would create an empty file
            return CheckResult(
                "database",
                FAIL,
                f"SQLite database {path} does not exist",
                f"{upgrade} (creates and migrates it)",
            )
    engine = make_engine(url, settings.database.busy_timeout_ms)
    try:
        current, head = migrate.current_revision(engine), migrate.head_revision(engine)
        known = _known_revision(engine, current)
    except SQLAlchemyError as exc:
        reason = str(getattr(exc, "orig", None) or type(exc).__name__).splitlines()[0][:160]
        return CheckResult(
            "database",
            FAIL,
            f"cannot use {shown}: {reason}",
            "check [database] url, that the server runs and that this user may connect",
        )
    finally:
        engine.dispose()
    if current == head:
        return CheckResult("database", OK, f"{shown} at schema head {head}")
    if not known:
        return CheckResult(
            "database",
            FAIL,
            f"schema at revision {current}, which this release does not know "
            "(a newer release migrated it?)",
            "run the release that migrated it, or restore the database backup",
        )
    return CheckResult(
        "database",
        FAIL,
        f"schema at revision {current or 'none (empty)'}, this release needs {head}",
        upgrade,
    )


def _known_revision(engine: Engine, revision: str | None) -> bool:
    if revision is None:
        return True
    try:
        return (
            ScriptDirectory.from_config(migrate.alembic_config(engine)).get_revision(revision)
            is not None
        )
    except CommandError:
        return False


def check_model_weights(settings: Settings) -> CheckResult:
    """The configured model's file is installed and matches the SHA-256 in the registry."""
    name, models_dir = settings.model.name, settings.models_dir
    if settings.model.weights:
        return _check_weights_file(settings, Path(settings.model.weights))
    record = read_registry(models_dir).get(name)  # ModelError (corrupted) becomes a fail row
    install_fix = (
        f"dicom-node models pull {name} (offline: dicom-node models import FILE --name {name})"
        if name in CATALOGUE
        else f"dicom-node models import FILE --card CARD.toml --name {name}"
    )
    if record is None:
        if settings.model.allow_untrained:
            return CheckResult(
                "model weights",
                WARN,
                f"no weights for {name}: the worker runs "
                "an UNTRAINED DEMO MODEL ([model] allow_untrained = true)",
                install_fix + ", then set allow_untrained = false",
            )
        return CheckResult(
            "model weights", FAIL, f"no weights installed for {name} in {models_dir}", install_fix
        )
    found = {model: (ok, message) for model, ok, message in verify(models_dir)}
    ok, message = found[name]
    if not ok:
        return CheckResult(
            "model weights",
            FAIL,
            f"{name}: {message}",
            f"import the original file again: dicom-node models import FILE "
            f"{'' if name in CATALOGUE else '--card CARD.toml '}--name {name} "
            f"(it must have SHA-256 {record.sha256[:16]}…)",
        )
    return CheckResult("model weights", OK, f"{name}: {message} ({record.trust})")


def _check_weights_file(settings: Settings, path: Path) -> CheckResult:
    name = settings.model.name
    if not path.is_file():
        return CheckResult(
            "model weights",
            FAIL,
            f"[model] weights = {path}: file not found",
            "fix the path, or empty it to use the installed model",
        )
    registered = {r.sha256 for r in read_registry(settings.models_dir).values()}
    if file_sha256(path) in registered:
        return CheckResult("model weights", OK, f"{path} matches a registered SHA-256")
    fix = f"register the release file: dicom-node models import {path} --name {name}"
    if settings.model.allow_unverified:
        return CheckResult(
            "model weights",
            WARN,
            f"{path} is not in the registry: results say UNVERIFIED WEIGHTS",
            fix,
        )
    return CheckResult(
        "model weights",
        FAIL,
        f"{path} is not in the registry and "
        "[model] allow_unverified = false: the worker refuses it",
        fix,
    )
