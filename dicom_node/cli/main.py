"""The ``dicom-node`` command: parse arguments, load settings, call the right entry point.

One of the three places errors are translated: ``ConfigError`` (and its ``TlsConfigError``:
unusable ``[tls]`` files) prints every problem and exits 2; other ``DicomNodeError``s print
one line and exit 1.  No business logic lives here.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pydicom.config
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from dicom_node import __version__
from dicom_node.config.settings import ROLES, Settings, load_settings, resolve_config_path
from dicom_node.db import migrate
from dicom_node.db.models import Instance, Study
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.errors import BackupError, ConfigError, DicomNodeError
from dicom_node.cli.users import add_parser as add_users_parser
from dicom_node.cli.users import run_users_command
from dicom_node.cli.audit import add_parser as add_audit_parser
from dicom_node.cli.audit import run_audit_command
from dicom_node.cli.backup import add_parser as add_backup_parser
from dicom_node.cli.backup import exit_code as backup_exit_code
from dicom_node.cli.backup import run_backup_command
from dicom_node.cli.doctor import add_parser as add_doctor_parser
from dicom_node.cli.doctor import run_doctor_command
from dicom_node.cli.retention import add_parser as add_retention_parser
from dicom_node.cli.retention import run_retention_command
from dicom_node.clock import utcnow
from dicom_node.audit.trail import record_audit
from dicom_node.jobs.queue import count_by_state
from dicom_node.scu.debug_send import collect_files, send_local_files
from dicom_node.ops.actions import retry_job
from dicom_node.logs import configure_logging
from dicom_node.scu.tls import check_peer_tls, server_context

EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-node", description=(
        "PACS-side DICOM processing node for chest X-rays (AI results are for decision "
        "support only)."))
    parser.add_argument("--config", metavar="PATH", help=(
        "TOML config file (default: $DICOM_NODE_CONFIG, else config/dicom-node.toml)"))
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node until SIGTERM/SIGINT")
    serve.add_argument("--role", choices=ROLES, action="append", help=(
        "run only this role (repeatable): scp, worker or web (the AI worklist and API); "
        "default: all roles in one process"))

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="migrate the database to this release's schema")
    downgrade = db_commands.add_parser("downgrade", help="migrate down to REVISION")
    downgrade.add_argument("revision", help="target revision, or 'base' for an empty database")
    db_commands.add_parser("current", help="print the database's schema revision")

    config = commands.add_parser("config", help="configuration")
    config.add_subparsers(dest="config_command", required=True).add_parser(
        "check", help="validate the configuration and print the effective settings")

    commands.add_parser("status", help="counts of studies, instances and jobs per state")

    models = commands.add_parser("models", help="model catalogue and installed weights")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    model_commands.add_parser("list", help="the catalogue, and what is installed")
    pull = model_commands.add_parser("pull", help="download, check and install a model")
    pull.add_argument("name")
    pull.add_argument("--url", help="a site mirror of the release file")
    imported = model_commands.add_parser("import", help="install a local file (air-gapped sites)")
    imported.add_argument("file")
    imported.add_argument("--name", required=True)
    model_commands.add_parser("verify", help="re-check installed files against their SHA-256")

    jobs = commands.add_parser("jobs", help="analysis and delivery jobs")
    retry = jobs.add_subparsers(dest="jobs_command", required=True).add_parser(
        "retry", help="re-queue a dead or failed job")
    retry.add_argument("job_id", type=int)

    add_users_parser(commands)
    add_audit_parser(commands)
    add_backup_parser(commands)
    add_doctor_parser(commands)
    add_retention_parser(commands)

    debug = commands.add_parser("debug", help="inspection tools")
    debug_commands = debug.add_subparsers(dest="debug_command", required=True)
    preprocess = debug_commands.add_parser(
        "preprocess", help="write the model input of a DICOM file as .npy")
    preprocess.add_argument("file")
    preprocess.add_argument("--out", required=True)
    send = debug_commands.add_parser("send", help=(
        "send DICOM files (or folders) to the node, each in its own transfer syntax "
        "(compressed files too): a test study"))
    send.add_argument("paths", nargs="+", metavar="PATH")
    send.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    send.add_argument("--port", type=int, help="default: [node] port")
    send.add_argument("--called", metavar="AE", help="default: [node] ae_title")
    send.add_argument("--calling", metavar="AE", help=(
        "the AE title to send as; it must be a configured [[peers]] entry whose host is this "
        "machine (default: the first peer's)"))

    demo = commands.add_parser("demo", help="run the node end to end on sample studies")
    demo.add_argument("--dicom-dir", metavar="DIR", help="send your own DICOM files instead")
    demo.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    demo.add_argument("--serve-web", action="store_true", help=(
        "keep serving the worklist until Ctrl-C (the default when run from a terminal)"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        if args.command == "demo":
            from dicom_node.dev.demo import run_demo  # imported here: only the demo needs it
            configure_logging("WARNING", "console")
            return run_demo(dicom_dir=args.dicom_dir, keep=args.keep, serve_web=args.serve_web)
        if args.command == "doctor":  # before loading: a broken config is one of its rows
            return run_doctor_command(args, os.environ)
        settings = load_settings(resolve_config_path(args.config, os.environ), os.environ)
        if args.command == "serve":  # a service: [logging] as configured (JSON for journald)
            configure_logging(settings.logging.level, settings.logging.format)
        else:  # a person at a terminal: human text, and only what needs their attention
            configure_logging(_at_least_warning(settings.logging.level), "console")
        return _dispatch(args, settings)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except BackupError as exc:  # 3 not empty, 4 damaged, 5 needs a newer release, else 1
        print(f"error: {exc}", file=sys.stderr)
        return backup_exit_code(exc)
    except DicomNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except SQLAlchemyError as exc:
        print(f"error: database unavailable ({type(exc).__name__}); check [database] url",
              file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # Output piped into `head` and the like: stop quietly (Python docs, signal/SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def _at_least_warning(level: str) -> str:
    """The configured level, raised to WARNING: progress lines of alembic and our own INFO
    events would bury a command's answer (they are for the service's journal)."""
    return level if level in ("WARNING", "ERROR", "CRITICAL") else "WARNING"


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        return _serve(settings, tuple(args.role or ROLES))
    if args.command == "db":
        return _db(settings, args.db_command, getattr(args, "revision", None))
    if args.command == "config":
        return _config_check(settings)
    if args.command == "models":
        from dicom_node.cli.models import run_models_command  # torch: only these commands need it
        return run_models_command(settings, args)
    if args.command == "jobs":
        return _retry_job(settings, args.job_id)
    if args.command == "users":
        with _engine(settings) as engine:
            return run_users_command(engine, args)
    if args.command == "audit":
        with _engine(settings) as engine:
            return run_audit_command(engine, args)
    if args.command == "retention":
        with _engine(settings) as engine:
            return run_retention_command(settings, engine, args)
    if args.command == "backup":
        return run_backup_command(settings, args)
    if args.command == "debug" and args.debug_command == "send":
        return _debug_send(settings, args)
    if args.command == "debug":
        from dicom_node.cli.models import debug_preprocess
        return debug_preprocess(settings, Path(args.file), Path(args.out))
    return _status(settings)


@contextlib.contextmanager
def _engine(settings: Settings, *, migrated: bool = True) -> Iterator[Engine]:
    """The database for one command, checked to be at this release's schema when asked."""
    engine = make_engine(settings.database_url, settings.database.busy_timeout_ms)
    try:
        if migrated:
            migrate.require_head(engine)
        yield engine
    finally:
        engine.dispose()


def _retry_job(settings: Settings, job_id: int) -> int:
    with _engine(settings) as engine, session_scope(make_session_factory(engine)) as session:
        message = retry_job(session, job_id, now=utcnow(),
                            analysis_attempts=settings.scheduler.max_attempts)
        record_audit(session, event_type="job.retried", now=utcnow(), username="cli",
                     job_id=job_id, message=message)
    print(message)
    return EXIT_OK


def _serve(settings: Settings, roles: tuple[str, ...]) -> int:
    roles = tuple(dict.fromkeys(roles))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    from dicom_node.service import start_node  # imports torch: only `serve` needs it
    node = start_node(settings, roles)
    try:
        stop.wait()
    finally:
        node.stop()
    return EXIT_OK


def _db(settings: Settings, command: str, revision: str | None) -> int:
    with _engine(settings, migrated=False) as engine:
        if command == "upgrade":
            migrate.upgrade(engine)
            print(f"database at revision {migrate.current_revision(engine)} (head)")
        elif command == "downgrade":
            migrate.downgrade(engine, revision or "base")
            print(f"database at revision {migrate.current_revision(engine) or 'base'}")
        else:
            current = migrate.current_revision(engine)
            head = migrate.head_revision(engine)
            print(f"database at revision {current or 'base'}; this release needs {head}")
    return EXIT_OK


def _config_check(settings: Settings) -> int:
    if settings.tls.port:  # TlsConfigError (exit 2) names the file that cannot be used
        server_context(settings.tls)
    check_peer_tls(settings)
    print("configuration is valid")
    print(f"  node: {settings.node.ae_title} on {settings.node.host}:{settings.node.port}")
    print(f"  storage: {Path(settings.storage.root)} (min free {settings.storage.min_free_mb} MB)")
    print(f"  database: {_redact_url(settings.database_url)}")
    if settings.tls.port:
        print(f"  DICOM TLS: port {settings.tls.port}, TLS {settings.tls.min_version} or newer"
              f"{'' if settings.tls.plaintext else ' (plaintext listener off)'}")
    for peer in settings.peers:
        print(f"  peer {peer.name}: {peer.ae_title} at {peer.host}:{peer.port}"
              f"{' over TLS' if peer.tls else ''}"
              f"{' (receives results)' if peer.send_results else ''}")
    return EXIT_OK


def _debug_send(settings: Settings, args: argparse.Namespace) -> int:
    """Send files to the node and print each answer; exit 1 unless every file succeeded."""
    calling = args.calling or (settings.peers[0].ae_title if settings.peers else None)
    if not calling:
        raise ConfigError(["debug send needs --calling AE, or a [[peers]] entry to send as"])
    files, outcomes = collect_files(Path(p) for p in args.paths)
    if files:
        outcomes += send_local_files(files, host=args.host, port=args.port or settings.node.port,
                                     called_ae_title=args.called or settings.node.ae_title,
                                     calling_ae_title=calling)
    for outcome in outcomes:
        print(f"{'sent' if outcome.succeeded else 'NOT SENT'}  {outcome.path}: {outcome.detail}")
    sent = sum(outcome.succeeded for outcome in outcomes)
    print(f"{sent} of {len(outcomes)} files stored by the node")
    return EXIT_OK if outcomes and sent == len(outcomes) else EXIT_ERROR


def _redact_url(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def _status(settings: Settings) -> int:
    with _engine(settings) as engine, session_scope(make_session_factory(engine)) as session:
        studies = session.scalar(select(func.count()).select_from(Study))
        instances = session.scalar(select(func.count()).select_from(Instance))
        counts = count_by_state(session)
    print(f"studies: {studies}")
    print(f"instances: {instances}")
    print("jobs:" if counts else "jobs: none")
    for (kind, state), count in sorted(counts.items()):
        print(f"  {kind:<10} {state:<11} {count}")
    return EXIT_OK
