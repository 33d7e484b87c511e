"""A live model and a shadow challenger on the same studies, Orthanc as the PACS.

Both analyse every study and both results are stored, each naming its model; Orthanc
receives only the live model's SR and SC, and the radiologists' worklist and study pages
show only the live model's result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from dicom_node.config.models import ModelSpec
from dicom_node.config.settings import PeerSettings, SchedulerSettings
from dicom_node.db.models import AnalysisResult, Job, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.web.queries import current_analysis_jobs
from tests.conftest import MODEL_NAME, wait_until
from tests.helpers import NODE_AE, SCU_AE, send_datasets
from tests.peers import Orthanc


@pytest.mark.slow
def test_orthanc_holds_only_the_live_models_outputs_and_radiologists_see_only_them(
    node_factory: Any, tmp_path: Path
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc")
    node = node_factory(
        roles=("scp", "worker"),
        peers=(
            PeerSettings(name="test-scu", ae_title=SCU_AE, host="127.0.0.1"),
            PeerSettings(
                name="orthanc",
                ae_title="ORTHANC",
                host="127.0.0.1",
                port=orthanc.dicom_port,
                send_results=True,
            ),
        ),
        models=(
            ModelSpec("live-model", MODEL_NAME),
            ModelSpec("challenger", MODEL_NAME, mode="shadow"),
        ),
        scheduler=SchedulerSettings(study_quiet_seconds=0.5, tick_seconds=0.2),
    )
    try:
        orthanc.start(NODE_AE, node.scp_port)
        sources = [make_cxr_dataset(rows=320, columns=288, seed=seed) for seed in range(2)]
        assert send_datasets(node.scp_port, sources) == [0, 0]
        factory = node.session_factory

        def finished() -> bool:
            with session_scope(factory) as session:
                jobs = session.scalars(select(Job)).all()
            analyses = [j for j in jobs if j.kind == "analysis"]
            deliveries = [j for j in jobs if j.kind == "delivery"]
            return (
                len(analyses) == 4
                and {j.state for j in analyses} == {"done"}
                and len(deliveries) == 2
                and {j.state for j in deliveries} == {"done"}
            )

        assert wait_until(finished, timeout=240, interval=0.5)
        with session_scope(factory) as session:
            results = session.scalars(select(AnalysisResult)).all()
            assert sorted((r.model_name, r.mode) for r in results) == [
                ("challenger", "shadow"),
                ("challenger", "shadow"),
                ("live-model", "live"),
                ("live-model", "live"),
            ]
            live_jobs = {r.job_id for r in results if r.mode == "live"}
            outputs = session.scalars(select(Output)).all()
            assert outputs and {o.job_id for o in outputs} == live_jobs
            ours = {o.sop_instance_uid for o in outputs}
            shown = current_analysis_jobs(session, [str(s.StudyInstanceUID) for s in sources])
            assert {job.id for job in shown.values()} == live_jobs
        held = set()
        for source in sources:
            for instance in orthanc.instances_of_study(str(source.StudyInstanceUID)):
                held.add(instance["MainDicomTags"]["SOPInstanceUID"])
        assert held == ours  # the live model's SR and SC, nothing of the shadow model
        sr = next(o for o in outputs if o.kind == "sr")
        text = pydicom.dcmread(Path(node.settings.storage.root) / sr.path).to_json()
        assert "live-model" in text and "challenger" not in text
    finally:
        orthanc.stop()
