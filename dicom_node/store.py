"""The filesystem store of received instances: durable, atomic writes keyed by validated UIDs.

Layout under the storage root::

    instances/<study_instance_uid>/<series_instance_uid>/<sop_instance_uid>.dcm
        (<sop_instance_uid>.<unique>.dcm: a second copy, when that name was taken; the row
        of the instance names the file that holds its bytes)
    tmp/            in-flight writes (same filesystem, so rename is atomic)
    quarantine/     files found under instances/ that no row names and that could not be
                    adopted (each with a ``.reason.json``; see :mod:`dicom_node.ops.reconcile`)

A file appears under ``instances/`` only complete: it is written to ``tmp/``, fsynced, renamed
into place, and its directory is fsynced (POSIX rename is atomic; the directory fsync makes
the new name itself durable).  Paths are built only from UIDs that pass PS3.5 9.1 validation.
This module knows nothing of jobs or the database.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import InsufficientSpaceError, InvalidInstanceError, StorageError
from dicom_node.uids import is_valid_uid

INSTANCES_DIR = "instances"
TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"


@dataclass(frozen=True)
class StoredFile:
    """A stored file: its path under the root, its data set's SHA-256 and its size."""

    relative_path: str
    sha256: str
    size_bytes: int


class DurableFolders:
    """The folders under the store this process has created or fsynced up to the root: a
    bounded, most-recently-used record shared by the threads of one process.

    Writing a file into a folder on this record needs no ``mkdir`` and no fsync of its
    ancestors, only the fsync of the folder itself (the new name).  A folder is added only
    after the fsyncs that made it durable, so a reader never skips a fsync still to come.
    The bound keeps memory flat however many studies arrive (a study's folders matter while
    its instances arrive).
    """

    def __init__(self, capacity: int = 4096) -> None:
        self._capacity = capacity
        self._folders: OrderedDict[Path, None] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, folder: object) -> bool:
        with self._lock:
            if folder not in self._folders:
                return False
            self._folders.move_to_end(folder)  # type: ignore[arg-type]
            return True

    def add(self, folder: Path) -> None:
        with self._lock:
            self._folders[folder] = None
            self._folders.move_to_end(folder)
            while len(self._folders) > self._capacity:
                self._folders.popitem(last=False)

    def discard(self, folder: Path) -> None:
        with self._lock:
            self._folders.pop(folder, None)


def prepare_store(root: Path) -> int:
    """Create the store's folders and remove temp files left by a crash; returns how many.

    Temp names carry the writer's host and process id, so a starting process removes only
    what dead processes of this host left (other processes may be writing right now), and
    what other hosts sharing the store left more than a day ago.
    """
    (root / INSTANCES_DIR).mkdir(parents=True, exist_ok=True)
    tmp = root / TMP_DIR
    tmp.mkdir(parents=True, exist_ok=True)
    removed = 0
    for leftover in tmp.iterdir():
        if leftover.is_file() and abandoned(leftover):
            leftover.unlink(missing_ok=True)
            removed += 1
    return removed


def abandoned(temp: Path) -> bool:
    """Whether the writer of ``temp`` (a :func:`writer_name`) is gone: this process (a name
    it cannot have written yet at start-up: a dead process had its pid) or an ended process of
    this host; another host's file counts as abandoned once untouched for a day."""
    owner = local_writer(temp.name)
    if owner is None:
        try:  # another host's file on shared storage: it may be renamed away at any moment
            return time.time() - temp.stat().st_mtime > 86400
        except FileNotFoundError:
            return False
    return owner == os.getpid() or not process_alive(owner)


def writer_name(suffix: str) -> str:
    """``HOST~PID~suffix``: a file name that says which process of which host wrote it."""
    return f"{socket.gethostname()}~{os.getpid()}~{suffix}"


def local_writer(name: str) -> int | None:
    """The pid in a :func:`writer_name` of this host; None for another host's or another name."""
    host, _, rest = name.partition("~")
    pid_text = rest.split("~", 1)[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    return int(pid_text)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def free_mb(root: Path) -> float:
    """Free megabytes on the filesystem holding ``root``, as an unprivileged user sees it."""
    return shutil.disk_usage(root).free / (1024 * 1024)


def instance_relative_path(
    study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
) -> str:
    """The path of an instance under the root; refuses any UID that is not a valid UID.

    Raises
    ------
    InvalidInstanceError
        When a UID is missing, too long or holds anything but digits and dots (so ``..``,
        ``/`` and NUL can never reach the filesystem).
    """
    for name, value in (
        ("StudyInstanceUID", study_instance_uid),
        ("SeriesInstanceUID", series_instance_uid),
        ("SOPInstanceUID", sop_instance_uid),
    ):
        if not is_valid_uid(value):
            raise InvalidInstanceError(f"{name} is not a valid UID (PS3.5 9.1)")
    return f"{INSTANCES_DIR}/{study_instance_uid}/{series_instance_uid}/{sop_instance_uid}.dcm"


def put_instance(
    root: Path,
    chunks: Sequence[bytes],
    relative_path: str,
    *,
    min_free_mb: int,
    durable: DurableFolders | None = None,
) -> tuple[int, str]:
    """Store the concatenated ``chunks`` durably; returns (size, the relative path used).

    An existing file is never replaced: it may be the copy another node sharing this storage
    root has just acknowledged.  The second file of one SOP Instance UID (the leftover of a
    crash between rename and commit, or a copy being stored on another node) gets a unique
    suffix; the row the caller commits names the file that holds its bytes.  ``durable``
    (the process's :class:`DurableFolders`) spares the folder work of a known folder.

    Raises
    ------
    InsufficientSpaceError
        When writing would leave less than ``min_free_mb`` free.
    StorageError
        On any filesystem failure; no partial file is left behind.
    """
    try:
        available = free_mb(root)
    except OSError as exc:
        raise StorageError(f"cannot read free space of the storage root: {exc.strerror}") from exc
    size = sum(len(chunk) for chunk in chunks)
    if available - size / (1024 * 1024) < min_free_mb:
        raise InsufficientSpaceError(
            f"free space {available:.0f} MB is below storage.min_free_mb = {min_free_mb}"
        )
    written = write_atomic(root, root / relative_path, chunks, replace=False, durable=durable)
    return size, written.relative_to(root).as_posix()


def write_atomic(
    root: Path,
    target: Path,
    chunks: Sequence[bytes],
    *,
    replace: bool = True,
    durable: DurableFolders | None = None,
) -> Path:
    """Write ``chunks`` to ``target`` via a fsynced temp file, rename and directory fsync.

    With ``replace=False`` an existing ``target`` is kept and the file goes to
    ``<stem>.<unique>.<suffix>`` beside it (``link`` fails rather than replace).  Returns the
    path written.  A folder on ``durable`` is trusted to exist durably; should it have gone
    meanwhile, it is made again.
    """
    temp = root / TMP_DIR / writer_name(f"{uuid.uuid4().hex}.part")
    try:
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    written = os.write(descriptor, view)
                    view = view[written:]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        known = durable is not None and target.parent in durable
        if not known:
            _make_dirs_durably(target.parent, root)
        try:
            target = _place(temp, target, replace)
        except FileNotFoundError:
            if not known:
                raise
            assert durable is not None
            durable.discard(target.parent)  # removed since it was recorded: make it again
            _make_dirs_durably(target.parent, root)
            target = _place(temp, target, replace)
        fsync_dir(target.parent)
        if durable is not None:
            durable.add(target.parent)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise StorageError(f"cannot write {target.name}: {exc.strerror or exc}") from exc
    return target


def _place(temp: Path, target: Path, replace: bool) -> Path:
    """Give the written ``temp`` its final name (see :func:`write_atomic`)."""
    if replace:
        os.replace(temp, target)
        return target
    return _link_new(temp, target)


def _link_new(temp: Path, target: Path) -> Path:
    """Give ``temp`` the name ``target``, or a unique one beside it if that name is taken."""
    try:
        os.link(temp, target)
    except FileExistsError:
        target = target.with_name(f"{target.stem}.{uuid.uuid4().hex[:12]}{target.suffix}")
        os.link(temp, target)
    temp.unlink()
    return target


def _make_dirs_durably(directory: Path, root: Path) -> None:
    """mkdir -p, then fsync every folder between ``directory`` and ``root``.

    A folder that another association (or a crashed process) created may not be durable yet,
    so each ancestor is fsynced whether or not this call created it (cheap: a few folders).
    """
    directory.mkdir(parents=True, exist_ok=True)
    current = directory.parent
    while current != root and root in current.parents:
        fsync_dir(current)
        current = current.parent


def fsync_dir(directory: Path) -> None:
    """Make the names in ``directory`` durable (a rename, link or unlink in it)."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def probe_writable(directory: Path, name: str) -> None:
    """Create, write, fsync and delete ``directory/name``: proves the disk takes durable writes.

    Raises the ``OSError`` of the step that failed (the file is gone either way).
    """
    probe = directory / name
    descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(descriptor, b"dicom-node write probe\n")
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
        probe.unlink(missing_ok=True)


def sha256_of(data: bytes) -> str:
    """SHA-256 of bytes in memory, as hex."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
