"""Ground truth for local validation: a site's labels CSV, and radiologists' feedback.

The CSV (exported from a RIS or a reading study) has exactly these columns, in any order:
``study_instance_uid`` or ``accession_number``; ``finding`` (a label name a configured model
reports); ``label`` (1 present, 0 absent); and optionally all four of ``box_x``, ``box_y``,
``box_width``, ``box_height`` (source-image pixels; a row per box).  The file is checked as a
whole: any bad row is reported with its line number and nothing of the file is imported.
Importing a study again replaces all of that study's labels.

Feedback (agree / disagree on the worklist) is read as a label of that finding: agreeing
with a positive or disagreeing with a negative is 1, the opposite 0; the latest verdict for
a study and finding counts, and a CSV label of the same study and finding wins over it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from dicom_node.db.models import Feedback, Finding, Study
from dicom_node.db.validation import GroundTruthLabel
from dicom_node.errors import ValidationInputError

STUDY_COLUMNS = ("study_instance_uid", "accession_number")
BOX_COLUMNS = ("box_x", "box_y", "box_width", "box_height")
MAX_REPORTED = 20  # problems listed in one error; the count says how many more
CSV, FEEDBACK = "csv", "feedback"


@dataclass(frozen=True)
class LabelRow:
    """One checked CSV row."""

    line: int
    study_instance_uid: str
    finding: str
    label: int
    box: tuple[float, float, float, float] | None  # x, y, width, height


@dataclass
class StudyLabel:
    """The truth of one finding of one study, and where it came from."""

    label: int
    source: str  # csv or feedback
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class ImportSummary:
    rows: int
    studies: int
    replaced: int  # earlier label rows of those studies that were removed
    sha256: str


def import_labels(
    session: Session,
    data: bytes,
    findings: Collection[str],
    *,
    username: str | None,
    now: datetime,
) -> ImportSummary:
    """Check the whole file, then replace its studies' labels (in the caller's transaction).

    Raises ``ValidationInputError`` listing every bad row by line number; nothing is written.
    """
    rows = check_labels(session, data, findings)
    studies = sorted({row.study_instance_uid for row in rows})
    sha256 = hashlib.sha256(data).hexdigest()
    replaced = 0
    for start in range(0, len(studies), 500):  # bounded IN lists
        chunk = studies[start : start + 500]
        replaced += int(
            session.scalar(
                select(func.count())
                .select_from(GroundTruthLabel)
                .where(GroundTruthLabel.study_instance_uid.in_(chunk))
            )
            or 0
        )
        session.execute(
            delete(GroundTruthLabel).where(GroundTruthLabel.study_instance_uid.in_(chunk))
        )
    session.add_all(
        GroundTruthLabel(
            study_instance_uid=row.study_instance_uid,
            finding=row.finding,
            label=row.label,
            box_x=row.box[0] if row.box else None,
            box_y=row.box[1] if row.box else None,
            box_width=row.box[2] if row.box else None,
            box_height=row.box[3] if row.box else None,
            source_sha256=sha256,
            line=row.line,
            imported_at=now,
            imported_by=username,
        )
        for row in rows
    )
    session.flush()
    return ImportSummary(len(rows), len(studies), replaced, sha256)


def check_labels(session: Session, data: bytes, findings: Collection[str]) -> list[LabelRow]:
    """Every row of the file, checked; ``ValidationInputError`` naming each bad line."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValidationInputError(
            f"labels not imported (nothing was changed): line 1: not UTF-8 text ({exc.reason})"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader, [])]
    study_column = _check_header(header)
    index = {name: position for position, name in enumerate(header)}
    raw = [(reader.line_num, values) for values in reader if any(v.strip() for v in values)]
    if not raw:
        raise ValidationInputError("labels not imported (nothing was changed): no label rows")
    studies = _resolve_studies(session, study_column, [values for _, values in raw], index)
    problems: list[str] = []
    rows = []
    for line, values in raw:
        row = _check_row(line, values, header, index, study_column, studies, findings, problems)
        if row is not None:
            rows.append(row)
    _check_conflicts(rows, problems)
    if problems:
        more = len(problems) - MAX_REPORTED
        listed = problems[:MAX_REPORTED] + ([f"... and {more} more"] if more > 0 else [])
        raise ValidationInputError(
            "labels not imported (nothing was changed):\n  " + "\n  ".join(listed)
        )
    return rows


def _check_header(header: list[str]) -> str:
    study = [name for name in STUDY_COLUMNS if name in header]
    boxes = [name for name in BOX_COLUMNS if name in header]
    allowed = {*STUDY_COLUMNS, "finding", "label", *BOX_COLUMNS}
    unknown = [name for name in header if name not in allowed]
    missing = [name for name in ("finding", "label") if name not in header]
    problem = None
    if unknown:
        problem = f"unknown column {unknown[0]!r}"
    elif len(study) != 1:
        problem = "exactly one of study_instance_uid or accession_number is needed"
    elif missing:
        problem = f"missing column {missing[0]!r}"
    elif boxes and len(boxes) != len(BOX_COLUMNS):
        problem = "box columns come as all four of " + ", ".join(BOX_COLUMNS)
    elif len(set(header)) != len(header):
        problem = "a column appears twice"
    if problem:
        raise ValidationInputError(
            f"labels not imported (nothing was changed): line 1: {problem} (columns: "
            f"study_instance_uid or accession_number, finding, label, optionally "
            f"{', '.join(BOX_COLUMNS)})"
        )
    return study[0]


def _resolve_studies(
    session: Session, column: str, rows: list[list[str]], index: dict[str, int]
) -> dict[str, list[str]]:
    """Each value of the study column -> the study UIDs it names (none: unknown)."""
    position = index[column]
    values = sorted({row[position].strip() for row in rows if len(row) > position})
    found: dict[str, list[str]] = {value: [] for value in values}
    key = Study.study_instance_uid if column == "study_instance_uid" else Study.accession_number
    for start in range(0, len(values), 500):
        for uid, value in session.execute(
            select(Study.study_instance_uid, key).where(key.in_(values[start : start + 500]))
        ):
            found[str(value)].append(uid)
    return found


def _check_row(
    line: int,
    values: list[str],
    header: list[str],
    index: dict[str, int],
    study_column: str,
    studies: dict[str, list[str]],
    findings: Collection[str],
    problems: list[str],
) -> LabelRow | None:
    if len(values) != len(header):
        problems.append(f"line {line}: {len(values)} values for {len(header)} columns")
        return None
    cell = {name: values[index[name]].strip() for name in header}
    study, before = cell[study_column], len(problems)
    uids = studies.get(study, [])
    if not study:
        problems.append(f"line {line}: {study_column} is empty")
    elif not uids:
        problems.append(f"line {line}: no study with {study_column} {study!r} on this node")
    elif len(uids) > 1:
        problems.append(f"line {line}: accession number {study!r} names {len(uids)} studies")
    if cell["finding"] not in findings:
        problems.append(f"line {line}: unknown finding {cell['finding']!r}")
    if cell["label"] not in ("0", "1"):
        problems.append(f"line {line}: label must be 1 or 0, not {cell['label']!r}")
    box = _box(line, cell, problems) if "box_x" in cell else None
    if box is not None and cell["label"] == "0":
        problems.append(f"line {line}: a box is given for a finding labelled absent (0)")
    if len(problems) > before:
        return None
    return LabelRow(line, uids[0], cell["finding"], int(cell["label"]), box)


def _box(
    line: int, cell: dict[str, str], problems: list[str]
) -> tuple[float, float, float, float] | None:
    texts = [cell[name] for name in BOX_COLUMNS]
    if not any(texts):
        return None
    try:
        x, y, width, height = (float(text) for text in texts)
    except ValueError:
        problems.append(f"line {line}: box values must all be numbers (or all empty)")
        return None
    if not all(math.isfinite(v) for v in (x, y, width, height)) or min(x, y) < 0:
        problems.append(f"line {line}: box_x and box_y must be finite and not negative")
    elif width <= 0 or height <= 0:
        problems.append(f"line {line}: box_width and box_height must be positive")
    else:
        return (x, y, width, height)
    return None


def _check_conflicts(rows: list[LabelRow], problems: list[str]) -> None:
    first: dict[tuple[str, str], LabelRow] = {}
    for row in rows:
        key = (row.study_instance_uid, row.finding)
        seen = first.setdefault(key, row)
        if seen.label != row.label:
            problems.append(
                f"line {row.line}: {row.finding} is labelled {row.label} here and "
                f"{seen.label} on line {seen.line} for the same study"
            )


def study_labels(session: Session, findings: Iterable[str]) -> dict[tuple[str, str], StudyLabel]:
    """The truth per (study UID, finding): CSV labels, then feedback where no CSV label is."""
    wanted = list(findings)
    truth: dict[tuple[str, str], StudyLabel] = {}
    for row in session.scalars(
        select(GroundTruthLabel)
        .where(GroundTruthLabel.finding.in_(wanted))
        .order_by(GroundTruthLabel.id)
    ):
        entry = truth.setdefault((row.study_instance_uid, row.finding), StudyLabel(row.label, CSV))
        if row.box_x is not None:
            entry.boxes.append(
                (row.box_x, row.box_y or 0.0, row.box_width or 0.0, row.box_height or 0.0)
            )
    verdicts = session.execute(
        select(Feedback.study_instance_uid, Feedback.label, Feedback.verdict, Finding.positive)
        .join(Finding, (Finding.job_id == Feedback.job_id) & (Finding.label == Feedback.label))
        .where(Feedback.label.in_(wanted))
        .order_by(Feedback.id)
    )
    for study, finding, verdict, positive in verdicts:
        key = (study, finding)
        if key in truth and truth[key].source == CSV:
            continue
        agrees = verdict == "agree"
        truth[key] = StudyLabel(int(agrees == bool(positive)), FEEDBACK)  # latest one wins
    return truth
