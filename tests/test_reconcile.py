"""Files a crash left under instances/ without a row are adopted at start-up (the row made as
for a C-STORE, the study analysed, a re-send then a duplicate) or quarantined with a reason;
``dicom-node doctor`` reports both.

The orphan is made as a kill -9 between rename and commit leaves it: the bytes of a file a
real node received (a second, donor node), at the path the store gives its UIDs, with no row.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicom_node.clock import utcnow
from dicom_node.db.migrate import upgrade
from dicom_node.db.models import Event, Instance, Job, Study
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.ops.reconcile import ADOPTED_CALLING_AE_TITLE, REASON_SUFFIX
from dicom_node.service import start_node
from dicom_node.store import QUARANTINE_DIR, instance_relative_path
from dicom_node.studies import close_quiet_studies
from tests.conftest import make_settings
from tests.helpers import (
    NodeProcess,
    free_port,
    run_cli,
    send_datasets,
    stored_relative_paths,
    write_config,
)

CANARY_NAME = "Orphancanary^Olga"


def _path_of(ds: Any) -> str:
    return instance_relative_path(
        str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
    )


def _received_bytes(tmp_path: Path, datasets: list[Any]) -> dict[str, bytes]:
    """The files a real node (a donor, with its own root and database) stores for
    ``datasets``: relative path -> bytes."""
    settings = make_settings(tmp_path / "donor", f"sqlite:///{tmp_path / 'donor.db'}")
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    donor = start_node(settings, ("scp",), port=0, metrics_port=0)
    try:
        assert send_datasets(donor.scp_port, datasets) == [0] * len(datasets)
    finally:
        donor.stop()
    root = Path(settings.storage.root)
    return {_path_of(ds): (root / _path_of(ds)).read_bytes() for ds in datasets}


def _place(root: Path, relative_path: str, data: bytes) -> None:
    target = root / relative_path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def _counts(db_url: str) -> dict[str, Any]:
    engine = make_engine(db_url)
    try:
        factory = make_session_factory(engine)
        with session_scope(factory) as session:
            rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
            studies = {row.study_instance_uid: row for row in session.scalars(select(Study))}
            adopted = session.scalar(
                select(func.count()).select_from(Event).where(Event.name == "instance.adopted")
            )
        jobs = close_quiet_studies(factory, quiet_seconds=0, max_attempts=3, now=utcnow())
        with session_scope(factory) as session:
            job_studies = set(
                session.scalars(select(Job.study_instance_uid).where(Job.id.in_(jobs)))
            )
        return {
            "rows": rows,
            "studies": studies,
            "adopted_events": adopted,
            "job_studies": job_studies,
        }
    finally:
        engine.dispose()


@pytest.mark.slow
def test_after_kill_9_an_orphan_is_adopted_and_resent_as_duplicate_a_corrupt_one_quarantined(
    tmp_path: Path, db_url: str
) -> None:
    study = make_cxr_dataset(rows=8, columns=8).StudyInstanceUID
    series = make_cxr_dataset(rows=8, columns=8).SeriesInstanceUID
    acked, orphan, corrupt = (
        make_cxr_dataset(
            rows=64,
            columns=64,
            seed=i,
            study_instance_uid=study,
            series_instance_uid=series,
            patient_name=CANARY_NAME,
        )
        for i in range(3)
    )
    donor_files = _received_bytes(tmp_path, [orphan, corrupt])

    port, root = free_port(), tmp_path / "node-store"
    config = write_config(tmp_path / "n.toml", root=root, db_url=db_url, port=port)
    assert run_cli(config, "db", "upgrade").returncode == 0
    node = NodeProcess(config, tmp_path / "node.log")
    node.start(port, 120, "scp")
    assert send_datasets(port, [acked]) == [0]
    node.kill()  # kill -9: what it had renamed but not committed stays as a file, no row
    _place(root, _path_of(orphan), donor_files[_path_of(orphan)])
    cut = donor_files[_path_of(corrupt)]
    _place(root, _path_of(corrupt), cut[: len(cut) - 100])  # torn by the disk, say

    node.start(port, 120, "scp")
    try:
        found = _counts(db_url)
        row = found["rows"][str(orphan.SOPInstanceUID)]
        assert (row.path, row.calling_ae_title) == (_path_of(orphan), ADOPTED_CALLING_AE_TITLE)
        assert str(corrupt.SOPInstanceUID) not in found["rows"]
        assert found["studies"][str(study)].instance_count == 2
        assert found["adopted_events"] == 1
        assert found["job_studies"] == {str(study)}  # the study is analysed with the orphan

        (quarantined,) = [
            p for p in (root / QUARANTINE_DIR).iterdir() if not p.name.endswith(REASON_SUFFIX)
        ]
        assert quarantined.read_bytes() == cut[: len(cut) - 100]  # moved, not deleted
        reason = json.loads(quarantined.with_name(quarantined.name + REASON_SUFFIX).read_text())
        assert reason["original_path"] == _path_of(corrupt)
        assert "truncated" in reason["reason"]

        # The sender, which never got a success for the orphan, sends it again: a duplicate.
        assert send_datasets(port, [orphan]) == [0]
        mine = [p for p in stored_relative_paths(root) if str(orphan.SOPInstanceUID) in p]
        assert mine == [_path_of(orphan)]
        assert len(_counts(db_url)["rows"]) == 2

        report = json.loads(run_cli(config, "doctor", "--json").stdout)
        (orphans,) = [c for c in report["checks"] if c["name"] == "orphan files"]
        assert orphans["status"] == "warn"
        assert "1 adopted, 1 quarantined" in orphans["detail"]
        assert "1 file(s) in" in orphans["detail"] and "truncated" in orphans["detail"]
    finally:
        assert node.stop() == 0
    assert CANARY_NAME.split("^")[0] not in (tmp_path / "node.log").read_text()


def test_a_second_copy_a_misplaced_file_and_junk_are_quarantined_and_the_held_row_kept(
    node_factory: Any, tmp_path: Path
) -> None:
    held, other = (make_cxr_dataset(rows=32, columns=32, seed=i) for i in range(2))
    donor_files = _received_bytes(tmp_path, [held, other])
    node = node_factory()
    root = Path(node.settings.storage.root)
    assert send_datasets(node.scp_port, [held]) == [0]
    node.stop()
    held_path = _path_of(held)
    _place(root, held_path.replace(".dcm", ".0123456789ab.dcm"), donor_files[held_path])
    wrong = instance_relative_path(
        str(other.StudyInstanceUID), str(other.SeriesInstanceUID), "1.2.3.4.5"
    )
    _place(root, wrong, donor_files[_path_of(other)])
    _place(root, f"{Path(held_path).parent.as_posix()}/notes.txt", b"not dicom at all")

    node = node_factory()
    reasons = sorted(
        json.loads(p.read_text())["reason"]
        for p in (root / QUARANTINE_DIR).glob(f"*{REASON_SUFFIX}")
    )
    assert len(reasons) == 3
    assert reasons[0] == f"a second copy of an instance the node holds in {held_path}"
    assert "not a DICOM file" in reasons[1]
    assert reasons[2] == "path does not match the file's UIDs"
    assert stored_relative_paths(root) == {held_path}
    with session_scope(node.session_factory) as session:
        rows = list(session.scalars(select(Instance)))
        (event,) = session.scalars(select(Event).where(Event.name == "store.reconciled"))
    assert [(r.sop_instance_uid, r.path) for r in rows] == [(str(held.SOPInstanceUID), held_path)]
    assert json.loads(event.detail)["quarantined"] == 3
    node.stop()
    node = node_factory()  # nothing left to find: no second event, quarantine untouched
    with session_scope(node.session_factory) as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Event).where(Event.name == "store.reconciled")
            )
            == 1
        )
    assert len(list((root / QUARANTINE_DIR).iterdir())) == 6
