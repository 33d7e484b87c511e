"""Tables of the local validation: ground-truth labels, validation reports, the site's
operating points, model modes (promote / demote) and the drift time series.

They share ``dicom_node.db.models.Base`` (one schema, one Alembic history); this module
holds no queries.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, Float, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from dicom_node.db.models import UID, UTC_DATETIME, Base


class GroundTruthLabel(Base):
    """One imported label of one finding of one study (a row of a site's CSV).

    A study may have several rows for a finding, one per labelled box.  Re-importing a study
    replaces all of its rows.  Radiologists' feedback is read as labels at report time
    (``validation.labels``) and never stored here: the CSV wins where both exist.
    """

    __tablename__ = "ground_truth_labels"
    __table_args__ = (
        Index("ix_ground_truth_labels_study_finding", "study_instance_uid", "finding"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    study_instance_uid: Mapped[str] = mapped_column(UID)
    finding: Mapped[str] = mapped_column(String(64))
    label: Mapped[int] = mapped_column(Integer)  # 1 present, 0 absent
    # A box in source-image pixels (x, y, width, height), or none.
    box_x: Mapped[float | None] = mapped_column(Float)
    box_y: Mapped[float | None] = mapped_column(Float)
    box_width: Mapped[float | None] = mapped_column(Float)
    box_height: Mapped[float | None] = mapped_column(Float)
    source_sha256: Mapped[str] = mapped_column(String(64))  # the imported file
    line: Mapped[int] = mapped_column(Integer)  # its line in that file
    imported_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    imported_by: Mapped[str | None] = mapped_column(String(80))


class ValidationReport(Base):
    """A validation report as written (its JSON and that JSON's SHA-256)."""

    __tablename__ = "validation_reports"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    generated_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    period_since: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    period_until: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    studies: Mapped[int] = mapped_column(Integer)
    body: Mapped[str] = mapped_column(Text)  # report.json


class OperatingPoints(Base):
    """One version of a model's site operating points (``validate thresholds apply``)."""

    __tablename__ = "operating_points"
    __table_args__ = (
        UniqueConstraint("model_name", "version", name="uq_operating_points_model_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    weights_sha256: Mapped[str] = mapped_column(String(64))
    report_sha256: Mapped[str] = mapped_column(String(64))
    thresholds: Mapped[str] = mapped_column(Text)  # JSON {finding: threshold}
    applied_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    applied_by: Mapped[str | None] = mapped_column(String(80))


class ModelModeChange(Base):
    """A model's mode as set by ``models promote`` / ``demote``; the latest row wins over
    the configuration file."""

    __tablename__ = "model_mode_changes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    mode: Mapped[str] = mapped_column(String(8))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    report_sha256: Mapped[str | None] = mapped_column(String(64))
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    changed_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    changed_by: Mapped[str | None] = mapped_column(String(80))


class DriftPoint(Base):
    """One drift recomputation of one model: the combined score and every statistic."""

    __tablename__ = "drift_points"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(String(64), index=True)
    computed_at: Mapped[datetime] = mapped_column(UTC_DATETIME, index=True)
    n_reference: Mapped[int] = mapped_column(Integer)
    n_recent: Mapped[int] = mapped_column(Integer)
    combined: Mapped[float] = mapped_column(Float)
    alarm: Mapped[bool] = mapped_column(Boolean)
    moved: Mapped[str] = mapped_column(Text)  # JSON [field, ...], largest z first
    statistics: Mapped[str] = mapped_column(Text)  # JSON [{field, test, value, p_value, z}]
