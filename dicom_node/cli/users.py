"""``dicom-node users ...``: local web users and API tokens.

The password is read from a prompt (asked twice) or, when standard input is not a terminal,
from its first line, never from the command line, where it would sit in shell history and
``ps``.  A new API token is printed once; only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from sqlalchemy.orm import Session, sessionmaker

from dicom_node.cli.db import command_engine
from dicom_node.cli.exits import ExitStatus
from dicom_node.clock import utcnow
from dicom_node.config.settings import Settings
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.errors import UserError
from dicom_node.web.users import add_user, create_token, disable_user, list_users, revoke_token


def read_password() -> str:
    """From a prompt, twice, on a terminal; else the first line of standard input."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("password again: ") != first:
        raise UserError("the two passwords differ")
    return first


def run_users_command(settings: Settings, args: argparse.Namespace) -> ExitStatus:
    """Run one ``users`` subcommand against the migrated database."""
    with command_engine(settings) as engine:
        return _run(make_session_factory(engine), args)


def _run(factory: sessionmaker[Session], args: argparse.Namespace) -> ExitStatus:
    if args.users_command == "list":
        with session_scope(factory) as session:
            rows = list_users(session)
        for name, role, disabled in rows:
            print(f"{name:<24} {role:<12}{' (disabled)' if disabled else ''}")
        if not rows:
            print("no users: create one with `dicom-node users add NAME --role admin`")
        return ExitStatus.OK
    if args.users_command == "add":
        password = read_password()
        with session_scope(factory) as session:
            add_user(
                session,
                username=args.name,
                password=password,
                role=args.role,
                now=utcnow(),
                created_by="cli",
            )
        print(f"user {args.name} created ({args.role})")
        return ExitStatus.OK
    if args.users_command == "token-revoke":
        with session_scope(factory) as session:
            revoke_token(session, name=args.name, now=utcnow(), revoked_by="cli")
        print(f"API token {args.name} revoked")
        return ExitStatus.OK
    if args.users_command == "disable":
        with session_scope(factory) as session:
            ended = disable_user(session, username=args.name, now=utcnow(), disabled_by="cli")
        print(f"user {args.name} disabled ({ended} open session(s) ended)")
        return ExitStatus.OK
    with session_scope(factory) as session:
        token = create_token(
            session, name=args.name, scope=args.scope, now=utcnow(), created_by="cli"
        )
    print(f"API token for {args.name} ({args.scope}); it is shown only now, store it safely:")
    print(token)
    return ExitStatus.OK
