"""The DICOM front door on real loopback associations: pynetdicom SCUs and DCMTK tools."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from dicom_node.clock import utcnow
from dicom_node.config.settings import PeerSettings, ScpSettings
from dicom_node.db.models import Event, Instance, Job
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import CR_STORAGE, make_cxr_dataset
from dicom_node.store import file_sha256, sha256_of
from dicom_node.studies import close_quiet_studies
from tests.helpers import (
    NODE_AE,
    RawInstance,
    associate,
    echo,
    send_datasets,
    send_raw,
    send_raw_one,
    split_file,
    stored_relative_paths,
)

DEFINED_STATUSES = {0x0000, 0xA700, 0xA900, 0xC000}
# storescu proposes compressed transfer syntaxes only when told which one (DCMTK 3.6.7).
STORESCU_PROPOSAL = {
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
}
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _dataset_bytes(path: Path) -> bytes:
    """The data set part of a stored file (after preamble and File Meta)."""
    return split_file(path, CR_STORAGE).payload


def _raw_of(ds: pydicom.Dataset) -> RawInstance:
    return RawInstance(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), ExplicitVRLittleEndian, encode(ds, False, True)
    )


def _store_consistent(node: Any) -> None:
    """No temp file left; every stored file has its row and every row its complete file."""
    root = Path(node.settings.storage.root)
    assert list((root / "tmp").iterdir()) == []
    with session_scope(node.session_factory) as session:
        rows = {row.path: row for row in session.scalars(select(Instance))}
    assert stored_relative_paths(root) == set(rows)
    for path, row in rows.items():
        assert sha256_of(_dataset_bytes(root / path)) == row.sha256


def test_cxr_files_from_pynetdicom_are_stored_as_received_with_one_job_per_study(
    node: Any, shared_data: Path
) -> None:
    files = sorted((shared_data / "dicom" / "cxr").glob("*.dcm"))
    raws = [split_file(path, CR_STORAGE) for path in files]
    for raw in raws:
        assert send_raw_one(node.scp_port, raw) == 0x0000
    root = Path(node.settings.storage.root)
    with session_scope(node.session_factory) as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    assert set(rows) == {raw.sop_instance_uid for raw in raws}
    for raw in raws:
        assert _dataset_bytes(root / rows[raw.sop_instance_uid].path) == raw.payload
    studies = {row.study_instance_uid for row in rows.values()}
    later = utcnow().replace(year=utcnow().year + 1)
    close_quiet_studies(node.session_factory, quiet_seconds=1, max_attempts=3, now=later)
    close_quiet_studies(node.session_factory, quiet_seconds=1, max_attempts=3, now=later)
    with session_scope(node.session_factory) as session:
        jobs = session.execute(
            select(Job.study_instance_uid, func.count()).group_by(Job.study_instance_uid)
        ).all()
    assert dict(jobs) == {study: 1 for study in studies}


def test_cxr_files_from_dcmtk_storescu_are_stored_and_echoscu_answered(
    node: Any, shared_data: Path
) -> None:
    files = sorted((shared_data / "dicom" / "cxr").glob("*.dcm"))
    port = str(node.scp_port)
    echo_run = subprocess.run(
        ["echoscu", "-aet", "STORESCU", "-aec", NODE_AE, "127.0.0.1", port],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert echo_run.returncode == 0, echo_run.stderr
    for path in files:
        option = STORESCU_PROPOSAL.get(split_file(path, CR_STORAGE).transfer_syntax_uid, "-x=")
        run = subprocess.run(
            ["storescu", option, "-aet", "STORESCU", "-aec", NODE_AE, "127.0.0.1", port, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        # storescu exits 0 even when a store fails, so its error lines are checked too.
        assert run.returncode == 0 and "E:" not in run.stderr, run.stderr
    root = Path(node.settings.storage.root)
    with session_scope(node.session_factory) as session:
        rows = {row.sop_instance_uid: row for row in session.scalars(select(Instance))}
    assert len(rows) == len(files)
    for path in files:
        # DCMTK re-encodes what it sends (lengths, padding), so the proof of byte identity
        # is the pynetdicom test above; here every element and the pixel data must match.
        sent = pydicom.dcmread(path, force=True)
        stored = pydicom.dcmread(root / rows[str(sent.SOPInstanceUID)].path)
        assert stored == sent
        assert stored.PixelData == sent.PixelData
    _store_consistent(node)


def _send_any_file(port: int, path: Path) -> int | None:
    raw = split_file(path, CR_STORAGE)
    assoc = associate(
        port,
        [raw.sop_class_uid, CR_STORAGE],
        transfer_syntaxes=list(dict.fromkeys([raw.transfer_syntax_uid, ExplicitVRLittleEndian])),
    )
    if not assoc.is_established:
        return -1
    try:
        try:
            return send_raw(assoc, raw)
        except LookupError:  # the node did not negotiate that class or syntax: send as CR
            syntax = next(
                cx.transfer_syntax[0]
                for cx in assoc.accepted_contexts
                if cx.abstract_syntax == CR_STORAGE
            )
            return send_raw(
                assoc, RawInstance(CR_STORAGE, raw.sop_instance_uid, syntax, raw.payload)
            )
    finally:
        if assoc.is_established:
            assoc.release()


def test_every_shared_file_gets_a_defined_status_and_nothing_partial_is_left(
    node: Any, shared_data: Path
) -> None:
    files = sorted(
        p
        for p in (shared_data / "dicom").rglob("*")
        if p.is_file() and p.suffix in (".dcm", ".icc")
    )
    assert len(files) > 50
    outcomes = {}
    for path in files:
        outcomes[path.name] = _send_any_file(node.scp_port, path)
        assert echo(node.scp_port) == 0, f"node stopped answering after {path.name}"
    undefined = {
        name: status for name, status in outcomes.items() if status not in DEFINED_STATUSES
    }
    assert undefined == {}
    assert outcomes["CR-MONO1-10-chest_noFileMeta.dcm"] == 0x0000
    assert outcomes["pydicom_crayons.icc"] in (0xC000, 0xA900)
    _store_consistent(node)


def test_association_rejected_for_unknown_calling_ae(node: Any) -> None:
    assoc = associate(node.scp_port, [str(Verification)], calling="STRANGER")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == 0x03  # calling AE title not recognised


def test_association_rejected_for_wrong_called_ae(node: Any) -> None:
    assoc = associate(node.scp_port, [str(Verification)], called="NOT_THE_NODE")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == 0x07  # called AE title not recognised


def test_association_rejected_for_known_ae_from_wrong_address(node_factory: Any) -> None:
    node = node_factory(peers=(PeerSettings(name="remote", ae_title="REMOTE", host="127.0.0.2"),))
    from_wrong = associate(node.scp_port, [str(Verification)], calling="REMOTE")
    assert from_wrong.is_rejected
    ae = AE(ae_title="REMOTE")
    ae.add_requested_context(Verification)
    from_right = ae.associate(
        "127.0.0.1", node.scp_port, ae_title=NODE_AE, bind_address=("127.0.0.2", 0)
    )
    assert from_right.is_established
    from_right.release()
    with session_scope(node.session_factory) as session:
        events = session.scalars(select(Event).where(Event.name == "association.rejected")).all()
    assert len(events) == 1 and "127.0.0.1" in (events[0].detail or "")


@pytest.mark.parametrize(
    "bad_uid",
    ["..", "1.2/../3", "1.2." + "3" * 61, "1.2\x003"],
    ids=["dotdot", "traversal", "65-chars", "nul"],
)
@pytest.mark.parametrize("attribute", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_identifier_attacks_are_refused_and_create_no_file(
    node: Any, tmp_path: Path, bad_uid: str, attribute: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    before = {p for p in tmp_path.parent.rglob("*") if p.is_file()}
    ds = make_cxr_dataset(rows=32, columns=32)
    setattr(ds, attribute, bad_uid)
    status = send_raw_one(node.scp_port, _raw_of(ds))
    if attribute == "SOPInstanceUID" and len(bad_uid) > 64:
        # The command itself carries the UID; pynetdicom's DIMSE decoder refuses a command
        # UID over 64 characters and aborts the association before our handler runs.
        assert status is None
    else:
        assert status == 0xC000
    assert echo(node.scp_port) == 0
    after = {p for p in tmp_path.parent.rglob("*") if p.is_file()}
    assert [p for p in after - before if not p.name.startswith("node.db")] == []
    assert stored_relative_paths(Path(node.settings.storage.root)) == set()


def test_identical_resend_succeeds_and_creates_nothing_new(node: Any) -> None:
    ds = make_cxr_dataset(rows=64, columns=64)
    assert send_datasets(node.scp_port, [ds]) == [0x0000]
    with session_scope(node.session_factory) as session:
        events_before = session.scalar(select(func.count()).select_from(Event))
    assert send_datasets(node.scp_port, [ds]) == [0x0000]
    with session_scope(node.session_factory) as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(Event)) == events_before


def test_same_uid_with_different_bytes_keeps_first_copy_and_records_warning(node: Any) -> None:
    first = make_cxr_dataset(rows=64, columns=64, seed=1)
    second = make_cxr_dataset(
        rows=64,
        columns=64,
        seed=2,
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        sop_instance_uid=first.SOPInstanceUID,
    )
    assert send_datasets(node.scp_port, [first]) == [0x0000]
    root = Path(node.settings.storage.root)
    (path,) = [root / p for p in stored_relative_paths(root)]
    digest = file_sha256(path)
    assert send_datasets(node.scp_port, [second]) == [0x0000]
    assert file_sha256(path) == digest
    with session_scope(node.session_factory) as session:
        conflicts = session.scalars(select(Event).where(Event.name == "instance.conflict")).all()
    assert len(conflicts) == 1 and conflicts[0].level == "warning"


def test_command_uid_differing_from_dataset_answers_a900(node: Any) -> None:
    ds = make_cxr_dataset(rows=32, columns=32)
    raw = _raw_of(ds)
    other = raw.sop_instance_uid[:-1] + ("1" if raw.sop_instance_uid[-1] != "1" else "2")
    mismatched = RawInstance(raw.sop_class_uid, other, raw.transfer_syntax_uid, raw.payload)
    assert send_raw_one(node.scp_port, mismatched) == 0xA900
    assert stored_relative_paths(Path(node.settings.storage.root)) == set()


def test_unparseable_data_answers_c000_and_node_stays_up(node: Any) -> None:
    garbage = RawInstance(
        CR_STORAGE, "1.2.3.4", ExplicitVRLittleEndian, b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 300
    )
    assert send_raw_one(node.scp_port, garbage) == 0xC000
    assert echo(node.scp_port) == 0


def test_other_storage_class_is_discarded_with_an_event(node: Any) -> None:
    ds = make_cxr_dataset(rows=32, columns=32)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
    ds.Modality = "CT"
    assert send_datasets(node.scp_port, [ds]) == [0x0000]
    assert stored_relative_paths(Path(node.settings.storage.root)) == set()
    with session_scope(node.session_factory) as session:
        (event,) = session.scalars(select(Event).where(Event.name == "instance.discarded"))
    assert event.sop_instance_uid == ds.SOPInstanceUID and CT_STORAGE in (event.detail or "")


def test_other_storage_class_is_not_negotiated_when_configured_to_reject(node_factory: Any) -> None:
    node = node_factory(scp=ScpSettings(other_sop_classes="reject"))
    assoc = associate(node.scp_port, [CT_STORAGE, CR_STORAGE])
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        assert CR_STORAGE in accepted and CT_STORAGE not in accepted
    finally:
        assoc.release()


def test_maximum_associations_is_enforced(node_factory: Any) -> None:
    node = node_factory(scp=ScpSettings(max_associations=1))
    first = associate(node.scp_port, [str(Verification)])
    try:
        assert first.is_established
        second = associate(node.scp_port, [str(Verification)])
        assert second.is_rejected
    finally:
        first.release()
