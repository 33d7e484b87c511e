"""The drift monitor on the real database: analysed studies are replayed as the rows the
worker writes (jobs, results with their header features, findings), in arrival order, and
the monitor recomputes after every 25 studies, as the scheduler would between ticks.

600 stationary studies raise no alarm; then 20% lateral studies (which the gating skips),
a new Manufacturer on 30% of studies, or a shifted score each raise the alarm within 150
studies, naming the field, with an audit event ``model.drift`` and Prometheus gauges.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import Engine, insert, select

from dicom_node.clock import utcnow
from dicom_node.config.models import DriftSettings
from dicom_node.db.models import AnalysisResult, AuditEvent, Finding, Job, Study
from dicom_node.db.session import make_session_factory, session_scope
from dicom_node.db.validation import DriftPoint
from dicom_node.ops.metrics.collect import StateCollector
from dicom_node.validation.monitor import gating_of, recompute

MODEL = "live-model"
FINDINGS = ("Effusion", "Cardiomegaly", "Pneumothorax")
SETTINGS = DriftSettings(reference_studies=500, window_studies=500, min_studies=30)
Study_ = dict[str, Any]


def _stationary(rng: np.random.Generator) -> Study_:
    return {
        "ViewPosition": str(rng.choice(["PA", "AP"], p=[0.7, 0.3])),
        "Manufacturer": str(rng.choice(["ACME", "Globex"], p=[0.6, 0.4])),
        "PatientSex": str(rng.choice(["F", "M"])),
        "Modality": "DX",
        "Rows": float(rng.choice([2048, 2500, 3000])),
        "Columns": float(rng.choice([2048, 2500])),
        "PatientAge": float(rng.normal(60, 12)),
        "KVP": float(rng.normal(110, 5)),
        "scores": {name: float(rng.beta(2, 5)) for name in FINDINGS},
    }


def _lateral(rng: np.random.Generator) -> Study_:
    study = _stationary(rng)
    if rng.random() < 0.2:
        study["skipped"] = "not analysed: view LL is not PA or AP"
    return study


def _new_manufacturer(rng: np.random.Generator) -> Study_:
    study = _stationary(rng)
    if rng.random() < 0.3:
        study["Manufacturer"] = "Initech"
    return study


def _shifted_score(rng: np.random.Generator) -> Study_:
    study = _stationary(rng)
    study["scores"]["Effusion"] = min(1.0, study["scores"]["Effusion"] + 0.15)
    return study


class Replay:
    """Rows for studies as the worker records them, and the monitor after every batch."""

    def __init__(self, engine: Engine) -> None:
        self.factory = make_session_factory(engine)
        self.count = 0
        self.start = utcnow() - timedelta(days=1)

    def add(self, studies: list[Study_]) -> None:
        with session_scope(self.factory) as session:
            for study in studies:
                self._add(session, study)

    def _add(self, session: Any, study: Study_) -> None:
        self.count += 1
        uid = f"1.2.826.0.1.3680043.10.1234.77.{self.count}"
        at = self.start + timedelta(seconds=30 * self.count)
        session.add(Study(study_instance_uid=uid, first_received_at=at, last_received_at=at))
        session.flush()
        skipped = study.get("skipped")
        job = Job(
            kind="analysis",
            state="skipped" if skipped else "done",
            study_instance_uid=uid,
            study_revision=1,
            target=MODEL,
            mode="live",
            reason=skipped,
            created_at=at,
            updated_at=at,
        )
        session.add(job)
        session.flush()
        if skipped:
            return
        features = {k: v for k, v in study.items() if k not in ("scores", "skipped")}
        session.add(
            AnalysisResult(
                job_id=job.id,
                study_instance_uid=uid,
                sop_instance_uid=uid + ".1",
                model_name=MODEL,
                model_version="1",
                weights_sha256="a" * 64,
                weights_status="verified",
                thresholds_source="test",
                mode="live",
                features=json.dumps(features),
                created_at=at,
            )
        )
        session.flush()
        session.execute(
            insert(Finding),
            [
                {"job_id": job.id, "label": name, "probability": p, "positive": p > 0.5}
                for name, p in study["scores"].items()
            ],
        )

    def recompute(self) -> Any:
        result, _ = recompute(self.factory, MODEL, SETTINGS, utcnow())
        return result


def _replay(
    replay: Replay, make: Callable[[np.random.Generator], Study_], count: int, seed: int
) -> list[Any]:
    """Add ``count`` studies in batches of 25, recomputing after each; the results."""
    rng = np.random.default_rng(seed)
    results = []
    for _ in range(count // 25):
        replay.add([make(rng) for _ in range(25)])
        results.append(replay.recompute())
    return results


@pytest.mark.parametrize(
    ("make", "field"),
    [(_lateral, "gating"), (_new_manufacturer, "Manufacturer"), (_shifted_score, "score:Effusion")],
    ids=["laterals", "new-manufacturer", "score-shift"],
)
def test_stationary_studies_raise_no_alarm_and_a_shift_raises_it_within_150_naming_the_field(
    engine: Engine, make: Callable[[np.random.Generator], Study_], field: str
) -> None:
    replay = Replay(engine)
    stationary = _replay(replay, _stationary, 600, seed=1)
    assert not any(result.alarm for result in stationary), [r.moved for r in stationary]
    assert stationary[-1].n_reference == 500 and stationary[-1].n_recent == 100
    shifted = _replay(replay, make, 150, seed=2)
    first = next((i for i, result in enumerate(shifted) if result.alarm), None)
    assert first is not None, [(r.combined, r.moved) for r in shifted]
    print(f"{field}: alarm after {(first + 1) * 25} shifted studies, moved {shifted[first].moved}")
    assert shifted[first].moved[0] == field
    with session_scope(replay.factory) as session:
        audits = session.scalars(select(AuditEvent).where(AuditEvent.event_type == "model.drift"))
        details = [json.loads(a.details or "{}") for a in audits]
        assert details and details[0]["model"] == MODEL and field in details[0]["moved"]
        points = session.scalars(select(DriftPoint).order_by(DriftPoint.id)).all()
        assert len(points) == len(stationary) + len(shifted)  # the time series


def test_the_drift_gauges_export_the_latest_point(engine: Engine, tmp_path: Path) -> None:
    replay = Replay(engine)
    _replay(replay, _stationary, 550, seed=3)
    _replay(replay, _new_manufacturer, 150, seed=4)
    registry = CollectorRegistry()
    registry.register(StateCollector(replay.factory, tmp_path))
    text = generate_latest(registry).decode()
    assert f'dicom_node_model_drift_alarm{{model="{MODEL}"}} 1.0' in text
    assert f'dicom_node_model_drift_z{{field="Manufacturer",model="{MODEL}",test="chi2"}}' in text


def test_gating_categories_drop_the_particulars() -> None:
    assert gating_of("done", None) == "analysed"
    assert (
        gating_of("skipped", "not analysed: view LL is not PA or AP") == "view LL is not PA or AP"
    )
    assert gating_of("skipped", "not analysed: patient under 18") == "patient under N"
    assert gating_of("skipped", "not analysed: body part HEAD, not chest; x") == (
        "body part HEAD, not chest"
    )
