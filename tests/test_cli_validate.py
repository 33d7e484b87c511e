"""``dicom-node validate labels import`` and ``models promote|demote`` as a site runs them:
a real config file, a real database, the command in a subprocess.

A bad labels file is refused whole, naming the line, with exit status 4 and nothing
imported; a model without a validation report is not promoted (exit 1, audited) unless
``--force`` (audited as forced); demote puts it back in shadow.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from dicom_node.config.models import ModelSpec
from dicom_node.config.settings import load_settings
from dicom_node.db.models import AuditEvent, Study
from dicom_node.db.session import make_engine, make_session_factory, session_scope
from dicom_node.db.validation import GroundTruthLabel, ModelModeChange
from dicom_node.validation.modes import effective_mode
from tests.conftest import MODEL_NAME
from tests.helpers import free_port, run_cli, write_config

T0 = datetime(2026, 11, 1, tzinfo=UTC)
MODELS = f"""
[models.live-model]
catalogue = "{MODEL_NAME}"
[models.challenger]
catalogue = "{MODEL_NAME}"
mode = "shadow"
allow_untrained = true
"""


@pytest.fixture
def site(tmp_path: Path, db_url: str, models_dir: Path) -> Any:
    """A config naming a live model and a shadow challenger, a migrated database with two
    studies (accession numbers ACC1, ACC2)."""
    config = write_config(
        tmp_path / "node.toml",
        root=tmp_path / "store",
        db_url=db_url,
        port=free_port(),
        models_dir=models_dir,
        extra=MODELS,
    )
    assert run_cli(config, "db", "upgrade").returncode == 0
    engine = make_engine(db_url)
    factory = make_session_factory(engine)
    with session_scope(factory) as session:
        for n in (1, 2):
            session.add(
                Study(
                    study_instance_uid=f"1.2.3.{n}",
                    accession_number=f"ACC{n}",
                    first_received_at=T0,
                    last_received_at=T0,
                )
            )
    yield config, factory
    engine.dispose()


def _labels(factory: Any) -> list[tuple[str, str, int]]:
    with session_scope(factory) as session:
        return [
            (r.study_instance_uid, r.finding, r.label)
            for r in session.scalars(select(GroundTruthLabel).order_by(GroundTruthLabel.id))
        ]


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("study_instance_uid,finding,label\n1.2.3.1,Effusion,1\n1.2.3.2,Efusion,0\n",
         "line 3: unknown finding 'Efusion'"),
        ("study_instance_uid,finding,label\n1.2.3.1,Effusion,2\n", "line 2: label must be 1 or 0"),
        ("study_instance_uid,label\n1.2.3.1,1\n", "line 1: missing column 'finding'"),
        ("accession_number,finding,label\nACC1,Effusion,1\nACC9,Effusion,0\n",
         "line 3: no study with accession_number 'ACC9'"),
        ("study_instance_uid,finding,label,box_x,box_y,box_width,box_height\n"
         "1.2.3.1,Effusion,1,10,10,0,5\n", "line 2: box_width and box_height must be positive"),
    ],
    ids=["unknown-finding", "label-2", "missing-column", "unknown-study", "empty-box"],
)  # fmt: skip
def test_a_bad_labels_file_is_refused_naming_the_line_and_nothing_is_imported(
    site: Any, tmp_path: Path, csv: str, message: str
) -> None:
    config, factory = site
    path = tmp_path / "labels.csv"
    path.write_text(csv)
    result = run_cli(config, "validate", "labels", "import", str(path))
    assert result.returncode == 4, result.stderr
    assert message in result.stderr and "nothing was changed" in result.stderr
    assert "Traceback" not in result.stderr
    assert _labels(factory) == []


def test_labels_import_by_accession_and_a_reimport_replaces_that_studys_labels(
    site: Any, tmp_path: Path
) -> None:
    config, factory = site
    first = tmp_path / "first.csv"
    first.write_text(
        "accession_number,finding,label\nACC1,Effusion,1\nACC1,Cardiomegaly,0\nACC2,Effusion,0\n"
    )
    assert run_cli(config, "validate", "labels", "import", str(first)).returncode == 0
    again = tmp_path / "again.csv"
    again.write_text("study_instance_uid,finding,label\n1.2.3.1,Pneumothorax,1\n")
    result = run_cli(config, "validate", "labels", "import", str(again))
    assert result.returncode == 0 and "replacing 2 earlier rows" in result.stdout
    assert sorted(_labels(factory)) == [
        ("1.2.3.1", "Pneumothorax", 1),
        ("1.2.3.2", "Effusion", 0),
    ]
    with session_scope(factory) as session:
        audits = session.scalars(
            select(AuditEvent).where(AuditEvent.event_type == "validation.labels_imported")
        ).all()
    assert len(audits) == 2 and json.loads(audits[1].details or "{}")["rows"] == 1


def test_promote_without_a_report_is_refused_and_audited_and_force_promotes(site: Any) -> None:
    config, factory = site
    refused = run_cli(config, "models", "promote", "challenger")
    assert refused.returncode == 1
    assert "no validation report of its current weights" in refused.stderr
    forced = run_cli(config, "models", "promote", "challenger", "--force")
    assert forced.returncode == 0 and "FORCED" in forced.stdout
    settings = load_settings(config, {})
    spec = next(s for s in settings.model_specs if s.name == "challenger")
    with session_scope(factory) as session:
        assert effective_mode(session, spec)[0] == "live"
        change = session.scalars(select(ModelModeChange)).one()
        assert (change.forced, change.report_sha256) == (True, None)
        events = [
            (a.event_type, a.outcome)
            for a in session.scalars(select(AuditEvent).order_by(AuditEvent.id))
            if a.event_type.startswith("model.")
        ]
    assert events == [("model.promotion_refused", "failure"), ("model.promoted", "success")]
    assert run_cli(config, "models", "demote", "challenger").returncode == 0
    with session_scope(factory) as session:
        assert effective_mode(session, spec)[0] == "shadow"
    unknown = run_cli(config, "models", "promote", "nobody")
    assert unknown.returncode == 2 and "no configured model is called 'nobody'" in unknown.stderr


def test_the_config_lists_every_model_with_its_mode(site: Any) -> None:
    config, _ = site
    settings = load_settings(config, {})
    assert [(s.name, s.catalogue, s.mode) for s in settings.model_specs] == [
        ("live-model", MODEL_NAME, "live"),
        ("challenger", MODEL_NAME, "shadow"),
    ]
    assert isinstance(settings.model_specs[0], ModelSpec)
