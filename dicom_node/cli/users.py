"""``dicom-node users ...``: local web users and API tokens.

The password is read from a prompt (asked twice) or, when standard input is not a terminal,
from its first line, never from the command line, where it would sit in shell history and
``ps``.  A new API token is printed once; only its SHA-256 is stored.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from sqlalchemy import Engine

from dicom_node.clock import utcnow
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.errors import UserError
from dicom_node.web.users import (ROLES, SCOPES, add_user, create_token, disable_user, list_users,
                              revoke_token)


def add_parser(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``users`` subcommands."""
    users = commands.add_parser("users", help="web users and API tokens")
    user_commands = users.add_subparsers(dest="users_command", required=True)
    added = user_commands.add_parser("add", help=(
        "create a user; the password is asked for (or read from stdin's first line)"))
    added.add_argument("name")
    added.add_argument("--role", choices=ROLES, required=True)
    user_commands.add_parser("list", help="the users and their roles")
    token = user_commands.add_parser("token", help="create an API token for a machine client "
                                     "(printed once)")
    token.add_argument("name", help="the client's name, e.g. ris")
    token.add_argument("--scope", choices=SCOPES, default="read",
                       help="read (default): read only; write: may also post feedback")
    revoke = user_commands.add_parser("token-revoke", help="revoke an API token at once")
    revoke.add_argument("name", help="the token's name, as given to `users token`")
    disable = user_commands.add_parser("disable", help=(
        "disable a user: no more log-ins, and their open sessions end at once"))
    disable.add_argument("name")


def read_password() -> str:
    """From a prompt, twice, on a terminal; else the first line of standard input."""
    if not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("password again: ") != first:
        raise UserError("the two passwords differ")
    return first


def run_users_command(engine: Engine, args: argparse.Namespace) -> int:
    """Run one ``users`` subcommand against a migrated database; returns the exit code."""
    factory = make_session_factory(engine)
    if args.users_command == "list":
        with session_scope(factory) as session:
            rows = list_users(session)
        for name, role, disabled in rows:
            print(f"{name:<24} {role:<12}{' (disabled)' if disabled else ''}")
        if not rows:
            print("no users: create one with `dicom-node users add NAME --role admin`")
        return 0
    if args.users_command == "add":
        password = read_password()
        with session_scope(factory) as session:
            add_user(session, username=args.name, password=password, role=args.role,
                     now=utcnow(), created_by="cli")
        print(f"user {args.name} created ({args.role})")
        return 0
    if args.users_command == "token-revoke":
        with session_scope(factory) as session:
            revoke_token(session, name=args.name, now=utcnow(), revoked_by="cli")
        print(f"API token {args.name} revoked")
        return 0
    if args.users_command == "disable":
        with session_scope(factory) as session:
            ended = disable_user(session, username=args.name, now=utcnow(), disabled_by="cli")
        print(f"user {args.name} disabled ({ended} open session(s) ended)")
        return 0
    with session_scope(factory) as session:
        token = create_token(session, name=args.name, scope=args.scope, now=utcnow(),
                             created_by="cli")
    print(f"API token for {args.name} ({args.scope}); it is shown only now, store it safely:")
    print(token)
    return 0
