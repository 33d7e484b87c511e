"""The argument tree of ``dicom-node``: every command and option, and nothing else.

Built without importing any command's implementation (no torch, pynetdicom, alembic or
FastAPI here), so ``dicom-node --help`` and a mistyped option answer at once; each command's
module is imported by :mod:`dicom_node.cli.main` only when that command runs.
"""

from __future__ import annotations

import argparse

from dicom_node import __version__
from dicom_node.config.settings import ROLES
from dicom_node.web.users import ROLES as USER_ROLES
from dicom_node.web.users import SCOPES

Commands = argparse._SubParsersAction


def build_parser() -> argparse.ArgumentParser:
    """The whole ``dicom-node`` parser."""
    parser = argparse.ArgumentParser(
        prog="dicom-node",
        description=(
            "PACS-side DICOM processing node for chest X-rays (AI results are for decision "
            "support only)."
        ),
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=("TOML config file (default: $DICOM_NODE_CONFIG, else config/dicom-node.toml)"),
    )
    parser.add_argument("--version", action="version", version=f"dicom-node {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (
        _serve,
        _db,
        _config,
        _status,
        _models,
        _validate,
        _jobs,
        _users,
        _audit,
        _backup,
        _doctor,
        _retention,
        _debug,
        _demo,
    ):
        add(commands)
    return parser


def _serve(commands: Commands) -> None:
    serve = commands.add_parser("serve", help="run the node until SIGTERM/SIGINT")
    serve.add_argument(
        "--role",
        choices=ROLES,
        action="append",
        help=(
            "run only this role (repeatable): scp, worker or web (the AI worklist and API); "
            "default: all roles in one process"
        ),
    )


def _db(commands: Commands) -> None:
    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True)
    db_commands.add_parser("upgrade", help="migrate the database to this release's schema")
    downgrade = db_commands.add_parser("downgrade", help="migrate down to REVISION")
    downgrade.add_argument("revision", help="target revision, or 'base' for an empty database")
    db_commands.add_parser("current", help="print the database's schema revision")


def _config(commands: Commands) -> None:
    config = commands.add_parser("config", help="configuration")
    config.add_subparsers(dest="config_command", required=True).add_parser(
        "check", help="validate the configuration and print the effective settings"
    )


def _status(commands: Commands) -> None:
    commands.add_parser("status", help="counts of studies, instances and jobs per state")


def _models(commands: Commands) -> None:
    models = commands.add_parser("models", help="model catalogue and installed weights")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    model_commands.add_parser("list", help="the catalogue, and what is installed")
    pull = model_commands.add_parser("pull", help="download, check and install a model")
    pull.add_argument("name")
    pull.add_argument("--url", help="a site mirror of the release file")
    imported = model_commands.add_parser(
        "import",
        help="install a local file: a catalogue release file, or a site's own model with "
        "its card (ONNX, safetensors, TorchScript, or a MONAI bundle folder)",
    )
    imported.add_argument("file", help="the weights file, or a MONAI bundle folder")
    imported.add_argument("--name", required=True)
    imported.add_argument("--card", metavar="CARD.toml", help="the model card (model.toml)")
    model_commands.add_parser(
        "verify", help="re-check installed files and cards against their SHA-256"
    )
    export = model_commands.add_parser(
        "export", help="write an installed torch model as ONNX plus its card (parity checked)"
    )
    export.add_argument("name", metavar="NAME")
    export.add_argument("--format", choices=["onnx"], default="onnx")
    export.add_argument("--out", required=True, metavar="FILE")
    promote = model_commands.add_parser(
        "promote", help="make a configured model live (needs a validation report of its weights)"
    )
    promote.add_argument("name", metavar="NAME")
    promote.add_argument(
        "--force", action="store_true", help="promote without a validation report (audited)"
    )
    demote = model_commands.add_parser("demote", help="put a model in shadow mode")
    demote.add_argument("name", metavar="NAME")


def _validate(commands: Commands) -> None:
    validate = commands.add_parser(
        "validate", help="local validation: ground-truth labels, reports, operating points"
    )
    validate_commands = validate.add_subparsers(dest="validate_command", required=True)
    labels = validate_commands.add_parser("labels", help="ground-truth labels")
    labels_import = labels.add_subparsers(dest="labels_command", required=True).add_parser(
        "import", help="import a labels CSV (all rows or none)"
    )
    labels_import.add_argument("file", metavar="FILE")
    report = validate_commands.add_parser(
        "report", help="write report.json and report.html for one model"
    )
    report.add_argument("--model", required=True, metavar="NAME")
    report.add_argument("--since", metavar="DATE", help="results from this date (UTC)")
    report.add_argument("--until", metavar="DATE", help="results before this date (UTC)")
    report.add_argument("--out", required=True, metavar="DIR")
    report.add_argument(
        "--target-sensitivity", type=float, metavar="S", help="default [validation]: 0.95"
    )
    report.add_argument("--rule", choices=("sensitivity", "youden"))
    thresholds = validate_commands.add_parser("thresholds", help="the site's operating points")
    apply = thresholds.add_subparsers(dest="thresholds_command", required=True).add_parser(
        "apply", help="make a report's proposed thresholds the site's operating points"
    )
    apply.add_argument("report", metavar="REPORT")


def _jobs(commands: Commands) -> None:
    jobs = commands.add_parser("jobs", help="analysis and delivery jobs")
    retry = jobs.add_subparsers(dest="jobs_command", required=True).add_parser(
        "retry", help="re-queue a dead or failed job"
    )
    retry.add_argument("job_id", type=int)


def _users(commands: Commands) -> None:
    users = commands.add_parser("users", help="web users and API tokens")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    added = user_commands.add_parser(
        "add", help=("create a user; the password is asked for (or read from stdin's first line)")
    )
    added.add_argument("name")
    added.add_argument("--role", choices=USER_ROLES, required=True)
    user_commands.add_parser("list", help="the users and their roles")
    token = user_commands.add_parser(
        "token", help="create an API token for a machine client (printed once)"
    )
    token.add_argument("name", help="the client's name, e.g. ris")
    token.add_argument(
        "--scope",
        choices=SCOPES,
        default="read",
        help=(
            "read (default): read only; write: may also post feedback; store: may only "
            "post instances to /dicomweb/studies (STOW-RS), and read nothing"
        ),
    )
    revoke = user_commands.add_parser("token-revoke", help="revoke an API token at once")
    revoke.add_argument("name", help="the token's name, as given to `users token`")
    disable = user_commands.add_parser(
        "disable", help=("disable a user: no more log-ins, and their open sessions end at once")
    )
    disable.add_argument("name")


def _audit(commands: Commands) -> None:
    audit = commands.add_parser("audit", help="the audit trail (who received, sent, viewed what)")
    export = audit.add_subparsers(dest="audit_command", required=True).add_parser(
        "export", help="write audit events as JSON lines, oldest first"
    )
    export.add_argument(
        "--since",
        metavar="ISO8601",
        help="only events at or after this time (e.g. 2026-12-01 or "
        "2026-12-01T08:00:00Z; no offset means UTC)",
    )
    export.add_argument("--until", metavar="ISO8601", help="only events before this time")
    export.add_argument(
        "--type",
        metavar="TYPE",
        dest="event_type",
        help="only this event type (e.g. instances.received, study.viewed)",
    )
    export.add_argument(
        "--output", metavar="FILE", help="write to FILE (mode 0600) instead of standard output"
    )


def _backup(commands: Commands) -> None:
    backup = commands.add_parser(
        "backup", help="back up and restore the database, images, results and models"
    )
    backup_commands = backup.add_subparsers(dest="backup_command", required=True)
    create = backup_commands.add_parser(
        "create", help=("write a backup into DEST_DIR (new or empty), while the node runs")
    )
    create.add_argument("destination", metavar="DEST_DIR")
    create.add_argument(
        "--no-models",
        action="store_true",
        help=(
            "leave out the installed model weights (default: included; they may not be "
            "downloadable on site)"
        ),
    )
    restore = backup_commands.add_parser(
        "restore",
        help=("restore SRC_DIR into this node's database and storage root (stop the node first)"),
    )
    restore.add_argument("source", metavar="SRC_DIR")
    restore.add_argument(
        "--force",
        action="store_true",
        help=(
            "replace a database and storage root that already hold data (what they hold is lost)"
        ),
    )
    verify = backup_commands.add_parser(
        "verify", help="re-check every file of a backup against its SHA-256"
    )
    verify.add_argument("source", metavar="SRC_DIR")


def _doctor(commands: Commands) -> None:
    doctor = commands.add_parser(
        "doctor",
        help=(
            "check config, database, storage (orphan files, audit spool), model weights, peers, "
            "TLS files and ports; "
            "says how to fix what is wrong"
        ),
    )
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")


def _retention(commands: Commands) -> None:
    retention = commands.add_parser("retention", help="purge received images after delivery")
    run = retention.add_subparsers(dest="retention_command", required=True).add_parser(
        "run", help="purge the images that [retention] images_days makes eligible, now"
    )
    run.add_argument(
        "--dry-run", action="store_true", help="only count what would be purged; remove nothing"
    )


def _debug(commands: Commands) -> None:
    debug = commands.add_parser("debug", help="inspection tools")
    debug_commands = debug.add_subparsers(dest="debug_command", required=True)
    preprocess = debug_commands.add_parser(
        "preprocess", help="write the model input of a DICOM file as .npy"
    )
    preprocess.add_argument("file")
    preprocess.add_argument("--out", required=True)
    send = debug_commands.add_parser(
        "send",
        help=(
            "send DICOM files (or folders) to the node, each in its own transfer syntax "
            "(compressed files too): a test study"
        ),
    )
    send.add_argument("paths", nargs="+", metavar="PATH")
    send.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    send.add_argument("--port", type=int, help="default: [node] port")
    send.add_argument("--called", metavar="AE", help="default: [node] ae_title")
    send.add_argument(
        "--calling",
        metavar="AE",
        help=(
            "the AE title to send as; it must be a configured [[peers]] entry whose host is this "
            "machine (default: the first peer's)"
        ),
    )


def _demo(commands: Commands) -> None:
    demo = commands.add_parser("demo", help="run the node end to end on sample studies")
    demo.add_argument("--dicom-dir", metavar="DIR", help="send your own DICOM files instead")
    demo.add_argument("--keep", action="store_true", help="keep the demo folder afterwards")
    demo.add_argument(
        "--serve-web",
        action="store_true",
        help=("keep serving the worklist until Ctrl-C (the default when run from a terminal)"),
    )
