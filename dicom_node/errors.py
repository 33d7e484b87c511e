"""The whole dicom-node exception hierarchy, in families.

Exceptions are raised inside the stages and translated at the edges only, each edge by exactly
one table, looked up along the exception's MRO so that the most specific class decides:

* SCP handler to DIMSE status (PS3.4 B.2.3): ``dicom_node.scp.handlers.DIMSE_STATUS``;
* job loop to job state: ``dicom_node.jobs.loop.JOB_STATE``;
* CLI to exit code: ``dicom_node.cli.main.EXIT_CODE``;
* web to HTTP status: ``dicom_node.web.app.HTTP_STATUS``.

Under :class:`DicomNodeError` every error belongs to one family: :class:`InputError` (what a
sender or a file gave us), :class:`StorageError` (disk and persistence), :class:`DatabaseError`,
:class:`AnalysisError` (model, inference, output objects), :class:`JobError` (the queue),
:class:`DeliveryError` (a peer we send to, TLS handshakes included), :class:`ConfigError`,
:class:`RequestError` (web and API requests, users and tokens) and :class:`OperationsError`
(backup, the listening services).  The family bases have no row in any table of their own, so
a family groups classes for readers and for ``except`` clauses without changing a translation.
Messages never contain patient data: they name UIDs, paths and settings only.
"""

from __future__ import annotations

from typing import ClassVar


class DicomNodeError(Exception):
    """Base of every error the node raises on purpose."""

    retryable: ClassVar[bool] = False


# --- families -------------------------------------------------------------------------------


class InputError(DicomNodeError):
    """Family: what a sender, a connection or a stored file gave the node cannot be used."""


class DatabaseError(DicomNodeError):
    """Family: the database is not in the state this release needs."""


class AnalysisError(DicomNodeError):
    """Family: the model, its forward pass, or the output objects built from its results."""


class JobError(DicomNodeError):
    """Family: a job in the queue cannot be found, changed or finished as asked."""


class RequestError(DicomNodeError):
    """Family: a web or API request, or a user or token to create, is refused."""


class OperationsError(DicomNodeError):
    """Family: an operation of the administrator's (backup, a listening service) failed."""


# --- configuration --------------------------------------------------------------------------


class ConfigError(DicomNodeError):
    """Family and error: the configuration is missing, unreadable or has invalid values; lists
    every problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class TlsConfigError(ConfigError):
    """A ``[tls]`` file is missing, unreadable, not PEM, encrypted, or the key does not match
    the certificate; one line naming the key and the file (exit 2, like other config errors)."""

    def __init__(self, problem: str) -> None:
        super().__init__([problem])


# --- database -------------------------------------------------------------------------------


class DatabaseNotMigratedError(DatabaseError):
    """The database schema is not at the revision this release needs."""

    def __init__(self, current: str | None, head: str) -> None:
        self.current = current
        self.head = head
        super().__init__(
            f"database schema is at revision {current or 'none (empty database)'}, "
            f"this release needs {head}: run `dicom-node db upgrade`"
        )


# --- storage --------------------------------------------------------------------------------


class StorageError(DicomNodeError):
    """Family and error: disk or database failure while persisting a received instance (the
    sender may retry)."""

    retryable = True


class InsufficientSpaceError(StorageError):
    """Free space in the storage root is below ``[storage] min_free_mb``."""


# --- input (DICOM) --------------------------------------------------------------------------


class InvalidInstanceError(InputError):
    """A received data set cannot be parsed, or its identifying UIDs are missing or invalid."""


class SopMismatchError(InputError):
    """The C-STORE command's SOP Class or Instance UID differs from the data set's own."""


class UnsupportedSopClassError(InputError):
    """A STOW-RS instance of a SOP class the node neither analyses nor accepts to discard
    (``[scp] other_sop_classes = "reject"``): Failure Reason 0x0122 (PS3.18 Table I.2-2)."""


class UnsupportedTransferSyntaxError(InputError):
    """A STOW-RS instance in a transfer syntax the SCP would not negotiate: Failure Reason
    0xC122, Referenced Transfer Syntax not supported (PS3.18 Table I.2-2)."""


class StudyMismatchError(InputError):
    """A STOW-RS instance posted to ``/studies/{study}`` belongs to another study: Failure
    Reason 0xC409 (implementation-specific, as dcm4chee's; PS3.18 10.5.3 names the case)."""


class UnsupportedStudyError(InputError):
    """A study holds nothing the node analyses; the job is skipped with this reason."""


class InflationLimitError(InvalidInstanceError):
    """A Deflated data set (PS3.5 A.5) inflates beyond ``[scp] max_inflated_mb``: 0xA700 at
    the SCP (Out of Resources, PS3.4 B.2.3), a failed job at the worker; nothing is stored."""


class TransferSyntaxMismatchError(InvalidInstanceError):
    """A data set is not encoded in the transfer syntax of its presentation context (its
    elements are well formed only under another VR encoding, PS3.5 7.1): 0xC000 at the SCP."""


class AssociationNotNegotiatedError(InputError):
    """A connection sent no valid A-ASSOCIATE-RQ within ``[scp] acse_timeout`` (a partial
    header, a slow drip, another PDU first, an absurd declared length): the listener closes it
    before it can take one of ``[scp] max_associations``."""


# --- analysis (model, inference, outputs) ---------------------------------------------------


class ModelError(AnalysisError):
    """Model weights are missing, unverified, corrupted, or not the catalogue's architecture."""


class InferenceError(AnalysisError):
    """The model's forward pass failed (device error, out of memory); retried up to max_attempts."""

    retryable = True


class OutputBuildError(AnalysisError):
    """highdicom refused the values of an SR, SC or other output (a bug or odd source data)."""


# --- jobs -----------------------------------------------------------------------------------


class JobLeaseLostError(JobError):
    """A worker tried to finish a job whose lease it no longer holds (it was rescued)."""


class JobNotFoundError(JobError):
    """A job id given on the command line does not exist."""


class JobStateError(JobError):
    """A job is not in a state that allows the requested change."""


# --- delivery (peers we send to) ------------------------------------------------------------


class DeliveryError(DicomNodeError):
    """Family and error: results could not be delivered to a peer, for good (a permanent reject
    or failure)."""


class TransientDeliveryError(DeliveryError):
    """The peer is down, busy or slow (A7xx, refused, transient reject, timeout), or the TLS
    handshake with it failed, or the ``[tls]`` files to reach it are unusable: retried.

    ``retry_after_seconds``: the earliest the peer asked to be tried again (an HTTP
    ``Retry-After``, RFC 9110 10.2.3); 0 leaves the delay to the backoff."""

    retryable = True

    def __init__(self, message: str, *, retry_after_seconds: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


# --- web and API requests -------------------------------------------------------------------


class UserError(RequestError):
    """A user or API token cannot be created: bad name, unknown role, weak password, duplicate."""


class AuthenticationRequiredError(RequestError):
    """A web or API request has no valid session or token (HTTP 401, or a redirect to log in)."""


class PermissionDeniedError(RequestError):
    """The signed-in user or token lacks the role or scope for this action (HTTP 403)."""


class CsrfError(PermissionDeniedError):
    """A POST came without the synchronizer token of its session (HTTP 403)."""


class NotFoundError(RequestError):
    """A web or API request names something the node does not hold (HTTP 404)."""


class StudyNotFoundError(NotFoundError):
    """A web or API request names a study (or an output of it) the node does not hold (404)."""


class MalformedRequestError(RequestError):
    """A request body breaks its media type's syntax, e.g. a multipart/related body without
    its boundary delimiters (RFC 2046 5.1.1): HTTP 400, nothing in it is used."""


class UnsupportedMediaTypeError(RequestError):
    """A request body of a media type the route does not take (HTTP 415, RFC 9110 15.5.16)."""


class InvalidRequestError(RequestError):
    """A web or API request has a value outside what the route allows (HTTP 422)."""


# --- operations -----------------------------------------------------------------------------


class WebServerError(OperationsError):
    """The web role cannot listen on ``[web] host``:``port`` (in use, not allowed) or start."""


class MetricsServerError(OperationsError):
    """The metrics endpoint cannot listen on ``[metrics] host``:``port`` (in use, not allowed)."""


class BackupError(OperationsError):
    """A backup cannot be taken or restored: a tool is missing, the database or a disk failed."""


class BackupTargetNotEmptyError(BackupError):
    """The backup folder, or the database and storage root a restore writes, already hold data."""


class BackupIntegrityError(BackupError):
    """A backup's manifest is missing or unreadable, or a file differs from its SHA-256."""


class BackupSchemaError(BackupError):
    """The backup's schema revision is unknown to this release: a newer release made it."""


# --- local validation -----------------------------------------------------------------------


class ValidationInputError(InputError):
    """A labels file or a validation report cannot be used (the message names the line)."""


class PromotionRefusedError(OperationsError):
    """A model may not go live: no validation report of its current weights (``--force``)."""
