"""The ``dicom-node`` command: parse arguments, load settings, run one command, exit.

This is the CLI's edge of the error tree (``dicom_node.errors``): :data:`EXIT_CODE` is the one
table from an exception to an exit status (:class:`~dicom_node.cli.exits.ExitStatus`), and
every command returns one of those statuses.  A ``ConfigError`` (and its ``TlsConfigError``:
unusable ``[tls]`` files) prints every problem; any other error prints one line, never a
traceback.  The argument tree is :mod:`dicom_node.cli.parser`; each command's module is
imported only when that command runs, so ``--help``, ``status`` and ``config check`` start
without torch, pynetdicom or FastAPI.  No business logic lives here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.cli.exits import ExitStatus
from dicom_node.cli.parser import build_parser
from dicom_node.config.settings import Settings, load_settings, resolve_config_path
from dicom_node.errors import (
    BackupIntegrityError,
    BackupSchemaError,
    BackupTargetNotEmptyError,
    ConfigError,
    DicomNodeError,
    ValidationInputError,
)
from dicom_node.logs import configure_logging

__all__ = ["EXIT_CODE", "build_parser", "exit_status_for", "main"]

# The one translation from an exception to the exit status.  Looked up along the exception's
# MRO, so the most specific class decides; what has no row here is a bug and is not caught.
EXIT_CODE: Mapping[type[BaseException], ExitStatus] = MappingProxyType(
    {
        ConfigError: ExitStatus.USAGE,  # and TlsConfigError
        BackupTargetNotEmptyError: ExitStatus.CANT_CREATE,
        BackupIntegrityError: ExitStatus.DATA_ERR,
        BackupSchemaError: ExitStatus.TOO_NEW,
        ValidationInputError: ExitStatus.DATA_ERR,  # a bad labels CSV or report file
        DicomNodeError: ExitStatus.FAILURE,
        SQLAlchemyError: ExitStatus.FAILURE,  # the database is unavailable
        BrokenPipeError: ExitStatus.FAILURE,  # output piped into `head` and the like
    }
)
_TRANSLATED = tuple(EXIT_CODE)

Handler = Callable[[Settings, argparse.Namespace], int]


def exit_status_for(exc: BaseException) -> ExitStatus:
    """The exit status of a command that raised ``exc`` (see :data:`EXIT_CODE`)."""
    for cls in type(exc).__mro__:
        if cls in EXIT_CODE:
            return EXIT_CODE[cls]
    raise exc


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dicom-node`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(_run(args))
    except _TRANSLATED as exc:
        _report(exc)
        return int(exit_status_for(exc))


def _run(args: argparse.Namespace) -> int:
    import pydicom.config  # not needed to parse arguments or print --help

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    if args.command == "demo":
        from dicom_node.dev.demo import run_demo  # only the demo needs it

        configure_logging("WARNING", "console")
        return run_demo(dicom_dir=args.dicom_dir, keep=args.keep, serve_web=args.serve_web)
    if args.command == "doctor":  # before loading: a broken config is one of its rows
        from dicom_node.cli.doctor import run_doctor_command

        return run_doctor_command(args, os.environ)
    settings = load_settings(
        resolve_config_path(args.config, os.environ),
        os.environ,
        check_models=args.command != "models",  # the models commands install them
    )
    if args.command == "serve":  # a service: [logging] as configured (JSON for journald)
        configure_logging(settings.logging.level, settings.logging.format)
    else:  # a person at a terminal: human text, and only what needs their attention
        configure_logging(_at_least_warning(settings.logging.level), "console")
    return _handler(args)(settings, args)


def _report(exc: BaseException) -> None:
    """The one line (or, for a configuration, the lines) a person reads on standard error."""
    if isinstance(exc, ConfigError):
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
    elif isinstance(exc, SQLAlchemyError):
        print(
            f"error: database unavailable ({type(exc).__name__}); check [database] url",
            file=sys.stderr,
        )
    elif isinstance(exc, BrokenPipeError):
        # Stop quietly, and let the interpreter's last flush go nowhere (Python docs, SIGPIPE).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    else:
        print(f"error: {exc}", file=sys.stderr)


def _at_least_warning(level: str) -> str:
    """The configured level, raised to WARNING: progress lines of alembic and our own INFO
    events would bury a command's answer (they are for the service's journal)."""
    return level if level in ("WARNING", "ERROR", "CRITICAL") else "WARNING"


def _handler(args: argparse.Namespace) -> Handler:
    """The function that runs ``args.command``, its module imported only now."""
    key = args.command
    if args.command == "debug":
        key = f"debug {args.debug_command}"
    elif args.command == "models" and args.models_command in ("promote", "demote"):
        key = "models mode"
    return _HANDLERS[key]()


def _serve() -> Handler:
    from dicom_node.cli.serve import run_serve_command

    return run_serve_command


def _db() -> Handler:
    from dicom_node.cli.db import run_db_command

    return run_db_command


def _config() -> Handler:
    from dicom_node.cli.config import run_config_command

    return run_config_command


def _status() -> Handler:
    from dicom_node.cli.status import run_status_command

    return run_status_command


def _models() -> Handler:
    from dicom_node.cli.models import run_models_command  # torch

    return run_models_command


def _model_mode() -> Handler:
    from dicom_node.cli.validate import run_mode_command

    return run_mode_command


def _validate() -> Handler:
    from dicom_node.cli.validate import run_validate_command

    return run_validate_command


def _preprocess() -> Handler:
    from dicom_node.cli.models import run_debug_preprocess  # torch

    return run_debug_preprocess


def _jobs() -> Handler:
    from dicom_node.cli.jobs import run_jobs_command

    return run_jobs_command


def _users() -> Handler:
    from dicom_node.cli.users import run_users_command

    return run_users_command


def _audit() -> Handler:
    from dicom_node.cli.audit import run_audit_export

    return run_audit_export


def _backup() -> Handler:
    from dicom_node.cli.backup import run_backup_command

    return run_backup_command


def _retention() -> Handler:
    from dicom_node.cli.retention import run_retention_command

    return run_retention_command


def _debug_send() -> Handler:
    from dicom_node.cli.debug import run_debug_send

    return run_debug_send


_HANDLERS: Mapping[str, Callable[[], Handler]] = MappingProxyType(
    {
        "serve": _serve,
        "db": _db,
        "config": _config,
        "status": _status,
        "models": _models,
        "models mode": _model_mode,
        "validate": _validate,
        "debug preprocess": _preprocess,
        "jobs": _jobs,
        "users": _users,
        "audit": _audit,
        "backup": _backup,
        "retention": _retention,
        "debug send": _debug_send,
    }
)
