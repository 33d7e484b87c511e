"""The database half of a backup: a consistent snapshot of SQLite or PostgreSQL, and its restore.

SQLite: the sqlite3 online backup API copies every page in one step, inside one read
transaction; in WAL mode the node keeps writing meanwhile (readers never block writers).
PostgreSQL: ``pg_dump --format=custom --snapshot=ID`` dumps an exported REPEATABLE READ
snapshot, and the same snapshot gives the schema revision, the row counts and the files the rows
reference, so the list of files to copy matches the dump exactly.  Credentials go to the libpq
tools through the environment (``PGPASSWORD`` and friends), never on their command line.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from dicom_node.errors import BackupError
from dicom_node.store import fsync_dir

SQLITE_FILE = "database.sqlite3"
POSTGRES_FILE = "database.pgdump"
VERSION_TABLE = "alembic_version"
# Columns that name a file under the storage root ("file.npz#label" for heatmaps), and the
# column that says the file was removed on purpose (retention purges received images).
FILE_COLUMNS = (
    ("instances", "path", "purged_at"),
    ("outputs", "path", None),
    ("findings", "heatmap_path", None),
)
# URL query keys of a SQLAlchemy/psycopg URL and the libpq environment variable of each.
LIBPQ_ENVIRONMENT = {
    "host": "PGHOST",
    "port": "PGPORT",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "application_name": "PGAPPNAME",
    "options": "PGOPTIONS",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "gssencmode": "PGGSSENCMODE",
}


@dataclass(frozen=True)
class Snapshot:
    """What one database snapshot holds, read from the snapshot itself."""

    kind: str  # sqlite or postgresql
    file_name: str  # the dump's name inside the backup folder
    schema_revision: str | None  # the Alembic revision of the snapshot
    tables: dict[str, int]  # rows per table
    referenced_paths: tuple[str, ...]  # files under the storage root the rows name


def database_kind(url: str) -> str:
    """``sqlite`` or ``postgresql``; any other URL is refused."""
    if url.startswith("sqlite"):
        return "sqlite"
    if url.startswith("postgresql"):
        return "postgresql"
    raise BackupError(
        f"cannot back up a {url.split(':', 1)[0]} database: only SQLite and "
        "PostgreSQL are supported"
    )


def sqlite_path(url: str) -> Path:
    """The database file of a ``sqlite:///PATH`` URL."""
    database = url.split("///", 1)[-1]
    if not database or database == ":memory:":
        raise BackupError("an in-memory SQLite database cannot be backed up or restored")
    return Path(database)


def read_facts(connection: Connection) -> tuple[str | None, dict[str, int], tuple[str, ...]]:
    """Schema revision, rows per table and referenced files, as one connection sees them."""
    names = set(inspect(connection).get_table_names())
    revision = None
    if VERSION_TABLE in names:
        revision = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()
    tables = {
        name: int(connection.execute(text(f'SELECT count(*) FROM "{name}"')).scalar_one())
        for name in sorted(names)
    }
    paths: set[str] = set()
    for table, column, removed in FILE_COLUMNS:
        if table in names:
            kept = ""
            if removed and removed in {c["name"] for c in inspect(connection).get_columns(table)}:
                kept = f" AND {removed} IS NULL"
            rows = connection.execute(
                text(f"SELECT DISTINCT {column} FROM {table} WHERE {column} IS NOT NULL{kept}")
            )
            paths.update(str(value).split("#", 1)[0] for (value,) in rows)
    return revision, tables, tuple(sorted(paths))


def database_rows(url: str) -> int:
    """Rows held by the database at ``url``, its version table aside (0: a fresh install)."""
    if database_kind(url) == "sqlite" and not sqlite_path(url).is_file():
        return 0
    return sum(count for name, count in table_rows(url).items() if name != VERSION_TABLE)


def table_rows(url: str) -> dict[str, int]:
    """Rows per table of the database at ``url`` (as :func:`read_facts` counts them)."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            _, tables, _ = read_facts(connection)
    finally:
        engine.dispose()
    return tables


def snapshot_database(url: str, folder: Path, busy_timeout_ms: int) -> Snapshot:
    """Write a consistent copy of the database into ``folder``; returns what it holds."""
    if database_kind(url) == "sqlite":
        return _sqlite_snapshot(sqlite_path(url), folder / SQLITE_FILE, busy_timeout_ms)
    return _postgres_snapshot(url, folder / POSTGRES_FILE)


def _sqlite_snapshot(database: Path, target: Path, busy_timeout_ms: int) -> Snapshot:
    if not database.is_file():
        raise BackupError(
            f"no SQLite database at {database}: check [database] url and [storage] root"
        )
    try:
        with (
            closing(sqlite3.connect(database, timeout=busy_timeout_ms / 1000)) as source,
            closing(sqlite3.connect(target)) as copy,
        ):
            source.backup(copy)  # pages=-1: every page in one step, one read transaction
            copy.execute("PRAGMA journal_mode=DELETE")  # the copy is one self-contained file
            check = copy.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.Error as exc:
        raise BackupError(f"SQLite backup of {database} failed: {exc}") from exc
    target.chmod(0o600)  # patient data: readable by the backup's owner only
    if check != "ok":
        raise BackupError(f"the SQLite copy fails its integrity check: {check}")
    engine = create_engine(f"sqlite:///{target}", poolclass=NullPool)
    try:
        with engine.connect() as connection:
            revision, tables, paths = read_facts(connection)
    finally:
        engine.dispose()
    return Snapshot("sqlite", SQLITE_FILE, revision, tables, paths)


def _postgres_snapshot(url: str, target: Path) -> Snapshot:
    pg_dump = find_pg_tool("pg_dump", os.environ.get("PATH", ""), Path("/usr/lib/postgresql"))
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as connection:
            with connection.begin():
                # The first statement fixes the transaction's snapshot; pg_dump dumps that one.
                snapshot_id = connection.execute(text("SELECT pg_export_snapshot()")).scalar_one()
                revision, tables, paths = read_facts(connection)
                run_pg_tool(
                    [
                        pg_dump,
                        "--format=custom",
                        "--no-password",
                        f"--snapshot={snapshot_id}",
                        f"--file={target}",
                    ],
                    url,
                )
    finally:
        engine.dispose()
    target.chmod(0o600)  # patient data: readable by the backup's owner only
    return Snapshot("postgresql", POSTGRES_FILE, revision, tables, paths)


def restore_database(url: str, dump: Path) -> None:
    """Put the dump at ``dump`` in place of the database at ``url``, whose rows the caller
    has checked to be none (or been told to replace)."""
    if database_kind(url) == "sqlite":
        _sqlite_restore(sqlite_path(url), dump)
    else:
        _postgres_restore(url, dump)


def _sqlite_restore(database: Path, dump: Path) -> None:
    """Copy the dump next to the database, fsync, then rename it over the old file."""
    database.parent.mkdir(parents=True, exist_ok=True)
    temp = database.with_name(f".{database.name}.restore-{os.getpid()}")
    try:
        shutil.copyfile(dump, temp)
        temp.chmod(0o640)  # as the store's files: the node's user and group only
        with temp.open("rb+") as handle:
            os.fsync(handle.fileno())
        for suffix in ("-wal", "-shm", "-journal"):  # the old database's, else SQLite replays them
            database.with_name(database.name + suffix).unlink(missing_ok=True)
        os.replace(temp, database)
        fsync_dir(database.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise BackupError(
            f"cannot write the SQLite database {database}: {exc.strerror or exc}"
        ) from exc


def _postgres_restore(url: str, dump: Path) -> None:
    pg_restore = find_pg_tool("pg_restore", os.environ.get("PATH", ""), Path("/usr/lib/postgresql"))
    # The target is checked empty (no rows) or --force was given, so its tables may go: --clean
    # drops only what the dump holds, and a freshly migrated newer schema may hold more.
    _drop_tables(url)
    database = make_url(url).database or ""
    quoted = database.replace("\\", "\\\\").replace("'", "\\'")
    run_pg_tool(
        [
            pg_restore,
            "--clean",
            "--if-exists",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            "--no-password",
            f"--dbname=dbname='{quoted}'",
            str(dump),
        ],
        url,
    )


def _drop_tables(url: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as connection:
            for name in inspect(connection).get_table_names():
                connection.execute(text(f'DROP TABLE IF EXISTS "{name}" CASCADE'))
    finally:
        engine.dispose()


def find_pg_tool(name: str, search_path: str, install_root: Path) -> str:
    """``name`` (pg_dump, pg_restore) on ``search_path``, else the newest under ``install_root``.

    Raises
    ------
    BackupError
        When neither has it, naming the package that provides it.
    """
    found = shutil.which(name, path=search_path) if search_path else None
    if found:
        return found
    versions = sorted(
        install_root.glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if versions:
        return str(versions[-1])
    raise BackupError(
        f"{name} not found on PATH or in {install_root}/*/bin: install the "
        "PostgreSQL client tools (apt-get install postgresql-client), the same "
        "major version as the server or newer"
    )


def libpq_environment(url: str) -> dict[str, str]:
    """The libpq environment variables that connect to the database of a SQLAlchemy URL.

    ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB?sslmode=...`` becomes PGUSER,
    PGPASSWORD, PGHOST, PGPORT, PGDATABASE, PGSSLMODE, ... so no secret is in ``ps``.
    """
    parsed = make_url(url)
    environment = {
        "PGDATABASE": parsed.database or "",
        "PGHOST": parsed.host or "",
        "PGPORT": str(parsed.port or ""),
        "PGUSER": parsed.username or "",
        "PGPASSWORD": parsed.password or "",
    }
    for key, value in parsed.query.items():
        if key not in LIBPQ_ENVIRONMENT:
            raise BackupError(
                f"the [database] url option {key!r} cannot be passed to the PostgreSQL tools"
            )
        environment[LIBPQ_ENVIRONMENT[key]] = value if isinstance(value, str) else value[-1]
    return {name: value for name, value in environment.items() if value}


def run_pg_tool(command: list[str], url: str) -> None:
    """Run pg_dump or pg_restore against ``url``; its last error line becomes a BackupError."""
    environment = {**os.environ, **libpq_environment(url)}
    try:
        finished = subprocess.run(
            command, env=environment, capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise BackupError(f"cannot run {command[0]}: {exc.strerror or exc}") from exc
    if finished.returncode != 0:
        lines = [line for line in finished.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {finished.returncode}"
        raise BackupError(f"{Path(command[0]).name} failed: {last}")
