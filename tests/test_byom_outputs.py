"""A site model without a CAM output analyses a study end to end: SR and SC written, valid by
dciodvfy, saying "No heatmap from this model"; the card's hash is in the result and the SR."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import httpx
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_node.clock import utcnow
from dicom_node.config.settings import ModelSettings, WebSettings
from dicom_node.db.models import AnalysisResult, Finding, Output
from dicom_node.db.session import session_scope
from dicom_node.dev.samples import make_cxr_dataset
from dicom_node.inference.byom import import_model
from dicom_node.inference.card import thresholds_table
from dicom_node.inference.registry import read_registry
from dicom_node.results import NO_HEATMAP
from dicom_node.web.users import add_user, create_token
from tests.byom_support import ENTRY, seeded_densenet, write_card
from tests.helpers import send_datasets
from tests.test_outputs import _analyse_everything, dciodvfy_errors
from tests.web_support import PASSWORD, login

NAME = "site-nocam"


@pytest.fixture(scope="module")
def nocam_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain ONNX classifier (image -> scores only) imported with a card that names no
    heatmap, every operating point low so that most findings are positive."""
    root = tmp_path_factory.mktemp("nocam")
    torch.onnx.export(
        seeded_densenet(),
        (torch.zeros(1, 1, 224, 224),),
        str(root / "plain.onnx"),
        input_names=["image"],
        output_names=["scores"],
        dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    low = thresholds_table(ENTRY.labels, (0.001,) * len(ENTRY.labels))
    card = write_card(root / "card.toml", "onnx", thresholds=low)
    import_model(root / "models", NAME, root / "plain.onnx", card)
    return root / "models"


def _texts(dataset: Dataset) -> Iterator[str]:
    """Every TextValue of an SR content tree."""
    for item in dataset.get("ContentSequence", []):
        if "TextValue" in item:
            yield str(item.TextValue)
        yield from _texts(item)


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_model_without_cam_output_writes_valid_sr_and_sc_that_say_no_heatmap(
    node_factory: Any, nocam_models: Path
) -> None:
    node = node_factory(
        roles=("scp", "web"),
        model=ModelSettings(models_dir=str(nocam_models), name=NAME),
        web=WebSettings(host="127.0.0.1", port=0, refresh_seconds=0),
    )
    source = make_cxr_dataset(rows=400, columns=360)
    assert send_datasets(node.scp_port, [source]) == [0]
    _analyse_everything(node)
    root = Path(node.settings.storage.root)
    card_sha256 = read_registry(nocam_models)[NAME].card_sha256
    with session_scope(node.session_factory) as session:
        result = session.scalars(select(AnalysisResult)).one()
        findings = list(session.scalars(select(Finding)))
        written = [(o.kind, o.path) for o in session.scalars(select(Output))]
    outputs = dict(written)
    assert (result.card_sha256, result.runtime, result.model_name) == (
        card_sha256,
        "onnxruntime",
        NAME,
    )
    assert len(findings) == 18 and sum(f.positive for f in findings) >= 9
    assert all(f.heatmap_path is None and json.loads(f.boxes or "[]") == [] for f in findings)
    assert set(outputs) == {"sr", "sc"}
    source_file = root / "source.dcm"
    source.save_as(source_file, enforce_file_format=True)
    assert sorted(kind for kind, _ in written)[0] == "sc" and len(written) >= 2
    for _, path in written:
        assert not dciodvfy_errors(root / path) - dciodvfy_errors(source_file)
    report = hd.sr.srread(root / outputs["sr"])
    assert not report.content.get_planar_roi_measurement_groups()  # no SCOORD boxes
    texts = list(_texts(report))
    assert any(NO_HEATMAP in text for text in texts), texts
    assert f"card sha256 {card_sha256}" in texts and "runtime onnxruntime" in texts
    sc = pydicom.dcmread(root / outputs["sc"])
    assert NO_HEATMAP in sc.DerivationDescription
    _assert_web_says_no_heatmap(node, source.StudyInstanceUID, card_sha256)


def _assert_web_says_no_heatmap(node: Any, study_instance_uid: str, card_sha256: str) -> None:
    """The study page offers no heatmap switcher and says why; the API names the card."""
    with session_scope(node.session_factory) as session:
        add_user(session, username="rad", password=PASSWORD, role="radiologist", now=utcnow())
        token = create_token(session, name="ris", scope="read", now=utcnow())
    page = login(node.web_url).get(f"/studies/{study_instance_uid}")
    assert page.status_code == 200
    assert 'id="no-heatmap"' in page.text and 'id="heatmap-switcher"' not in page.text
    assert card_sha256 in page.text and "onnxruntime" in page.text
    api = httpx.get(
        f"{node.web_url}/api/v1/studies/{study_instance_uid}",
        headers={"Authorization": f"Bearer {token}"},
    ).json()
    assert (api["model"]["card_sha256"], api["model"]["runtime"]) == (card_sha256, "onnxruntime")
