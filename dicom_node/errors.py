"""The whole dicom-node exception hierarchy.

Exceptions are raised inside the stages and translated in exactly three places: the SCP
handler (to a DIMSE status, PS3.4 B.2.3), the worker (to a job state) and the CLI (to an exit
code).  Messages never contain patient data: they name UIDs, paths and settings only.
"""

from __future__ import annotations

from typing import ClassVar


class DicomNodeError(Exception):
    """Base of every error the node raises on purpose."""

    retryable: ClassVar[bool] = False


class ConfigError(DicomNodeError):
    """The configuration is missing, unreadable or has invalid values; lists every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class TlsConfigError(ConfigError):
    """A ``[tls]`` file is missing, unreadable, not PEM, encrypted, or the key does not match
    the certificate; one line naming the key and the file (exit 2, like other config errors)."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem])


class DatabaseNotMigratedError(DicomNodeError):
    """The database schema is not at the revision this release needs."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"database schema is at revision {current or 'none (empty database)'}, "
            f"this release needs {head}: run `dicom-node db upgrade`"
        )


class StorageError(DicomNodeError):
    """Disk or database failure while persisting a received instance (the sender may retry)."""

    retryable = True


class InsufficientSpaceError(StorageError):
    """Free space in the storage root is below ``[storage] min_free_mb``."""


class InvalidInstanceError(DicomNodeError):
    """A received data set cannot be parsed, or its identifying UIDs are missing or invalid."""


class SopMismatchError(DicomNodeError):
    """The C-STORE command's SOP Class or Instance UID differs from the data set's own."""


class UnsupportedStudyError(DicomNodeError):
    """A study holds nothing the node analyses; the job is skipped with this reason."""


class InferenceError(DicomNodeError):
    """The model's forward pass failed (device error, out of memory); retried up to max_attempts."""

    retryable = True


class JobLeaseLostError(DicomNodeError):
    """A worker tried to finish a job whose lease it no longer holds (it was rescued)."""


class JobNotFoundError(DicomNodeError):
    """A job id given on the command line does not exist."""


class ModelError(DicomNodeError):
    """Model weights are missing, unverified, corrupted, or not the catalogue's architecture."""


class JobStateError(DicomNodeError):
    """A job is not in a state that allows the requested change."""


class OutputBuildError(DicomNodeError):
    """highdicom refused the values of an SR, SC or other output (a bug or odd source data)."""


class DeliveryError(DicomNodeError):
    """Results could not be delivered to a peer, for good (a permanent reject or failure)."""


class TransientDeliveryError(DeliveryError):
    """The peer is down, busy or slow (A7xx, refused, transient reject, timeout): retried."""

    retryable = True


class UserError(DicomNodeError):
    """A user or API token cannot be created: bad name, unknown role, weak password, duplicate."""


class AuthenticationRequiredError(DicomNodeError):
    """A web or API request has no valid session or token (HTTP 401, or a redirect to log in)."""


class PermissionDeniedError(DicomNodeError):
    """The signed-in user or token lacks the role or scope for this action (HTTP 403)."""


class CsrfError(PermissionDeniedError):
    """A POST came without the synchronizer token of its session (HTTP 403)."""


class NotFoundError(DicomNodeError):
    """A web or API request names something the node does not hold (HTTP 404)."""


class StudyNotFoundError(NotFoundError):
    """A web or API request names a study (or an output of it) the node does not hold (404)."""


class InvalidRequestError(DicomNodeError):
    """A web or API request has a value outside what the route allows (HTTP 422)."""


class WebServerError(DicomNodeError):
    """The web role cannot listen on ``[web] host``:``port`` (in use, not allowed) or start."""


class MetricsServerError(DicomNodeError):
    """The metrics endpoint cannot listen on ``[metrics] host``:``port`` (in use, not allowed)."""


class BackupError(DicomNodeError):
    """A backup cannot be taken or restored: a tool is missing, the database or a disk failed."""


class BackupTargetNotEmptyError(BackupError):
    """The backup folder, or the database and storage root a restore writes, already hold data."""


class BackupIntegrityError(BackupError):
    """A backup's manifest is missing or unreadable, or a file differs from its SHA-256."""


class BackupSchemaError(BackupError):
    """The backup's schema revision is unknown to this release: a newer release made it."""


class InflationLimitError(InvalidInstanceError):
    """A Deflated data set (PS3.5 A.5) inflates beyond ``[scp] max_inflated_mb``: 0xA700 at
    the SCP (Out of Resources, PS3.4 B.2.3), a failed job at the worker; nothing is stored."""


class TransferSyntaxMismatchError(InvalidInstanceError):
    """A data set is not encoded in the transfer syntax of its presentation context (its
    elements are well formed only under another VR encoding, PS3.5 7.1): 0xC000 at the SCP."""


class AssociationNotNegotiatedError(DicomNodeError):
    """A connection sent no valid A-ASSOCIATE-RQ within ``[scp] acse_timeout`` (a partial
    header, a slow drip, another PDU first, an absurd declared length): the listener closes it
    before it can take one of ``[scp] max_associations``."""
