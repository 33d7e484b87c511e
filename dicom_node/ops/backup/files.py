"""File helpers of backup and restore: hashed copies, durable JSON, safe names, ownership.

Kept apart from :mod:`dicom_node.ops.backup.archive` (what goes where, and in which order) so
that each stays small; nothing here knows the database or the backup's layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dicom_node.errors import BackupIntegrityError
from dicom_node.store import fsync_dir


def safe_relative(name: str) -> Path:
    """``name`` as a relative path that stays inside its folder (a tampered list cannot escape)."""
    path = Path(name)
    if path.is_absolute() or not path.parts or ".." in path.parts or "\n" in name:
        raise BackupIntegrityError(f"the backup names a path outside its folders: {name!r}")
    return path


def copy_hashed(source: Path, target: Path) -> tuple[str, int]:
    """Copy ``source`` to ``target`` (folders made), hashing what is read; (SHA-256, size)."""
    digest, size = hashlib.sha256(), 0
    with source.open("rb") as reader:  # opened first: a missing source makes no folders
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("wb") as writer:
            for block in iter(lambda: reader.read(1 << 20), b""):
                digest.update(block)
                writer.write(block)
                size += len(block)
    shutil.copystat(source, target)
    return digest.hexdigest(), size


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 and size of a file, read in 1 MiB blocks."""
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as reader:
        for block in iter(lambda: reader.read(1 << 20), b""):
            digest.update(block)
            size += len(block)
    return digest.hexdigest(), size


def check_hash(path: Path, expected: str, name: str) -> None:
    """Refuse a backup file whose SHA-256 is not ``expected`` (or that cannot be read)."""
    try:
        actual = hash_file(path)[0]
    except OSError as exc:
        raise BackupIntegrityError(
            f"cannot read {name} of the backup: {exc.strerror or exc}"
        ) from None
    if actual != expected:
        raise BackupIntegrityError(
            f"checksum mismatch: {name} in the backup differs from "
            "its SHA-256: the backup is damaged, use another one"
        )


def write_json_durably(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` via a fsynced temp file, a rename and a folder fsync."""
    temp = path.with_name(f".{path.name}.tmp")
    with temp.open("w", encoding="utf-8") as handle:
        json.dump(document, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)


def give_to_owner_of(root: Path, trees: Iterable[Path], files: Iterable[Path]) -> None:
    """Run as root: give ``trees`` (with all below them) and ``files`` to ``root``'s owner.

    A restore run as root would otherwise leave files the node's user cannot write beside.
    """
    owner = root.stat()
    if os.geteuid() != 0 or owner.st_uid == 0:
        return
    paths = [p for tree in trees if tree.exists() for p in (tree, *tree.rglob("*"))]
    for path in [*paths, *(f for f in files if f.exists())]:
        os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
