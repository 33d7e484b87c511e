"""Configuration: file choice, environment overrides and one-line validation errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.config.settings import DEFAULT_CONFIG_PATH, load_settings, resolve_config_path
from dicom_node.errors import ConfigError
from dicom_node.results import MODEL_LABELS
from tests.helpers import run_cli

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_config_path_prefers_cli_then_environment_then_default() -> None:
    assert resolve_config_path("a.toml", {"DICOM_NODE_CONFIG": "b.toml"}) == Path("a.toml")
    assert resolve_config_path(None, {"DICOM_NODE_CONFIG": "b.toml"}) == Path("b.toml")
    assert resolve_config_path(None, {}) == DEFAULT_CONFIG_PATH


def test_sample_config_is_valid_and_has_every_documented_key() -> None:
    settings = load_settings(REPO / "config" / "dicom-node.toml", {})
    assert settings.node.ae_title == "DICOM_NODE"
    assert settings.peers[0].send_results is True
    assert settings.scheduler.study_quiet_seconds == 30
    assert settings.model.name == "densenet121-res224-all"
    assert settings.web.port == 8080


def test_environment_overrides_every_section_and_peers_by_index(tmp_path: Path) -> None:
    path = _write(
        tmp_path, '[node]\nport = 104\n[[peers]]\nname = "p"\nae_title = "P"\nhost = "127.0.0.1"\n'
    )
    settings = load_settings(
        path,
        {
            "DICOM_NODE__NODE__PORT": "11113",
            "DICOM_NODE__STORAGE__MIN_FREE_MB": "5",
            "DICOM_NODE__SCHEDULER__STUDY_QUIET_SECONDS": "2.5",
            "DICOM_NODE__PEERS__0__SEND_RESULTS": "true",
            "DICOM_NODE__PEERS__0__PORT": "4242",
            "DICOM_NODE__DATABASE__URL": "postgresql+psycopg://u@h/db",
            "UNRELATED": "x",
        },
    )
    assert settings.node.port == 11113
    assert settings.storage.min_free_mb == 5
    assert settings.scheduler.study_quiet_seconds == 2.5
    assert settings.peers[0].send_results is True and settings.peers[0].port == 4242
    assert settings.database_url == "postgresql+psycopg://u@h/db"


def test_default_database_is_sqlite_under_storage_root(tmp_path: Path) -> None:
    settings = load_settings(None, {"DICOM_NODE__STORAGE__ROOT": str(tmp_path)})
    assert settings.database_url == f"sqlite:///{tmp_path.resolve() / 'dicom-node.db'}"


@pytest.mark.parametrize(
    "text, line",
    [
        ("[node]\nport = 70000\n", "node.port = 70000: must be an integer 1-65535"),
        (
            '[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n',
            "node.ae_title = 'THIS_TITLE_IS_TOO_LONG': must be 1-16 printable ASCII characters",
        ),
        ('[node]\norg_uid_root = "1.2.abc"\n', "node.org_uid_root = '1.2.abc': must be a UID root"),
        (
            '[scp]\nother_sop_classes = "maybe"\n',
            "scp.other_sop_classes = 'maybe': must be 'discard' or 'reject'",
        ),
        ('[database]\nurl = "mysql://x"\n', "database.url = 'mysql://x': must be empty"),
        ('[storage]\nmin_free_mb = "lots"\n', "storage.min_free_mb = 'lots': must be an integer"),
        ("[node]\ncolour = 1\n", "node.colour: unknown key"),
        (
            '[[peers]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 0\n',
            "peers[0].port = 0: must be an integer 1-65535",
        ),
        (
            '[audit]\nsyslog = "udp://collector:70000"\n',
            "audit.syslog = 'udp://collector:70000': must be empty (off), udp://HOST:PORT",
        ),
        ('[tls]\nmin_version = "1.1"\n', "tls.min_version = '1.1': must be '1.2' or '1.3'"),
    ],
)
def test_bad_value_gives_one_line_naming_key_value_and_allowed(
    tmp_path: Path, text: str, line: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_write(tmp_path, text), {})
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith(line)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(
            _write(tmp_path, "[node]\nport = 0\n[web]\nport = -1\n"),
            {"DICOM_NODE__SCHEDULER__MAX_ATTEMPTS": "zero"},
        )
    assert len(raised.value.problems) == 3


def test_bad_environment_value_is_reported_like_a_file_value() -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {"DICOM_NODE__NODE__PORT": "eleven"})
    assert raised.value.problems == ["node.port = 'eleven': must be an integer 1-65535"]


def test_unknown_environment_setting_and_duplicate_peer_names_are_errors(tmp_path: Path) -> None:
    peers = '[[peers]]\nname = "a"\nae_title = "A"\nhost = "h"\n' * 2
    with pytest.raises(ConfigError) as raised:
        load_settings(_write(tmp_path, peers), {"DICOM_NODE__NOPE__X": "1"})
    text = "\n".join(raised.value.problems)
    assert "DICOM_NODE__NOPE__X: unknown setting" in text
    assert "peers.name = 'a': must be unique" in text


def test_missing_or_broken_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", {})
    with pytest.raises(ConfigError, match="cannot be read"):
        load_settings(_write(tmp_path, "[node\n"), {})


@pytest.mark.parametrize(
    "text, line",
    [
        (
            "[thresholds]\nPneumothorx = 0.3\n",
            "thresholds.Pneumothorx: densenet121-res224-all reports no finding of that name "
            "(did you mean 'Pneumothorax'?)",
        ),
        (
            '[web]\ncritical_findings = ["Pneumothorax", "Pneumothorx"]\n',
            "web.critical_findings: 'Pneumothorx' is not a finding densenet121-res224-all reports, "
            "so no study would ever be flagged for it (did you mean 'Pneumothorax'?)",
        ),
        (
            # the default critical finding is not in it
            '[model]\nname = "densenet121-res224-rsna"\n',
            "web.critical_findings: 'Pneumothorax' is not a finding "
            "densenet121-res224-rsna reports",
        ),
        ('[model]\nname = "densenet-xyz"\n', "model.name = 'densenet-xyz': must be one of"),
        (
            '[[peers]]\nname = "p"\nae_titel = "P"\nhost = "h"\n',
            "peers[0].ae_titel: unknown key (did you mean 'ae_title'?)",
        ),
        (
            "[scp]\nmax_asociations = 4\n",
            "scp.max_asociations: unknown key (did you mean 'max_associations'?)",
        ),
    ],
)
def test_misspelled_finding_model_or_key_is_named_with_the_closest_match(
    tmp_path: Path, text: str, line: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_write(tmp_path, text), {})
    assert any(problem.startswith(line) for problem in raised.value.problems), raised.value.problems


def test_config_check_and_doctor_refuse_a_misspelled_critical_finding(tmp_path: Path) -> None:
    path = _write(
        tmp_path, f'[storage]\nroot = "{tmp_path}"\n[web]\ncritical_findings = ["pneumothorax"]\n'
    )
    checked = run_cli(path, "config", "check")
    assert checked.returncode == 2
    assert "config error: web.critical_findings: 'pneumothorax' is not a finding" in checked.stderr
    assert "Traceback" not in checked.stderr
    doctor = run_cli(path, "doctor")
    assert doctor.returncode != 0
    assert "'pneumothorax' is not a finding" in doctor.stdout + doctor.stderr


def test_label_table_equals_the_installed_torchxrayvision_release() -> None:
    import torchxrayvision as xrv

    for name, labels in MODEL_LABELS.items():
        assert tuple(xrv.models.model_urls[name]["labels"]) == labels, name


def test_catalogue_table_equals_the_installed_torchxrayvision_release() -> None:
    """The catalogue is plain data (no torch at import); it must be what the package says."""
    import math

    import torchxrayvision as xrv

    from dicom_node.inference.catalogue import CATALOGUE, MODEL_NAMES

    assert MODEL_NAMES == tuple(MODEL_LABELS)
    for name, entry in CATALOGUE.items():
        info = xrv.models.model_urls[name]
        assert entry.url == info["weights_url"], name
        assert entry.resolution == int(info.get("input_resolution", 224)), name
        assert entry.op_thresholds == tuple(
            None if t is None or math.isnan(float(t)) else float(t) for t in info["op_threshs"]
        ), name
        assert entry.version == f"xrv-{xrv.__version__}/v1", name


def test_models_tables_name_each_model_with_its_mode_and_catalogue(tmp_path: Path) -> None:
    settings = load_settings(
        _write(
            tmp_path,
            '[models.site-cxr]\ncatalogue = "densenet121-res224-chex"\n'
            '[models.challenger]\ncatalogue = "densenet121-res224-all"\nmode = "shadow"\n',
        ),
        {},
    )
    assert [(s.name, s.catalogue, s.mode) for s in settings.model_specs] == [
        ("site-cxr", "densenet121-res224-chex", "live"),
        ("challenger", "densenet121-res224-all", "shadow"),
    ]
    assert settings.for_model(settings.model_specs[1]).model.name == "densenet121-res224-all"


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ('[models.a]\nmode = "silent"\n', "models.a.mode = 'silent': must be one of live, shadow"),
        ("[models.a]\nweight = 1\n", "models.a.weight: unknown key"),
        ('[model]\nname = "densenet121-res224-all"\n[models.a]\n', "[model] name: with [models"),
        ('[models.a]\ncatalogue = "densenet121-res999"\n', "model.name = 'densenet121-res999'"),
        ('[model]\nmode = "off"\n', "model.mode = 'off': must be live or shadow"),
        ('[drift]\nreference = "last"\n', "drift.reference = 'last'"),
        ('[validation]\nrule = "best"\n', "validation.rule = 'best'"),
    ],
)
def test_a_bad_models_validation_or_drift_setting_is_named(
    tmp_path: Path, text: str, line: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_write(tmp_path, text), {})
    assert any(problem.startswith(line) for problem in raised.value.problems), raised.value.problems
