"""Load, override and validate the node's settings; the only place configuration is read.

One TOML file (``--config PATH``, else ``$DICOM_NODE_CONFIG``, else ``config/dicom-node.toml``),
then environment overrides ``DICOM_NODE__<SECTION>__<KEY>`` (for the peers list,
``DICOM_NODE__PEERS__<INDEX>__<KEY>``).  Everything is validated at load and every problem is
reported in one :class:`~dicom_node.errors.ConfigError`, one line per problem naming the key,
the value and what is allowed.  This module must not open sockets, files other than the TOML
file, or the database.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.config.models import (
    DriftSettings,
    ModelSpec,
    ValidationSettings,
    build_models,
    check_drift,
    check_validation,
    single_spec,
)
from dicom_node.config.operations import (
    AuditSettings,
    MetricsSettings,
    RetentionSettings,
    TlsSettings,
)
from dicom_node.config.peers import PeerSettings, build_peers
from dicom_node.config.rules import check_value, closest
from dicom_node.errors import ConfigError
from dicom_node.inference.card import model_labels
from dicom_node.results import label_problems

DEFAULT_CONFIG_PATH = Path("config/dicom-node.toml")
ENV_CONFIG = "DICOM_NODE_CONFIG"
ENV_PREFIX = "DICOM_NODE__"
ROLES = ("scp", "worker", "web")  # what one `serve` process can run


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "DICOM_NODE"
    host: str = "0.0.0.0"
    port: int = 11112
    org_uid_root: str = "1.2.826.0.1.3680043.10.1234"


@dataclass(frozen=True)
class StorageSettings:
    root: str = "/var/lib/dicom-node"
    min_free_mb: int = 2048


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = ""  # empty: a SQLite file under the storage root
    busy_timeout_ms: int = 30000


@dataclass(frozen=True)
class ScpSettings:
    max_associations: int = 10
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    max_pdu_size: int = 0  # 0: no limit (PS3.8 D.1: a maximum length of 0 means unlimited)
    other_sop_classes: str = "discard"
    max_backlog: int = 0  # analysis jobs waiting above which associations are refused; 0: never
    max_pending_connections: int = 32  # connections still negotiating (not yet associated)
    max_inflated_mb: int = 512  # a Deflated data set may inflate to at most this (PS3.5 A.5)


@dataclass(frozen=True)
class SchedulerSettings:
    study_quiet_seconds: float = 30.0
    tick_seconds: float = 1.0
    lease_seconds: float = 300.0
    max_attempts: int = 3
    storage_full_retry_seconds: float = 60.0  # a job waiting for disk space tries again after


@dataclass(frozen=True)
class ModelSettings:
    name: str = "densenet121-res224-all"
    weights: str = ""  # a weights file to use instead of the installed one
    models_dir: str = ""  # empty: <storage.root>/models
    device: str = "auto"
    batch_size: int = 8
    threads: int = 0  # CPU threads of the runtime (torch or onnxruntime); 0: its default
    runtime: str = "auto"  # auto: onnxruntime for ONNX models, torch otherwise
    allow_torchscript: bool = False  # TorchScript archives hold code: off unless a site opts in
    fp16: bool = False  # half precision on CUDA only
    allow_unverified: bool = False
    allow_untrained: bool = False  # demo only: an untrained network, labelled everywhere
    mode: str = "live"  # live or shadow (the one model; [models.NAME] tables set it per model)


@dataclass(frozen=True)
class AnalysisSettings:
    analyse_missing_view: bool = True  # analyse frontal-modality images with no ViewPosition
    min_patient_age: int = 18  # years; younger patients are not analysed
    max_megapixels: float = 50.0  # pixel budget per image, checked before decoding
    apply_voi_lut: bool = False  # apply Modality/VOI LUT before normalising
    box_threshold: float = 0.6  # fraction of a heatmap's peak that makes a box
    backoff_seconds: float = 30.0  # first retry delay of a failed job; doubles per attempt


@dataclass(frozen=True)
class OutputSettings:
    sc_mode: str = "composite"  # composite: one SC per study; per_finding: one per positive
    sc_max_size: int = 2048  # long side of an SC in pixels
    report_not_analysed: bool = True  # an SR saying why, for studies that were not analysed
    parametric_maps: bool = False  # a float Parametric Map of each positive finding's heatmap


@dataclass(frozen=True)
class DeliverySettings:
    backoff_seconds: float = 30.0  # first retry after a transient failure; doubles
    max_backoff_seconds: float = 600.0  # the doubling stops here
    give_up_after_seconds: float = 86400.0  # transient failures for this long make it dead
    batch_size: int = 100  # instances per association
    timeout_seconds: float = 60.0  # ACSE, DIMSE and network timeout of each send


@dataclass(frozen=True)
class WebSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    secure_cookies: bool = False  # true when the node is served over TLS (a proxy)
    session_idle_minutes: int = 30  # a session unused this long must log in again
    session_absolute_hours: int = 12  # and any session ends this long after log-in
    critical_findings: tuple[str, ...] = ("Pneumothorax",)  # positive ones go to the top
    refresh_seconds: int = 30  # the worklist reloads itself; 0: never
    login_free_failures: int = 5  # wrong passwords per account or address before backoff
    login_backoff_seconds: float = 2.0  # first wait after those; doubles per further failure
    login_max_backoff_seconds: float = 900.0  # the doubling stops here
    login_concurrency: int = 2  # password hashes computed at once (argon2 is CPU-heavy)
    max_request_kb: int = 256  # largest request body any route reads
    max_stow_mb: int = 2048  # largest STOW-RS request body (POST /dicomweb/studies)
    viewer_url: str = ""  # a viewer link per study; {study_instance_uid} is replaced


@dataclass(frozen=True)
class LoggingSettings:
    level: str = "INFO"
    format: str = "json"


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    peers: tuple[PeerSettings, ...] = ()
    scp: ScpSettings = field(default_factory=ScpSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    analysis: AnalysisSettings = field(default_factory=AnalysisSettings)
    thresholds: tuple[tuple[str, float], ...] = ()  # per-site operating points per finding
    outputs: OutputSettings = field(default_factory=OutputSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    web: WebSettings = field(default_factory=WebSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    tls: TlsSettings = field(default_factory=TlsSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    models: tuple[ModelSpec, ...] = ()  # [models.NAME]; empty: the one model of [model]
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)

    @property
    def model_specs(self) -> tuple[ModelSpec, ...]:
        """Every configured model, in file order (``[models.NAME]``, or ``[model]``)."""
        if self.models:
            return self.models
        m = self.model
        return (single_spec(m.name, m.weights, m.mode, m.allow_unverified, m.allow_untrained),)

    def for_model(self, spec: ModelSpec) -> Settings:
        """These settings with ``[model]`` naming ``spec`` (what loads one model)."""
        model = dataclasses.replace(
            self.model,
            name=spec.catalogue,
            weights=spec.weights,
            allow_unverified=spec.allow_unverified,
            allow_untrained=spec.allow_untrained,
            mode=spec.mode,
        )
        return dataclasses.replace(self, model=model)

    @property
    def models_dir(self) -> Path:
        """Where installed model files and their registry live."""
        return Path(self.model.models_dir or Path(self.storage.root) / "models")

    @property
    def database_url(self) -> str:
        """The configured URL, or the embedded SQLite file under the storage root."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{Path(self.storage.root).resolve() / 'dicom-node.db'}"


_SECTIONS: dict[str, type] = {
    "node": NodeSettings,
    "storage": StorageSettings,
    "database": DatabaseSettings,
    "scp": ScpSettings,
    "scheduler": SchedulerSettings,
    "model": ModelSettings,
    "analysis": AnalysisSettings,
    "outputs": OutputSettings,
    "delivery": DeliverySettings,
    "web": WebSettings,
    "logging": LoggingSettings,
    "tls": TlsSettings,
    "audit": AuditSettings,
    "metrics": MetricsSettings,
    "retention": RetentionSettings,
    "validation": ValidationSettings,
    "drift": DriftSettings,
}


def resolve_config_path(cli_path: str | None, environ: Mapping[str, str]) -> Path:
    """Pick the config file: ``--config``, else ``$DICOM_NODE_CONFIG``, else the default."""
    if cli_path:
        return Path(cli_path)
    if environ.get(ENV_CONFIG):
        return Path(environ[ENV_CONFIG])
    return DEFAULT_CONFIG_PATH


def load_settings(
    path: Path | None, environ: Mapping[str, str], *, check_models: bool = True
) -> Settings:
    """Read the TOML file at ``path`` (None: defaults only), apply overrides, validate.

    ``check_models`` False: configured model names and the findings of ``[thresholds]`` and
    ``web.critical_findings`` are not checked against the installed models (the ``models``
    commands, which install them, run before the configured model exists).

    Raises
    ------
    ConfigError
        With one line per problem; nothing is half-applied.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([f"config file {path} not found"]) from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError([f"config file {path} cannot be read: {exc}"]) from None
    problems: list[str] = []
    _apply_environment(raw, environ, problems)
    settings = _build(raw, problems, check_models)
    if problems:
        raise ConfigError(problems)
    return settings


def _apply_environment(
    raw: dict[str, Any], environ: Mapping[str, str], problems: list[str]
) -> None:
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__")]
        if len(parts) == 3 and parts[0] == "peers" and parts[1].isdigit():
            peers = raw.setdefault("peers", [])
            index = int(parts[1])
            if (
                not isinstance(peers, list)
                or index >= len(peers)
                or not isinstance(peers[index], dict)
            ):
                problems.append(f"{name}: there is no peer number {index} in the config file")
                continue
            peers[index][parts[2]] = _env_value(text, _peer_default(parts[2]))
        elif len(parts) == 2 and parts[0] in _SECTIONS:
            section = raw.setdefault(parts[0], {})
            if not isinstance(section, dict):
                continue  # reported as "[section] must be a table" by _build
            default = getattr(_SECTIONS[parts[0]](), parts[1], "")
            section[parts[1]] = _env_value(text, default)
        else:
            problems.append(f"{name}: unknown setting (expected DICOM_NODE__<SECTION>__<KEY>)")


def _peer_default(key: str) -> Any:
    """The default of a [[peers]] key (for typing an environment override)."""
    defaults = {f.name: f.default for f in dataclasses.fields(PeerSettings)}
    return defaults.get(key, "")


def _env_value(text: str, default: Any) -> Any:
    """Convert an environment string to the type of the setting's default."""
    if isinstance(default, bool):
        lowered = text.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        return text
    if isinstance(default, tuple):  # a list: comma-separated
        return [part.strip() for part in text.split(",") if part.strip()]
    for kind in (int, float):
        if isinstance(default, kind):
            try:
                return kind(text)
            except ValueError:
                return text
    return text


def _build(raw: dict[str, Any], problems: list[str], check_models: bool = True) -> Settings:
    for key in raw:
        if key not in _SECTIONS and key not in ("peers", "thresholds", "models"):
            allowed = ", ".join([*_SECTIONS, "peers", "thresholds", "models"])
            problems.append(f"[{key}]: unknown section (allowed: {allowed})")
    values: dict[str, Any] = {}
    for section, cls in _SECTIONS.items():
        values[section] = _build_section(section, cls, raw.get(section, {}), problems)
    values["peers"] = build_peers(raw.get("peers", []), problems)
    values["thresholds"] = _build_thresholds(raw.get("thresholds", {}), problems)
    values["models"] = build_models(raw, problems)
    settings = Settings(**values)
    if settings.model.mode not in ("live", "shadow"):
        problems.append(f"model.mode = {settings.model.mode!r}: must be live or shadow")
    check_validation(settings.validation, problems)
    check_drift(settings.drift, problems)
    if check_models and not any(
        p.startswith(("model.name", "models.", "thresholds.", "web.critical_findings"))
        for p in problems
    ):
        labels_of = {
            spec.catalogue: model_labels(spec.catalogue, settings.models_dir)
            for spec in settings.model_specs
        }
        problems.extend(
            label_problems(labels_of, settings.thresholds, settings.web.critical_findings)
        )
    return settings


def _build_thresholds(table: Any, problems: list[str]) -> tuple[tuple[str, float], ...]:
    """``[thresholds]``: finding label = operating point in (0, 1), overriding the model's."""
    if not isinstance(table, dict):
        problems.append("[thresholds] must be a table of finding = number")
        return ()
    result = []
    for label, value in sorted(table.items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
            problems.append(f"thresholds.{label} = {value!r}: must be a number between 0 and 1")
        else:
            result.append((label, float(value)))
    return tuple(result)


def _build_section(section: str, cls: type, table: Any, problems: list[str]) -> Any:
    if not isinstance(table, dict):
        problems.append(f"[{section}] must be a table")
        return cls()
    defaults = cls()
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in known:
            problems.append(
                f"{section}.{key}: unknown key{closest(key, sorted(known))} "
                f"(allowed: {', '.join(sorted(known))})"
            )
            continue
        if check_value(f"{section}.{key}", value, getattr(defaults, key), problems):
            kwargs[key] = _coerce(value, getattr(defaults, key))
    return cls(**kwargs)


def _coerce(value: Any, default: Any) -> Any:
    """A validated TOML value in the type of the setting (float, or tuple for lists)."""
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple):
        return tuple(value)
    return value
