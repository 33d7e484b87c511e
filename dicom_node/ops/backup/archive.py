"""Back up and restore a node: the database, the files its rows name, and the installed models.

A backup is a folder::

    manifest.json     what it holds: release, schema revision, database kind, row counts, sizes
    SHA256SUMS        SHA-256 of every other file (``sha256sum -c SHA256SUMS`` checks it by hand)
    database.sqlite3  or database.pgdump (pg_dump custom format)
    storage/...       received instances, output objects, heatmap archives (paths as in the root)
    models/...        the installed weights and registry.json (sites often cannot download them)

Order makes it consistent while the node works: the database is snapshotted first, then exactly
the files the snapshot's rows name are copied.  The node writes (and fsyncs) every file before
the transaction that records it, so each of those files exists; files that arrived after the
snapshot are left out, as their rows are.  ``manifest.json`` is written last: a folder without
one is an unfinished backup and is refused.  A restore writes the files first and the database
last, then migrates an older schema up to this release's head.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

from alembic.script import ScriptDirectory

from dicom_node import __version__
from dicom_node.config.settings import Settings
from dicom_node.db import migrate
from dicom_node.db.session import make_engine
from dicom_node.errors import (
    BackupError,
    BackupIntegrityError,
    BackupSchemaError,
    BackupTargetNotEmptyError,
)
from dicom_node.ops.backup.database import (
    Snapshot,
    database_kind,
    database_rows,
    restore_database,
    snapshot_database,
    sqlite_path,
    table_rows,
)
from dicom_node.ops.backup.files import (
    check_hash,
    copy_hashed,
    give_to_owner_of,
    hash_file,
    safe_relative,
    write_json_durably,
)
from dicom_node.store import INSTANCES_DIR, TMP_DIR, prepare_store

MANIFEST = "manifest.json"
CHECKSUMS = "SHA256SUMS"
STORAGE = "storage"
MODELS = "models"
FORMAT = 1
MANAGED_DIRS = (INSTANCES_DIR, "outputs", "results")  # what the database's rows point into


@dataclass(frozen=True)
class Manifest:
    """The parts of ``manifest.json`` a restore relies on."""

    node_version: str
    created_at: str
    kind: str
    database_file: str
    database_sha256: str
    schema_revision: str | None
    tables: dict[str, int]
    checksums_sha256: str
    file_count: int
    missing_files: tuple[str, ...]


@dataclass(frozen=True)
class BackupSummary:
    """What ``backup create`` wrote (and what ``restore`` put back)."""

    folder: Path
    kind: str
    schema_revision: str | None
    tables: dict[str, int]
    file_count: int
    file_bytes: int
    missing_files: tuple[str, ...]
    models_restored: bool = True


def create_backup(
    settings: Settings, destination: Path, *, now: datetime, include_models: bool = True
) -> BackupSummary:
    """Snapshot the database into the empty ``destination``, then copy the files it names."""
    root = Path(settings.storage.root).resolve()
    destination = destination.resolve()
    _check_destination(destination, root)
    existed = destination.exists()
    try:
        return _write_backup(settings, destination, root, now, include_models)
    except BaseException:  # it was empty: leave no half backup behind
        if not existed:
            shutil.rmtree(destination, ignore_errors=True)
        for child in destination.iterdir() if existed else ():
            if child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        raise


def _write_backup(
    settings: Settings, destination: Path, root: Path, now: datetime, include_models: bool
) -> BackupSummary:
    try:
        # The dump holds patient names and IDs: only the backup's owner may read it, whatever
        # the umask of the cron job or timer that runs the backup.
        destination.mkdir(parents=True, exist_ok=True, mode=0o700)
        destination.chmod(0o700)
        snapshot = snapshot_database(
            settings.database_url, destination, settings.database.busy_timeout_ms
        )
        sums = [(hash_file(destination / snapshot.file_name)[0], snapshot.file_name)]
        missing: list[str] = []
        for relative in snapshot.referenced_paths:
            try:
                digest = copy_hashed(
                    root / safe_relative(relative), destination / STORAGE / relative
                )[0]
            except FileNotFoundError:
                missing.append(relative)  # retention purged it meanwhile, or it was lost
                continue
            sums.append((digest, f"{STORAGE}/{relative}"))
        if include_models:
            sums += _copy_models(settings.models_dir, destination / MODELS)
        checksums = "".join(f"{digest}  {name}\n" for digest, name in sums)
        (destination / CHECKSUMS).write_text(checksums, encoding="utf-8")
        os.sync()  # every copied file is on disk before the manifest says the backup is whole
        file_bytes = sum((destination / name).stat().st_size for _, name in sums[1:])
        write_json_durably(
            destination / MANIFEST,
            _manifest_json(snapshot, sums, checksums, missing, file_bytes, now, include_models),
        )
    except OSError as exc:
        raise BackupError(
            f"backup failed at {exc.filename or destination}: {exc.strerror or exc}"
        ) from exc
    return BackupSummary(
        destination,
        snapshot.kind,
        snapshot.schema_revision,
        snapshot.tables,
        len(sums) - 1,
        file_bytes,
        tuple(missing),
    )


def _check_destination(destination: Path, root: Path) -> None:
    if destination == root or root in destination.parents:
        raise BackupError(
            f"the backup folder {destination} is inside the storage root {root}: "
            "choose a folder on another disk"
        )
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise BackupTargetNotEmptyError(
            f"the backup folder {destination} is not empty: give a new or empty folder"
        )


def _copy_models(models_dir: Path, target: Path) -> list[tuple[str, str]]:
    """Copy the installed models (not half-written ``.name`` temp files)."""
    if not models_dir.is_dir():
        return []
    sums = []
    for source in sorted(models_dir.rglob("*")):
        relative = source.relative_to(models_dir)
        if source.is_file() and not any(part.startswith(".") for part in relative.parts):
            sums.append((copy_hashed(source, target / relative)[0], f"{MODELS}/{relative}"))
    return sums


def _manifest_json(
    snapshot: Snapshot,
    sums: list[tuple[str, str]],
    checksums: str,
    missing: list[str],
    file_bytes: int,
    now: datetime,
    include_models: bool,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "node_version": __version__,
        "created_at": now.isoformat(timespec="seconds"),
        "schema_revision": snapshot.schema_revision,
        "database": {"kind": snapshot.kind, "file": snapshot.file_name, "sha256": sums[0][0]},
        "tables": snapshot.tables,
        "files": {
            "count": len(sums) - 1,
            "bytes": file_bytes,
            "checksums": CHECKSUMS,
            "checksums_sha256": hashlib.sha256(checksums.encode()).hexdigest(),
        },
        "models_included": include_models,
        "missing_files": missing,
    }


def read_manifest(folder: Path) -> Manifest:
    """The backup's manifest, checked for every key a restore needs.

    Raises
    ------
    BackupIntegrityError
        When the folder or manifest is missing (an unfinished backup), unreadable or incomplete.
    """
    if not folder.is_dir():
        raise BackupIntegrityError(f"no backup folder at {folder}")
    try:
        raw = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
        manifest = Manifest(
            node_version=str(raw["node_version"]),
            created_at=str(raw["created_at"]),
            kind=str(raw["database"]["kind"]),
            database_file=str(raw["database"]["file"]),
            database_sha256=str(raw["database"]["sha256"]),
            schema_revision=None if raw["schema_revision"] is None else str(raw["schema_revision"]),
            tables={str(k): int(v) for k, v in raw["tables"].items()},
            checksums_sha256=str(raw["files"]["checksums_sha256"]),
            file_count=int(raw["files"]["count"]),
            missing_files=tuple(str(p) for p in raw.get("missing_files", [])),
        )
    except FileNotFoundError:
        raise BackupIntegrityError(
            f"{folder} has no {MANIFEST}: it is not a backup, or the backup did not finish"
        ) from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BackupIntegrityError(
            f"{folder / MANIFEST} is damaged ({type(exc).__name__}): use another backup"
        ) from None
    if int(raw.get("format", 0)) > FORMAT:
        raise BackupSchemaError(
            f"the backup format {raw['format']} is newer than this release "
            f"reads ({FORMAT}): install dicom-node {manifest.node_version}"
        )
    return manifest


def read_checksums(folder: Path, manifest: Manifest) -> list[tuple[str, str]]:
    """(SHA-256, name) of every file of the backup; the manifest vouches for SHA256SUMS."""
    try:
        data = (folder / CHECKSUMS).read_bytes()
    except OSError as exc:
        raise BackupIntegrityError(
            f"cannot read {folder / CHECKSUMS}: {exc.strerror or exc}"
        ) from None
    if hashlib.sha256(data).hexdigest() != manifest.checksums_sha256:
        raise BackupIntegrityError(f"checksum mismatch: {CHECKSUMS} differs from the manifest")
    entries = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines()):
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not (
            name == manifest.database_file
            if number == 0
            else name.startswith((f"{STORAGE}/", f"{MODELS}/"))
        ):
            raise BackupIntegrityError(f"{CHECKSUMS} has a malformed line: {line[:120]!r}")
        entries.append((digest, str(safe_relative(name))))
    if len(entries) - 1 != manifest.file_count:
        raise BackupIntegrityError(
            f"{CHECKSUMS} lists {len(entries) - 1} files, the manifest {manifest.file_count}"
        )
    return entries


def verify_backup(folder: Path) -> Manifest:
    """Re-hash every file of the backup against SHA256SUMS; returns the manifest."""
    manifest = read_manifest(folder)
    entries = read_checksums(folder, manifest)
    if entries[0][0] != manifest.database_sha256:
        raise BackupIntegrityError(
            "checksum mismatch: the database dump's SHA-256 in "
            f"{CHECKSUMS} differs from the manifest"
        )
    for digest, name in entries:
        check_hash(folder / name, digest, name)
    return manifest


def restore_backup(settings: Settings, folder: Path, *, force: bool = False) -> BackupSummary:
    """Put the backup in ``folder`` into this node's (empty, or ``force``) storage and database.

    Order: every check first, then the files (each verified before it takes its name), then
    the database, its row counts checked against the manifest, then ``db upgrade`` when the
    backup's schema is older than this release's.
    """
    manifest = read_manifest(folder)
    entries = read_checksums(folder, manifest)
    url, root = settings.database_url, Path(settings.storage.root).resolve()
    kind = database_kind(url)
    if manifest.kind != kind:
        raise BackupError(
            f"the backup holds a {manifest.kind} database, this node is configured "
            f"for {kind} ([database] url): restore into a {manifest.kind} database"
        )
    _check_schema_known(manifest)
    if not force:
        _check_target_empty(settings, root)
    if entries[0][0] != manifest.database_sha256:
        raise BackupIntegrityError(
            "checksum mismatch: the database dump's SHA-256 in "
            f"{CHECKSUMS} differs from the manifest"
        )
    check_hash(folder / manifest.database_file, manifest.database_sha256, manifest.database_file)
    models_dir = settings.models_dir
    restore_models = force or not _has_files(models_dir)
    try:
        if force:
            for name in MANAGED_DIRS:
                shutil.rmtree(root / name, ignore_errors=True)
        file_bytes = _restore_files(folder, entries[1:], root, models_dir, restore_models)
        prepare_store(root)
        os.sync()  # the files are on disk before the rows that name them
    except OSError as exc:
        raise BackupError(
            f"cannot write {exc.filename or root}: {exc.strerror or exc}; the "
            "database was not restored: free the space or fix the permission, "
            "then run the restore again with --force"
        ) from exc
    restore_database(url, folder / manifest.database_file)
    _check_restored_rows(url, manifest)
    _upgrade_if_older(url)
    database = (
        [
            sqlite_path(url).with_name(sqlite_path(url).name + suffix)
            for suffix in ("", "-wal", "-shm")
        ]
        if kind == "sqlite"
        else []
    )
    give_to_owner_of(
        root, [root / name for name in (*MANAGED_DIRS, TMP_DIR)] + [models_dir], database
    )
    return BackupSummary(
        folder,
        kind,
        manifest.schema_revision,
        manifest.tables,
        len(entries) - 1,
        file_bytes,
        manifest.missing_files,
        restore_models,
    )


def _check_schema_known(manifest: Manifest) -> None:
    script = ScriptDirectory(str(resources.files("dicom_node.migrations")))
    known = {revision.revision for revision in script.walk_revisions()}
    if manifest.schema_revision is not None and manifest.schema_revision not in known:
        raise BackupSchemaError(
            f"the backup's schema revision {manifest.schema_revision} is newer than this "
            f"release knows (dicom-node {__version__}, head {script.get_current_head()}): "
            f"upgrade the node to dicom-node {manifest.node_version} or newer first, then "
            "restore"
        )


def _check_target_empty(settings: Settings, root: Path) -> None:
    rows = database_rows(settings.database_url)
    if rows:
        raise BackupTargetNotEmptyError(
            f"the database already holds {rows} rows: restore into a fresh database, or add "
            "--force to replace it (everything it holds is lost)"
        )
    skipped = {root / TMP_DIR, settings.models_dir.resolve()}
    if database_kind(settings.database_url) == "sqlite":
        database = sqlite_path(settings.database_url).resolve()
        skipped |= {database.with_name(database.name + s) for s in ("", "-wal", "-shm", "-journal")}
    for path in root.rglob("*") if root.is_dir() else ():
        if path.is_file() and not any(p in skipped for p in (path, *path.parents)):
            raise BackupTargetNotEmptyError(
                f"the storage root {root} already holds files ({path.relative_to(root)}): "
                "restore into an empty one, or add --force to replace its images and results"
            )


def _has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def _restore_files(
    folder: Path, entries: list[tuple[str, str]], root: Path, models_dir: Path, restore_models: bool
) -> int:
    """Copy each file to its place, under a temp name until its SHA-256 matches."""
    total = 0
    for digest, name in entries:
        top, _, rest = name.partition("/")
        if top == MODELS and not restore_models:
            continue
        target = (root if top == STORAGE else models_dir) / rest
        temp = target.with_name(f".{target.name}.restore")
        actual, size = copy_hashed(folder / name, temp)
        if actual != digest:
            temp.unlink(missing_ok=True)
            raise BackupIntegrityError(
                f"checksum mismatch: {name} in the backup differs from its SHA-256; the restore "
                "stopped before the database (the target holds part of the files): use another "
                "backup and add --force"
            )
        os.replace(temp, target)
        total += size
    return total


def _check_restored_rows(url: str, manifest: Manifest) -> None:
    tables = table_rows(url)
    if tables != manifest.tables:
        differ = sorted(
            n for n in set(tables) | set(manifest.tables) if tables.get(n) != manifest.tables.get(n)
        )
        raise BackupIntegrityError(
            f"the restored database's row counts differ from the manifest in {', '.join(differ)}"
        )


def _upgrade_if_older(url: str) -> None:
    engine = make_engine(url)  # the node's own engine: WAL and foreign keys on SQLite
    try:
        if migrate.current_revision(engine) != migrate.head_revision(engine):
            migrate.upgrade(engine)
    finally:
        engine.dispose()
