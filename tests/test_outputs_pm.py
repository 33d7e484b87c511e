"""Parametric Map outputs: off by default; when on, one per positive finding, valid by dciodvfy,
holding the stored heatmap as floats, under deterministic UIDs, delivered into the study."""

from __future__ import annotations

import dataclasses
import io
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.settings import (
    ConfigError,
    OutputSettings,
    PeerSettings,
    SchedulerSettings,
    Settings,
    load_settings,
)
from dicom_node.db.models import Delivery, Finding, Instance, Job, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.inference.localization import heatmap_at
from dicom_node.inference.models import load_bundle
from dicom_node.jobs.cams import load_cam
from dicom_node.jobs.delivery import DeliveryWorker
from dicom_node.jobs.worker import Worker
from dicom_node.outputs.build import build_analysis_outputs
from dicom_node.outputs.pm import PARAMETRIC_MAP_STORAGE
from dicom_node.outputs.source import source_header
from dicom_node.results import FindingResult
from dicom_node.studies import close_quiet_studies
from dicom_node.web.study import study_detail
from tests.conftest import wait_until
from tests.helpers import NODE_AE, SCU_AE, send_datasets
from tests.peers import PACS_AE, Orthanc, ScriptedPacs
from tests.test_outputs import _analyse_everything, _analysis, _send_as_is, dciodvfy_errors

REPO = Path(__file__).resolve().parents[1]
# An operating point low enough that the test network calls this finding positive.
LOW_THRESHOLDS = (("Cardiomegaly", 0.001),)
MAPS_ON = OutputSettings(parametric_maps=True)


def _outputs(node: Any, kind: str) -> list[Output]:
    with session_scope(node.session_factory) as session:
        return list(
            session.scalars(select(Output).where(Output.kind == kind).order_by(Output.label))
        )


def test_parametric_maps_are_off_by_default_and_no_pm_is_written(node: Any) -> None:
    assert load_settings(REPO / "config" / "dicom-node.toml", {}).outputs.parametric_maps is False
    assert send_datasets(node.scp_port, [make_cxr_dataset(rows=256, columns=256)]) == [0]
    _analyse_everything(node)
    with session_scope(node.session_factory) as session:
        kinds = set(session.scalars(select(Output.kind)))
    assert kinds == {"sr", "sc"}


def test_parametric_maps_setting_is_a_boolean(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[outputs]\nparametric_maps = true\n")
    assert load_settings(config, {}).outputs.parametric_maps is True
    config.write_text('[outputs]\nparametric_maps = "yes"\n')
    with pytest.raises(ConfigError, match="outputs.parametric_maps"):
        load_settings(config, {})


def test_one_pm_per_positive_finding_under_uids_that_repeat_for_the_same_inputs() -> None:
    header = source_header(
        make_cxr_dataset(rows=256, columns=256, sop_instance_uid="1.2.3.4.5")
    ).dataset
    settings = dataclasses.replace(Settings(), outputs=MAPS_ON)

    def maps(analysis: Any) -> list[tuple[str | None, str, str]]:
        return [
            (o.label, o.sop_instance_uid, o.series_instance_uid)
            for o in build_analysis_outputs(header, analysis, settings, datetime.now())
            if o.kind == "pm"
        ]

    first = maps(_analysis())
    assert [label for label, _, _ in first] == ["Effusion"]  # Mass is negative: no map
    assert maps(_analysis()) == first  # rebuilt: the same UIDs
    assert not {u for _, u, _ in maps(_analysis(revision=2))} & {u for _, u, _ in first}
    others = build_analysis_outputs(header, _analysis(), settings, datetime.now())
    assert len({o.series_instance_uid for o in others}) == 3  # SR, SC and PM series apart
    negative = dataclasses.replace(
        _analysis(), findings=(FindingResult("Effusion", 0.2, 0.5, False, ()),)
    )
    assert maps(negative) == []
    off = build_analysis_outputs(header, _analysis(), Settings(), datetime.now())
    assert "pm" not in {o.kind for o in off}


def test_pm_read_back_holds_the_stored_heatmap_as_floats_in_the_source_study(
    node_factory: Any,
) -> None:
    node = node_factory(outputs=MAPS_ON, thresholds=LOW_THRESHOLDS)
    source = make_cxr_dataset(rows=600, columns=520)
    assert send_datasets(node.scp_port, [source]) == [0]
    _analyse_everything(node)
    root = Path(node.settings.storage.root)
    maps = _outputs(node, "pm")
    with session_scope(node.session_factory) as session:
        findings = {f.label: f for f in session.scalars(select(Finding))}
    assert {m.label for m in maps} == {label for label, f in findings.items() if f.positive}
    assert "Cardiomegaly" in {m.label for m in maps}
    for output in maps:
        written = pydicom.dcmread(root / output.path)
        assert written.SOPClassUID == PARAMETRIC_MAP_STORAGE == output.sop_class_uid
        assert (written.StudyInstanceUID, written.PatientID, str(written.PatientName)) == (
            source.StudyInstanceUID,
            source.PatientID,
            str(source.PatientName),
        )
        assert written.BitsAllocated == 32 and "FloatPixelData" in written
        assert list(written.ImageType)[:2] == ["DERIVED", "PRIMARY"]
        assert "decision support" in written.SeriesDescription
        assert "decision support" in written.ContentDescription
        derivation = written.SharedFunctionalGroupsSequence[0].DerivationImageSequence[0]
        assert derivation.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        cam, geometry = load_cam(root, findings[output.label].heatmap_path)
        stored = heatmap_at(cam, geometry, geometry.source_rows, geometry.source_columns)
        assert written.pixel_array.dtype == np.float32
        assert written.pixel_array.shape == (600, 520)  # under sc_max_size: the source grid
        np.testing.assert_allclose(written.pixel_array, stored, atol=1e-6)
        mapped = hd.pm.ParametricMap.from_dataset(written)
        np.testing.assert_allclose(mapped.get_frame(1), stored, atol=1e-6)
        mapping = written.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
        unit = mapping.MeasurementUnitsCodeSequence[0]
        assert (unit.CodeValue, unit.CodingSchemeDesignator) == ("1", "UCUM")


def test_a_large_source_gets_a_map_scaled_to_sc_max_size_equal_to_the_resampled_heatmap(
    node_factory: Any,
) -> None:
    node = node_factory(
        outputs=dataclasses.replace(MAPS_ON, sc_max_size=512), thresholds=LOW_THRESHOLDS
    )
    source = make_cxr_dataset(rows=1200, columns=1000)
    source.ImagerPixelSpacing = [0.2, 0.2]
    assert send_datasets(node.scp_port, [source]) == [0]
    _analyse_everything(node)
    root = Path(node.settings.storage.root)
    output = next(m for m in _outputs(node, "pm") if m.label == "Cardiomegaly")
    with session_scope(node.session_factory) as session:
        path = session.scalars(
            select(Finding.heatmap_path).where(Finding.label == "Cardiomegaly")
        ).one()
    cam, geometry = load_cam(root, path)
    written = pydicom.dcmread(root / output.path)
    assert (written.Rows, written.Columns) == (512, 427)
    np.testing.assert_allclose(written.pixel_array, heatmap_at(cam, geometry, 512, 427), atol=1e-6)
    spacing = written.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    assert [round(float(v), 4) for v in spacing] == [
        round(0.2 * 1200 / 512, 4),
        round(0.2 * 1000 / 427, 4),
    ]


@pytest.mark.slow
def test_every_pm_for_the_shared_chest_xrays_has_no_dciodvfy_error_of_our_making(
    node_factory: Any, shared_data: Path
) -> None:
    node = node_factory(outputs=MAPS_ON, thresholds=LOW_THRESHOLDS)
    files = sorted((shared_data / "dicom" / "cxr").glob("*.dcm"))
    assert {_send_as_is(node.scp_port, path) for path in files} == {0}
    _analyse_everything(node)
    root = Path(node.settings.storage.root)
    with session_scope(node.session_factory) as session:
        sources = {
            sop: root / path
            for sop, path in session.execute(select(Instance.sop_instance_uid, Instance.path))
        }
        analysed = session.scalars(
            select(Job).where(Job.kind == "analysis", Job.state == "done")
        ).all()
    maps = _outputs(node, "pm")
    assert len({m.study_instance_uid for m in maps}) == len(analysed) >= 4
    for output in maps:
        written = pydicom.dcmread(root / output.path, stop_before_pixels=True)
        source = sources[str(written.SourceImageSequence[0].ReferencedSOPInstanceUID)]
        errors = dciodvfy_errors(root / output.path)
        ours = errors - dciodvfy_errors(source)
        assert not ours, (output.label, sorted(ours))


@pytest.mark.slow
def test_orthanc_holds_the_pms_in_the_study_and_the_study_page_lists_them(
    node_factory: Any, tmp_path: Path
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    peer = PeerSettings(
        name="orthanc",
        ae_title="ORTHANC",
        host="127.0.0.1",
        port=orthanc.dicom_port,
        send_results=True,
    )
    node = node_factory(
        roles=("scp", "worker"),
        peers=(peer,),
        outputs=MAPS_ON,
        thresholds=LOW_THRESHOLDS,
        scheduler=SchedulerSettings(study_quiet_seconds=1, tick_seconds=0.2),
    )
    try:
        orthanc.start(NODE_AE, node.scp_port)
        study = orthanc.relay_to_node(make_cxr_dataset(rows=512, columns=448))
        assert wait_until(lambda: _delivered(node), timeout=120, interval=0.5)
        paths = {m.sop_instance_uid: m.path for m in _outputs(node, "pm")}
        maps = set(paths)
        assert len(maps) >= 1
        held = {
            i["MainDicomTags"].get("SOPInstanceUID"): i for i in orthanc.instances_of_study(study)
        }
        assert maps <= set(held)
        for uid in maps:
            tags = orthanc.get(f"/instances/{held[uid]['ID']}/simplified-tags")
            assert (tags["SOPClassUID"], tags["StudyInstanceUID"]) == (
                PARAMETRIC_MAP_STORAGE,
                study,
            )
            with urllib.request.urlopen(
                f"http://127.0.0.1:{orthanc.http_port}/instances/{held[uid]['ID']}/file", timeout=60
            ) as response:
                stored = pydicom.dcmread(io.BytesIO(response.read()))
            ours = pydicom.dcmread(Path(node.settings.storage.root) / paths[uid])
            assert stored.FloatPixelData == ours.FloatPixelData  # the map arrived intact
        with session_scope(node.session_factory) as session:
            listed = study_detail(session, study, critical=()).outputs
        assert {o.sop_instance_uid for o in listed if o.kind == "pm"} == maps
    finally:
        orthanc.stop()


def _delivered(node: Any) -> bool:
    with session_scope(node.session_factory) as session:
        states = set(session.scalars(select(Job.state).where(Job.kind == "delivery")))
    return states == {"done"}


def _analyse_and_deliver(node: Any, datasets: list[Any]) -> None:
    assert set(send_datasets(node.scp_port, datasets)) == {0}
    close_quiet_studies(node.session_factory, quiet_seconds=0, max_attempts=3, now=utcnow())
    Worker(node.settings, node.session_factory, load_bundle(node.settings)).run_once()
    while DeliveryWorker(node.settings, node.session_factory).run_once():
        pass


def _pacs_peer(pacs: ScriptedPacs, **options: Any) -> tuple[PeerSettings, ...]:
    return (
        PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
        PeerSettings(
            name="pacs",
            ae_title=PACS_AE,
            host="127.0.0.1",
            port=pacs.port,
            send_results=True,
            **options,
        ),
    )


def test_a_pacs_without_parametric_map_storage_gets_sr_and_sc_and_the_maps_end_rejected(
    node_factory: Any,
) -> None:
    pacs = ScriptedPacs()  # negotiates SR, SC and KOS only, as many PACS do
    try:
        node = node_factory(outputs=MAPS_ON, thresholds=LOW_THRESHOLDS, peers=_pacs_peer(pacs))
        _analyse_and_deliver(node, [make_cxr_dataset(rows=256, columns=256)])
        with session_scope(node.session_factory) as session:
            kinds = dict(session.execute(select(Output.sop_instance_uid, Output.kind)).all())
            ledger = {d.sop_instance_uid: d for d in session.scalars(select(Delivery))}
            job = session.scalars(select(Job).where(Job.kind == "delivery")).one()
            session.expunge_all()
        maps = {uid for uid, kind in kinds.items() if kind == "pm"}
        assert maps and set(pacs.received) == set(kinds) - maps
        assert {ledger[uid].outcome for uid in maps} == {"rejected"}
        assert {ledger[uid].detail for uid in maps} == {"the peer did not accept this SOP class"}
        assert {ledger[uid].outcome for uid in set(kinds) - maps} == {"delivered"}
        assert job.state == "dead" and "rejected" in (job.last_error or "")
    finally:
        pacs.stop()


def test_a_reopened_study_supersedes_its_pms_and_the_rejection_note_lists_them(
    node_factory: Any,
) -> None:
    pacs = ScriptedPacs()
    try:
        node = node_factory(
            outputs=MAPS_ON,
            thresholds=LOW_THRESHOLDS,
            peers=_pacs_peer(pacs, withdraw_superseded=True),
        )
        first = make_cxr_dataset(rows=256, columns=256, view_position="AP")
        _analyse_and_deliver(node, [first])
        old_maps = {o.sop_instance_uid for o in _outputs(node, "pm")}
        later = make_cxr_dataset(
            rows=256, columns=256, seed=5, study_instance_uid=first.StudyInstanceUID
        )
        _analyse_and_deliver(node, [later])  # revision 2: a new analysis, new maps
        maps = {o.sop_instance_uid: o.state for o in _outputs(node, "pm")}
        assert old_maps and {maps[uid] for uid in old_maps} == {"superseded"}
        assert {state for uid, state in maps.items() if uid not in old_maps} == {"current"}
        (note,) = _outputs(node, "kos")
        path = Path(node.settings.storage.root) / note.path
        kos = pydicom.dcmread(path)
        listed = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: item
            for item in kos.ContentSequence
            if item.ValueType in ("IMAGE", "COMPOSITE")
        }
        assert old_maps <= set(listed)
        assert {listed[uid].ReferencedSOPSequence[0].ReferencedSOPClassUID for uid in old_maps} == {
            PARAMETRIC_MAP_STORAGE
        }
        assert not dciodvfy_errors(path)
    finally:
        pacs.stop()


def test_pm_geometry_follows_the_source_orientation_and_spacing_or_says_nominal() -> None:
    settings = dataclasses.replace(Settings(), outputs=MAPS_ON)

    def shared_groups(**attributes: Any) -> Any:
        source = make_cxr_dataset(rows=256, columns=256, sop_instance_uid="1.2.3.4.5")
        for keyword, value in attributes.items():
            setattr(source, keyword, value)
        (built,) = [
            o
            for o in build_analysis_outputs(
                source_header(source).dataset, _analysis(), settings, datetime.now()
            )
            if o.kind == "pm"
        ]
        written = pydicom.dcmread(io.BytesIO(built.data))
        group = written.SharedFunctionalGroupsSequence[0]
        return (
            written.get("PatientOrientation"),
            [float(v) for v in group.PlaneOrientationSequence[0].ImageOrientationPatient],
            [float(v) for v in group.PixelMeasuresSequence[0].PixelSpacing],
        )

    rotated = shared_groups(PatientOrientation=["H", "L"], PixelSpacing=[0.15, 0.16])
    assert rotated == (["H", "L"], [0, 0, 1, 1, 0, 0], [0.15, 0.16])
    unknown = shared_groups(PixelSpacing=[0, 0])  # no orientation; a spacing of 0 is no spacing
    assert unknown == ("", [1, 0, 0, 0, 0, -1], [1.0, 1.0])  # present, empty: unknown
