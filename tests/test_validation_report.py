"""Local validation end to end: a model with known behaviour analyses labelled studies sent
through the real SCP and worker (in shadow mode), the report equals scikit-learn computed
from the stored scores, and operating points applied from it hold on a held-out set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import roc_auc_score
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.models import ModelSpec, ValidationSettings
from dicom_node.config.settings import ModelSettings
from dicom_node.db.models import AnalysisResult, Finding, Job, Output, Study
from dicom_node.db.session import session_scope
from dicom_node.db.validation import ModelModeChange
from dicom_node.errors import PromotionRefusedError
from dicom_node.inference.registry import install
from dicom_node.results import reported_labels
from dicom_node.validation import promotion
from dicom_node.validation.labels import import_labels
from dicom_node.validation.report import ReportRequest, build_report, save_report
from dicom_node.validation.thresholds import apply_points
from tests.conftest import MODEL_NAME, wait_until
from tests.helpers import send_datasets
from tests.validation_support import (
    BOX,
    brightness_grid,
    label_of,
    make_known_checkpoint,
    study_dataset,
)

MODEL = "challenger"
STUDIES = 200


@pytest.fixture(scope="module")
def known_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("known")
    folder = work / "models"
    install(folder, MODEL_NAME, make_known_checkpoint(work / "known.pt", work), "known model")
    return folder


def _send_and_wait(node: Any, datasets: list[Any], done_before: int) -> None:
    for start in range(0, len(datasets), 50):
        assert set(send_datasets(node.scp_port, datasets[start : start + 50])) == {0}
    expected = done_before + len(datasets)
    assert wait_until(lambda: _done(node) >= expected, timeout=900, interval=1.0), _done(node)


def _done(node: Any) -> int:
    with session_scope(node.session_factory) as session:
        return len(session.scalars(select(Job.id).where(Job.state == "done")).all())


def _labels_csv(datasets: list[Any], brightness: np.ndarray) -> bytes:
    """accession_number rows with Effusion labels; a box for every other positive."""
    x, y, w, h = BOX
    lines = ["accession_number,finding,label,box_x,box_y,box_width,box_height"]
    for i, (ds, b) in enumerate(zip(datasets, brightness, strict=True)):
        label = label_of(i, float(b))
        box = f"{x},{y},{w},{h}" if label and i % 2 == 0 else ",,,"
        lines.append(f"{ds.AccessionNumber},Effusion,{label},{box}")
    return ("\n".join(lines) + "\n").encode()


def _stored(node: Any, accessions: set[str]) -> dict[str, tuple[float, float, bool, list]]:
    """accession -> (Effusion probability, threshold, positive, boxes) of the shadow model."""
    with session_scope(node.session_factory) as session:
        rows = session.execute(
            select(Study.accession_number, Finding.probability, Finding.threshold,
                   Finding.positive, Finding.boxes)
            .join(AnalysisResult, AnalysisResult.study_instance_uid == Study.study_instance_uid)
            .join(Finding, Finding.job_id == AnalysisResult.job_id)
            .where(Finding.label == "Effusion", AnalysisResult.model_name == MODEL)
        ).all()  # fmt: skip
    return {
        accession: (probability, threshold, positive, json.loads(boxes) if boxes else [])
        for accession, probability, threshold, positive, boxes in rows
        if accession in accessions
    }


def _iobb(predicted: list[float], truth: tuple[int, int, int, int]) -> float:
    x, y, w, h = truth
    ix = max(0.0, min(predicted[2], x + w) - max(predicted[0], x))
    iy = max(0.0, min(predicted[3], y + h) - max(predicted[1], y))
    return ix * iy / ((predicted[2] - predicted[0]) * (predicted[3] - predicted[1]))


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 400 studies through the real node; about 2 min on an idle machine
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_report_of_200_labelled_studies_equals_sklearn_and_its_thresholds_hold_on_new_studies(
    node_factory: Any, known_models_dir: Path, tmp_path: Path
) -> None:
    node = node_factory(
        roles=("scp", "worker"),
        models=(ModelSpec(MODEL, MODEL_NAME, mode="shadow"),),
        model=ModelSettings(models_dir=str(known_models_dir), batch_size=8),
        validation=ValidationSettings(),
    )
    brightness = brightness_grid(STUDIES, 0.25)
    train = [study_dataset(i, float(b), "VAL") for i, b in enumerate(brightness)]
    _send_and_wait(node, train, 0)
    factory = node.session_factory
    findings = set(reported_labels(MODEL_NAME))
    with session_scope(factory) as session:
        summary = import_labels(
            session, _labels_csv(train, brightness), findings, username="test", now=utcnow()
        )
    assert (summary.rows, summary.studies) == (STUDIES, STUDIES)
    request = ReportRequest(model_name=MODEL, mode="shadow")
    with session_scope(factory) as session:
        report = build_report(session, request, utcnow())
        _, html_path, report_sha = save_report(
            session, report, tmp_path / "report", since=None, until=None, now=utcnow()
        )
    effusion = report["findings"]["Effusion"]
    stored = _stored(node, {ds.AccessionNumber for ds in train})
    truth = np.array([label_of(i, float(b)) for i, b in enumerate(brightness)])
    scores = np.array([stored[ds.AccessionNumber][0] for ds in train])
    threshold = stored[train[0].AccessionNumber][1]
    predicted = scores >= threshold
    assert (effusion["n_pos"], effusion["n_neg"]) == (truth.sum(), STUDIES - truth.sum())
    assert effusion["auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-9)
    assert 0.8 < effusion["auroc"] < 1.0  # the model discriminates, imperfectly
    tp = int((predicted & (truth == 1)).sum())
    tn = int((~predicted & (truth == 0)).sum())
    assert effusion["sensitivity"] == pytest.approx(tp / truth.sum(), abs=1e-9)
    assert effusion["specificity"] == pytest.approx(tn / (STUDIES - truth.sum()), abs=1e-9)
    assert effusion["ece"] == pytest.approx(_ece(truth, scores), abs=1e-9)
    delong, bootstrap = effusion["auroc_ci"], effusion["auroc_ci_bootstrap"]
    assert abs(delong[0] - bootstrap[0]) <= 0.02 and abs(delong[1] - bootstrap[1]) <= 0.02
    _assert_iobb(effusion, train, brightness, stored)
    # A finding nobody labelled is not in the report; the report file is self-contained.
    assert set(report["findings"]) == {"Effusion"}
    assert "https://" not in html_path.read_text() and "SHADOW" in html_path.read_text()
    with session_scope(factory) as session:
        assert session.scalars(select(Output)).all() == []  # a shadow model builds nothing
    _assert_thresholds_hold_on_held_out_set(node, report, report_sha)
    _assert_promotion_needs_the_report(node, report_sha)


def _ece(truth: np.ndarray, scores: np.ndarray) -> float:
    """15 equal-width bins; each bin's weight is its share of the cases."""
    fraction, mean = calibration_curve(truth, scores, n_bins=15, strategy="uniform")
    edges = np.linspace(0, 1, 16)
    # calibration_curve drops empty bins; its bins are right-closed like the report's
    bins = np.searchsorted(edges[1:-1], scores, side="left")
    counts = np.bincount(bins, minlength=15)
    filled = counts[counts > 0]
    return float(np.sum(filled / len(scores) * np.abs(fraction - mean)))


def _assert_iobb(effusion: dict, train: list, brightness: np.ndarray, stored: dict) -> None:
    hits = {0.1: 0, 0.25: 0, 0.5: 0}
    boxes = 0
    for i, (ds, b) in enumerate(zip(train, brightness, strict=True)):
        if label_of(i, float(b)) and i % 2 == 0:
            boxes += 1
            predicted = stored[ds.AccessionNumber][3]
            for t in hits:
                hits[t] += any(_iobb(p, BOX) >= t for p in predicted)
    assert effusion["n_boxes"] == boxes > 0
    assert effusion["iobb_hit_rate"] == pytest.approx(
        {str(t): hits[t] / boxes for t in hits}, abs=1e-12
    )


def _assert_thresholds_hold_on_held_out_set(node: Any, report: dict, report_sha: str) -> None:
    proposed = report["findings"]["Effusion"]["proposed"]
    with session_scope(node.session_factory) as session:
        points = apply_points(session, report, report_sha, username="test", now=utcnow())
    assert points.thresholds["Effusion"] == proposed["threshold"]
    brightness = brightness_grid(STUDIES, 0.75)
    held_out = [study_dataset(5000 + i, float(b), "HLD") for i, b in enumerate(brightness)]
    _send_and_wait(node, held_out, STUDIES)
    stored = _stored(node, {ds.AccessionNumber for ds in held_out})
    truth = np.array([label_of(5000 + i, float(b)) for i, b in enumerate(brightness)])
    scores = np.array([stored[ds.AccessionNumber][0] for ds in held_out])
    assert {stored[ds.AccessionNumber][1] for ds in held_out} == {proposed["threshold"]}
    sensitivity = float((scores[truth == 1] >= proposed["threshold"]).mean())
    print(f"held-out sensitivity {sensitivity:.4f} at threshold {proposed['threshold']:.4f} "
          f"(target 0.95, {int(truth.sum())} positives)")  # fmt: skip
    assert abs(sensitivity - 0.95) <= 0.02
    with session_scope(node.session_factory) as session:
        versions = set(
            session.scalars(
                select(AnalysisResult.thresholds_version)
                .join(Study, Study.study_instance_uid == AnalysisResult.study_instance_uid)
                .where(Study.accession_number.like("HLD%"))
            )
        )
    assert versions == {"v1"}  # every later result names the version it was decided with


def _assert_promotion_needs_the_report(node: Any, report_sha: str) -> None:
    settings = node.settings
    with session_scope(node.session_factory) as session:
        message = promotion.promote(
            session, settings, MODEL, force=False, username="test", now=utcnow()
        )
        assert report_sha[:12] in message
        change = session.scalars(select(ModelModeChange)).one()
        assert (change.mode, change.report_sha256, change.forced) == ("live", report_sha, False)
    with pytest.raises(PromotionRefusedError):
        with session_scope(node.session_factory) as session:
            promotion.promote(
                session,
                _other_weights(settings),
                MODEL,
                force=False,
                username="test",
                now=utcnow(),
            )


def _other_weights(settings: Any) -> Any:
    """The same model name on other (untrained) weights: the report does not count for them."""
    import dataclasses

    spec = dataclasses.replace(settings.models[0], allow_untrained=True)
    empty = dataclasses.replace(settings.model, models_dir=str(Path(settings.storage.root) / "x"))
    return dataclasses.replace(settings, models=(spec,), model=empty)
