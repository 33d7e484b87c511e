"""SQLAlchemy 2 declarative models: the single schema source for Alembic.

Studies, series and instances as received; jobs (analysis and delivery) with their leases;
and an append-only events table.  Patient attributes live here for the worklist (the database
is access-controlled, unlike the logs).  This module holds no queries.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


# The enums below are ``StrEnum``s: a member is its stored string, so rows, JSON and
# comparisons with plain strings are unchanged.


class JobKind(enum.StrEnum):
    ANALYSIS = "analysis"
    DELIVERY = "delivery"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"  # not analysed, with its reason
    SUPERSEDED = "superseded"  # a newer revision of the study replaced it
    FAILED = "failed"  # will retry after next_attempt_at
    DEAD = "dead"  # gave up, with its error


UID = String(64)
UTC_DATETIME = DateTime(timezone=True)


class Study(Base):
    __tablename__ = "studies"

    study_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    # Bumped when an instance arrives after the study was closed, so a new analysis job
    # (for the new revision) supersedes the old one.
    revision: Mapped[int] = mapped_column(Integer, default=1)
    closed_revision: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTC_DATETIME, index=True)
    last_received_at: Mapped[datetime] = mapped_column(UTC_DATETIME, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_age: Mapped[str | None] = mapped_column(String(4))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))


class Series(Base):
    __tablename__ = "series"

    series_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    modality: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[str | None] = mapped_column(String(12))
    series_description: Mapped[str | None] = mapped_column(String(64))


class Instance(Base):
    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("series.series_instance_uid"), index=True
    )
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    study_revision: Mapped[int] = mapped_column(Integer)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(512))  # relative to the storage root
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    modality: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    image_type: Mapped[str | None] = mapped_column(String(128))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    field_of_view_mm: Mapped[float | None] = mapped_column(Float)
    # Set when the retention purge removed the file (``dicom_node.ops.retention``); the row stays.
    purged_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint(
            "kind",
            "study_instance_uid",
            "study_revision",
            "target",
            name="uq_jobs_kind_study_revision_target",
        ),
        Index("ix_jobs_state_next_attempt_at", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("studies.study_instance_uid"), index=True
    )
    study_revision: Mapped[int] = mapped_column(Integer)
    # For delivery jobs the peer name; empty for analysis jobs (NULL would defeat the
    # unique constraint, since NULLs are distinct in SQL).
    target: Mapped[str] = mapped_column(String(64), default="")
    # Analysis jobs: the model's mode when the job was queued (a shadow job's results are
    # never delivered nor shown to radiologists); NULL for deliveries.
    mode: Mapped[str | None] = mapped_column(String(8))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    last_error: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str | None] = mapped_column(Text)
    superseded_by: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    updated_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class Event(Base):
    """Append-only: the migration installs triggers that refuse UPDATE and DELETE."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, index=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    level: Mapped[str] = mapped_column(String(16))
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(UID)
    job_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)  # JSON, never patient data


class JobClaim(Base):
    """One row per claim of a job: the log that proves no job was processed twice."""

    __tablename__ = "job_claims"
    __table_args__ = (UniqueConstraint("job_id", "attempt", name="uq_job_claims_job_id_attempt"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(128))
    lease_token: Mapped[str] = mapped_column(String(64))
    claimed_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class AnalysisResult(Base):
    """The outcome of one analysis job: which image, which model, which thresholds."""

    __tablename__ = "analysis_results"

    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    card_sha256: Mapped[str | None] = mapped_column(String(64))  # the model card's
    runtime: Mapped[str | None] = mapped_column(String(16))  # torch or onnxruntime
    # verified (registry checksum), unverified (allow_unverified) or untrained (demo only)
    weights_status: Mapped[str] = mapped_column(String(16))
    thresholds_source: Mapped[str] = mapped_column(String(64))
    # The site operating points' version (validation), or NULL: model or [thresholds] values.
    thresholds_version: Mapped[str | None] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(8), default="live")  # live or shadow
    # The analysed image's header fields the drift monitor compares (JSON, no patient data).
    features: Mapped[str | None] = mapped_column(Text)
    notes: Mapped[str | None] = mapped_column(Text)  # e.g. "view not recorded"
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class Finding(Base):
    """One label's probability and decision for an analysis result."""

    __tablename__ = "findings"
    __table_args__ = (UniqueConstraint("job_id", "label", name="uq_findings_job_id_label"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("analysis_results.job_id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    positive: Mapped[bool] = mapped_column(Boolean)
    boxes: Mapped[str | None] = mapped_column(Text)  # JSON [[x0, y0, x1, y1], ...] in source pixels
    heatmap_path: Mapped[str | None] = mapped_column(String(512))  # .npy under the storage root


class OutputState(enum.StrEnum):
    CURRENT = "current"
    SUPERSEDED = "superseded"  # a later analysis of the study replaced it


class Output(Base):
    """One DICOM object the node wrote (SR, SC, Parametric Map or rejection note KOS)."""

    __tablename__ = "outputs"

    sop_instance_uid: Mapped[str] = mapped_column(UID, primary_key=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    study_revision: Mapped[int] = mapped_column(Integer)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)  # the analysis job
    kind: Mapped[str] = mapped_column(String(8))  # sr, sc, pm or kos
    label: Mapped[str | None] = mapped_column(String(64))  # the finding an SC or PM shows
    path: Mapped[str] = mapped_column(String(512))  # relative to the storage root
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    superseded_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)


class Delivery(Base):
    """The delivery ledger: what each peer answered for each output (one row per pair)."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "peer", name="uq_deliveries_sop_instance_uid_peer"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sop_instance_uid: Mapped[str] = mapped_column(
        ForeignKey("outputs.sop_instance_uid"), index=True
    )
    peer: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[int] = mapped_column(Integer)  # the delivery job that last tried
    # delivered (success or warning), rejected (permanent failure) or failed (will retry)
    outcome: Mapped[str] = mapped_column(String(16))
    status_code: Mapped[int | None] = mapped_column(Integer)  # the C-STORE-RSP status
    detail: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    delivered_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)


class UserRole(enum.StrEnum):
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"


class User(Base):
    """A local web user; the password is stored only as an argon2id hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class ApiToken(Base):
    """A machine client's token (RIS integration); only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))  # read; write (and feedback); store (STOW)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    last_used_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)


class WebSession(Base):
    """A signed-in browser: the cookie's SHA-256, its CSRF token and its timestamps."""

    __tablename__ = "web_sessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    last_seen_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class LoginFailure(Base):
    """Wrong passwords in a row for one account or one client address, and the time until
    which log-in is refused (web/throttle.py).  An account is its name's SHA-256."""

    __tablename__ = "login_failures"

    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # account or address
    subject: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failure_at: Mapped[datetime] = mapped_column(UTC_DATETIME, index=True)
    locked_until: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    refusals: Mapped[int] = mapped_column(Integer, default=0)  # refused while locked


class LoginPresession(Base):
    """A log-in form the server served: its cookie's SHA-256 and the form's CSRF token."""

    __tablename__ = "login_presessions"

    id_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, index=True)


class Feedback(Base):
    """A radiologist's agreement or disagreement with one finding of one analysis."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("analysis_results.job_id"), index=True)
    label: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))  # agree or disagree
    comment: Mapped[str | None] = mapped_column(Text)
    username: Mapped[str] = mapped_column(String(80))  # a user, or "token:NAME"
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)


class AuditEvent(Base):
    """Append-only audit trail (who saw or did what, when); never a patient's name.

    The migration installs triggers that refuse UPDATE and DELETE.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME, index=True)
    event_type: Mapped[str] = mapped_column(String(64), index=True)
    username: Mapped[str | None] = mapped_column(String(80))
    outcome: Mapped[str] = mapped_column(String(16))  # success or failure
    study_instance_uid: Mapped[str | None] = mapped_column(UID, index=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[str | None] = mapped_column(Text)  # JSON
    # Set by the writer before the first attempt, so a row that was spooled during a database
    # outage is inserted once only, however often the spool is drained (audit_spool).
    event_uuid: Mapped[str | None] = mapped_column(String(32), index=True, unique=True)


class PeerEcho(Base):
    """The result of one C-ECHO of a configured peer, asked for from the admin page."""

    __tablename__ = "peer_echoes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    peer: Mapped[str] = mapped_column(String(64), index=True)
    checked_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    outcome: Mapped[str] = mapped_column(String(16))  # success or failure
    status_code: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)
    username: Mapped[str | None] = mapped_column(String(80))
