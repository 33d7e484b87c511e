"""Input gating: which image is analysed, and the recorded reason when none is."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.config.settings import AnalysisSettings, SchedulerSettings
from dicom_node.db.models import Event, Instance, Job, Study
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import CR_STORAGE
from dicom_node.errors import UnsupportedStudyError
from dicom_node.selection import DX_FOR_PROCESSING, select_image
from tests.conftest import wait_until
from tests.helpers import split_file
from tests.test_scp import _send_any_file

NOW = datetime(2026, 11, 28, 12, 0)
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def _study(**values: Any) -> Study:
    return Study(
        study_instance_uid="1.2.3", patient_age=values.pop("patient_age", "045Y"), **values
    )


def _instance(sop: str, view: str | None = "PA", seconds: int = 0, **values: Any) -> Instance:
    defaults = {
        "modality": "DX",
        "body_part_examined": "CHEST",
        "sop_class_uid": DX,
        "rows": 2000,
        "columns": 2000,
        "field_of_view_mm": 430.0,
    }
    return Instance(
        sop_instance_uid=sop,
        view_position=view,
        path=f"{sop}.dcm",
        series_instance_uid="1.2.3.1",
        received_at=NOW + timedelta(seconds=seconds),
        **{**defaults, **values},
    )


def test_prefers_pa_then_ap_then_latest() -> None:
    settings = AnalysisSettings()
    assert (
        select_image(
            _study(), [_instance("1", "AP"), _instance("2", "PA")], settings
        ).sop_instance_uid
        == "2"
    )
    assert (
        select_image(
            _study(), [_instance("1", "AP", 0), _instance("2", "AP", 5)], settings
        ).sop_instance_uid
        == "2"
    )
    assert (
        select_image(
            _study(), [_instance("1", None), _instance("2", "AP")], settings
        ).sop_instance_uid
        == "2"
    )


def test_missing_view_is_analysed_with_a_note_unless_configured_off() -> None:
    chosen = select_image(_study(), [_instance("1", None)], AnalysisSettings())
    assert chosen.notes == ("view not recorded",)
    with pytest.raises(UnsupportedStudyError, match="view not recorded"):
        select_image(_study(), [_instance("1", None)], AnalysisSettings(analyse_missing_view=False))


@pytest.mark.parametrize(
    "instance, reason",
    [
        (_instance("1", "LL"), "not analysed: lateral view"),
        (_instance("1", modality="CT"), "not analysed: modality CT is not CR or DX"),
        (_instance("1", body_part_examined="HAND"), "not analysed: body part HAND, not chest"),
        (
            _instance("1", sop_class_uid=DX_FOR_PROCESSING),
            "not analysed: image is for processing only",
        ),
        (_instance("1", rows=8000, columns=8000), "not analysed: image larger than 50 megapixels"),
        (
            _instance("1", None, body_part_examined=None, field_of_view_mm=236.4),
            "not analysed: field of view 236.4 mm is too small for an adult chest",
        ),
    ],
)
def test_ineligible_image_gets_its_reason(instance: Instance, reason: str) -> None:
    with pytest.raises(UnsupportedStudyError) as raised:
        select_image(_study(), [instance], AnalysisSettings())
    assert str(raised.value) == reason


def test_description_naming_other_anatomy_is_not_analysed_when_body_part_is_empty() -> None:
    with pytest.raises(UnsupportedStudyError, match="description names TEETH"):
        select_image(
            _study(study_description="MODALITYLUT - TEETH"),
            [_instance("1", None, body_part_examined=None)],
            AnalysisSettings(),
        )


@pytest.mark.parametrize(
    "study",
    [
        _study(patient_age="012Y"),
        _study(patient_age="006M"),
        _study(patient_age=None, patient_birth_date="20150101", study_date="20261128"),
    ],
)
def test_patients_under_the_minimum_age_are_not_analysed(study: Study) -> None:
    with pytest.raises(UnsupportedStudyError, match="patient under 18"):
        select_image(study, [_instance("1")], AnalysisSettings())
    assert select_image(study, [_instance("1")], AnalysisSettings(min_patient_age=0))


def _unsettled(node: Any) -> str:
    """What a study that never settled left behind: its jobs and its last events."""
    with session_scope(node.session_factory) as session:
        studies = list(
            session.execute(select(Study.study_instance_uid, Study.revision, Study.closed_revision))
        )
        jobs = list(
            session.execute(
                select(
                    Job.id,
                    Job.study_instance_uid,
                    Job.study_revision,
                    Job.state,
                    Job.attempts,
                    Job.last_error,
                )
            )
        )
        events = list(
            session.execute(
                select(Event.name, Event.job_id, Event.study_instance_uid)
                .order_by(Event.id.desc())
                .limit(30)
            )
        )
    return f"studies={studies}\njobs={jobs}\nlast events={events}"


def _outcomes(node: Any) -> tuple[list[Job], list[Event]]:
    with session_scope(node.session_factory) as session:
        return (
            list(session.scalars(select(Job))),
            list(session.scalars(select(Event).where(Event.name == "instance.discarded"))),
        )


@pytest.mark.slow
@pytest.mark.parametrize("folder", ["xray_non_chest", "ct_mr_other", "malformed_edge"])
def test_shared_non_chest_and_malformed_files_end_in_defined_states_with_reasons(
    node_factory: Any, shared_data: Path, folder: str
) -> None:
    node = node_factory(
        roles=("scp", "worker"),
        scheduler=SchedulerSettings(study_quiet_seconds=0.5, tick_seconds=0.2, max_attempts=2),
        analysis=AnalysisSettings(backoff_seconds=0.2),
    )
    files = sorted(p for p in (shared_data / "dicom" / folder).iterdir() if p.suffix == ".dcm")
    statuses = {path.name: _send_any_file(node.scp_port, path) for path in files}
    assert set(statuses.values()) <= {0x0000, 0xA900, 0xC000}

    def settled() -> bool:
        # A study whose files arrive further apart than the quiet period re-opens, so it may
        # also hold superseded jobs: what must hold is one live job per study, all finished.
        with session_scope(node.session_factory) as session:
            studies = set(session.scalars(select(Study.study_instance_uid)))
            live = session.execute(
                select(Job.study_instance_uid, Job.state).where(
                    Job.kind == "analysis", Job.state != "superseded"
                )
            ).all()
        return sorted(study for study, _ in live) == sorted(studies) and not {
            "queued",
            "running",
            "failed",
        } & {state for _, state in live}

    assert wait_until(settled, timeout=120, interval=0.2), _unsettled(node)
    jobs, discarded = _outcomes(node)
    assert node.worker_thread.is_alive()
    for job in jobs:
        assert job.state in ("skipped", "dead", "done", "superseded"), job.state
        if job.state == "skipped":
            assert job.reason and job.reason.startswith("not analysed:")
        if job.state == "dead":
            assert job.last_error
    if folder == "malformed_edge":
        return
    # Nothing here is a chest radiograph: each file was either discarded at the door (another
    # SOP class) or stored and its study's job skipped, each with its reason on record.
    with session_scope(node.session_factory) as session:
        study_of = dict(
            session.execute(select(Instance.sop_instance_uid, Instance.study_instance_uid)).all()
        )
    skipped = {job.study_instance_uid: job.reason for job in jobs if job.state == "skipped"}
    discarded_sops = {event.sop_instance_uid for event in discarded}
    assert {job.state for job in jobs} <= {"skipped", "superseded"}
    for path in files:
        sop = split_file(path, CR_STORAGE).sop_instance_uid
        refused = statuses[path.name] != 0x0000  # a defined DICOM status, e.g. a bad UID
        assert refused or sop in discarded_sops or skipped.get(study_of.get(sop, "")), path.name
