"""Model cards: what a model is, read from the ``model.toml`` installed beside it.

A card says what the file is (format, architecture where the format needs one), what it
reports (labels in output order, operating thresholds), what it takes (input size, channels,
the preprocessing recipe), where the heatmap comes from, and who made it (intended use,
source and licence).  Plain data and TOML, no torch: ``config``, the web pages and ``dicom-node
models list`` read cards without loading a framework.  The card's SHA-256 is part of the
model's identity in every result and SR (PS3.16 TID 4019 Algorithm Identification).

The catalogue's TorchXRayVision models get a card too (:func:`catalogue_card`), rendered from
the catalogue, so every model has one description and one card hash.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.errors import ModelError
from dicom_node.inference.catalogue import CATALOGUE, CatalogueEntry
from dicom_node.inference.toml_writer import render_card

CARD_FILE = "model.toml"
FORMATS = ("onnx", "safetensors", "torchscript", "xrv-release")
ARCHITECTURES = ("densenet121", "resnet50")  # the catalogue's (inference.networks builds them)
RECIPES = ("xrv", "mean-std")
ACTIVATIONS = ("sigmoid", "none")  # sigmoid: the output is logits; none: probabilities
_TOP_KEYS = {
    "format",
    "architecture",
    "labels",
    "version",
    "intended_use",
    "source",
    "weights_sha256",
    "input",
    "preprocessing",
    "output",
    "heatmap",
    "thresholds",
}
_TABLE_KEYS = {
    "input": {"size", "channels", "name"},
    "preprocessing": {"recipe", "mean", "std"},
    "output": {"name", "activation"},
    "heatmap": {"features", "weight", "bias", "classifier", "relu"},
}
_REQUIRED = ("format", "labels", "intended_use", "source", "input", "preprocessing", "thresholds")


@dataclass(frozen=True)
class Preprocessing:
    """How the [-1024, 1024] centre-cropped, resized image becomes the model's input.

    ``xrv``: as TorchXRayVision trains, the [-1024, 1024] image itself.  ``mean-std``: the
    image scaled to [0, 1], then ``(x - mean[c]) / std[c]`` per channel (ImageNet-style).
    """

    recipe: str = "xrv"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


@dataclass(frozen=True)
class HeatmapSpec:
    """Where the class activation map comes from.

    ONNX: ``features`` names the graph output with the last feature maps (N, C, h, w) and
    ``weight`` / ``bias`` the classifier's initializers.  TorchScript: ``features`` and
    ``classifier`` are submodule paths (``relu``: apply a ReLU to the features, as DenseNet's
    forward does).  Empty: the format's architecture decides, or the model gives no heatmap.
    """

    features: str = ""
    weight: str = ""
    bias: str = ""
    classifier: str = ""
    relu: bool = False

    @property
    def given(self) -> bool:
        return bool(self.features)


@dataclass(frozen=True)
class ModelCard:
    """One model as the node runs it; the catalogue's and a site's models alike."""

    name: str
    format: str
    labels: tuple[str, ...]  # output order; "" for an output the model does not report
    resolution: int
    channels: int
    preprocessing: Preprocessing
    op_thresholds: tuple[float | None, ...]  # per output; None: no operating point
    intended_use: str
    source: str
    version: str
    architecture: str = ""
    input_name: str = ""
    output_name: str = ""
    activation: str = "sigmoid"
    heatmap: HeatmapSpec = field(default_factory=HeatmapSpec)
    weights_sha256: str = ""  # a published SHA-256 the file must match ("": none)
    card_sha256: str = ""

    @property
    def reported(self) -> tuple[str, ...]:
        return tuple(label for label in self.labels if label)


def card_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_card(text: str, name: str, where: str = CARD_FILE) -> ModelCard:
    """Read and check a card; ``ModelError`` with one line naming the first wrong key."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ModelError(f"{where}: not valid TOML ({exc})") from None
    for key in _REQUIRED:
        if key not in raw:
            raise ModelError(f"{where}: missing key {key!r}")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ModelError(f"{where}: unknown key {unknown[0]!r}")
    for table, allowed in _TABLE_KEYS.items():
        value = raw.get(table, {})
        if not isinstance(value, dict):
            raise ModelError(f"{where}: {table!r} must be a table")
        extra = sorted(set(value) - allowed)
        if extra:
            raise ModelError(f"{where}: unknown key '{table}.{extra[0]}'")
    card_format = _choice(raw, "format", FORMATS, where)
    labels = _labels(raw.get("labels"), where)
    size, channels = _input(raw["input"], where)
    preprocessing = _preprocessing(raw["preprocessing"], channels, where)
    architecture = raw.get("architecture", "")
    if architecture and architecture not in ARCHITECTURES:
        raise ModelError(
            f"{where}: architecture = {architecture!r} is not one of {', '.join(ARCHITECTURES)}"
        )
    if card_format in ("safetensors", "xrv-release") and not architecture:
        raise ModelError(f"{where}: missing key 'architecture' ({card_format} needs one)")
    output = raw.get("output", {})
    activation = _choice(output, "activation", ACTIVATIONS, where, "output.", "sigmoid")
    return ModelCard(
        name=name,
        format=card_format,
        labels=labels,
        resolution=size,
        channels=channels,
        preprocessing=preprocessing,
        op_thresholds=_thresholds(raw["thresholds"], labels, where),
        intended_use=_text(raw, "intended_use", where),
        source=_text(raw, "source", where),
        version=str(raw.get("version", "")) or "site",
        architecture=architecture,
        input_name=str(raw["input"].get("name", "")),
        output_name=str(output.get("name", "")),
        activation=activation,
        heatmap=_heatmap(raw.get("heatmap", {}), where),
        weights_sha256=_sha(raw.get("weights_sha256", ""), where),
        card_sha256=card_sha256(text),
    )


def read_card(path: Path, name: str) -> ModelCard:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path}: cannot be read ({type(exc).__name__})") from None
    return parse_card(text, name, str(path.name))


def _choice(
    table: dict[str, Any],
    key: str,
    allowed: tuple[str, ...],
    where: str,
    prefix: str = "",
    default: str | None = None,
) -> str:
    value = table.get(key, default)
    if value not in allowed:
        raise ModelError(f"{where}: {prefix}{key} = {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _text(raw: dict[str, Any], key: str, where: str) -> str:
    value = raw[key]
    if not isinstance(value, str) or not value.strip():
        raise ModelError(f"{where}: {key} must be a non-empty string")
    return value.strip()


def _labels(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ModelError(f"{where}: labels must be a list of strings, one per model output")
    reported = [v for v in value if v]
    if not reported:
        raise ModelError(f"{where}: labels names no finding")
    duplicated = sorted({v for v in reported if reported.count(v) > 1})
    if duplicated:
        raise ModelError(f"{where}: labels lists {duplicated[0]!r} twice")
    return tuple(value)


def _input(table: dict[str, Any], where: str) -> tuple[int, int]:
    size, channels = table.get("size"), table.get("channels", 1)
    if not isinstance(size, int) or isinstance(size, bool) or not 32 <= size <= 2048:
        raise ModelError(f"{where}: input.size = {size!r} must be an integer from 32 to 2048")
    if isinstance(channels, bool) or channels not in (1, 3):
        raise ModelError(f"{where}: input.channels = {channels!r} must be 1 or 3")
    return size, int(channels)


def _preprocessing(table: dict[str, Any], channels: int, where: str) -> Preprocessing:
    recipe = _choice(table, "recipe", RECIPES, where, "preprocessing.")
    if recipe == "xrv":
        if "mean" in table or "std" in table:
            raise ModelError(f"{where}: preprocessing.mean/std apply to recipe 'mean-std' only")
        return Preprocessing("xrv")
    values = {}
    for key in ("mean", "std"):
        numbers = table.get(key)
        if (
            not isinstance(numbers, list)
            or len(numbers) != channels
            or not all(isinstance(n, int | float) and not isinstance(n, bool) for n in numbers)
        ):
            raise ModelError(
                f"{where}: preprocessing.{key} must list {channels} number(s), one per channel"
            )
        values[key] = tuple(float(n) for n in numbers)
    if any(s <= 0 for s in values["std"]):
        raise ModelError(f"{where}: preprocessing.std must be positive")
    return Preprocessing("mean-std", values["mean"], values["std"])


def _thresholds(table: Any, labels: tuple[str, ...], where: str) -> tuple[float | None, ...]:
    if not isinstance(table, dict):
        raise ModelError(f"{where}: thresholds must be a table of finding = number")
    unknown = sorted(set(table) - set(labels) - {""})
    if unknown:
        raise ModelError(f"{where}: thresholds.{unknown[0]} is not one of the labels")
    result: list[float | None] = []
    for label in labels:
        if not label:
            result.append(None)
            continue
        value = table.get(label)
        if value is None:
            raise ModelError(f"{where}: missing key 'thresholds.{label}'")
        if value == "none":  # reported, never decided: the model has no operating point
            result.append(None)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
            raise ModelError(
                f'{where}: thresholds.{label} = {value!r} must be between 0 and 1, or "none"'
            )
        result.append(float(value))
    return tuple(result)


def _heatmap(table: dict[str, Any], where: str) -> HeatmapSpec:
    texts = {}
    for key in ("features", "weight", "bias", "classifier"):
        value = table.get(key, "")
        if not isinstance(value, str):
            raise ModelError(f"{where}: heatmap.{key} must be a string")
        texts[key] = value
    relu = table.get("relu", False)
    if not isinstance(relu, bool):
        raise ModelError(f"{where}: heatmap.relu must be true or false")
    spec = HeatmapSpec(**texts, relu=relu)
    if spec.features and not (spec.weight or spec.classifier):
        raise ModelError(f"{where}: heatmap.features needs heatmap.weight or heatmap.classifier")
    return spec


def _sha(value: Any, where: str) -> str:
    text = str(value).lower()
    if text and (len(text) != 64 or any(c not in "0123456789abcdef" for c in text)):
        raise ModelError(f"{where}: weights_sha256 must be 64 hexadecimal digits")
    return text


def check_against_format(card: ModelCard) -> None:
    """What a card must say for its format, beyond the keys themselves."""
    if card.format in ("safetensors", "xrv-release") and card.heatmap != HeatmapSpec():
        raise ModelError(
            f"{card.name}: [heatmap] is for onnx and torchscript models; a {card.format} "
            f"model's CAM comes from its architecture ({card.architecture})"
        )
    if card.format == "onnx" and card.heatmap.features and not card.heatmap.weight:
        raise ModelError(f"{card.name}: heatmap.weight names the ONNX classifier initializer")
    if card.format == "torchscript" and card.heatmap.features and not card.heatmap.classifier:
        raise ModelError(f"{card.name}: heatmap.classifier names the TorchScript classifier")


def thresholds_table(
    labels: tuple[str, ...], thresholds: tuple[float | None, ...]
) -> dict[str, float | str]:
    """A card's ``[thresholds]``: "none" for a finding without an operating point."""
    return {
        label: "none" if threshold is None else threshold
        for label, threshold in zip(labels, thresholds, strict=True)
        if label
    }


def catalogue_card_text(entry: CatalogueEntry) -> str:
    """The catalogue entry as a card (its hash identifies the catalogue model's card)."""
    return render_card(
        {
            "format": "xrv-release",
            "architecture": entry.architecture,
            "labels": list(entry.labels),
            "version": entry.version,
            "intended_use": "Chest X-ray finding classification (TorchXRayVision release)",
            "source": f"{entry.url}; licence Apache-2.0 (torchxrayvision)",
            "input": {"size": entry.resolution, "channels": 1},
            "preprocessing": {"recipe": "xrv"},
            "thresholds": thresholds_table(entry.labels, entry.op_thresholds),
        }
    )


def catalogue_card(entry: CatalogueEntry) -> ModelCard:
    """The catalogue entry's card; outputs without an operating point keep None."""
    text = catalogue_card_text(entry)
    raw = tomllib.loads(text)
    labels = tuple(entry.labels)
    return ModelCard(
        name=entry.name,
        format="xrv-release",
        labels=labels,
        resolution=entry.resolution,
        channels=1,
        preprocessing=Preprocessing("xrv"),
        op_thresholds=entry.op_thresholds,
        intended_use=raw["intended_use"],
        source=raw["source"],
        version=entry.version,
        architecture=entry.architecture,
        card_sha256=card_sha256(text),
    )


def known_card(name: str, models_dir: Path) -> ModelCard | None:
    """The card of ``name``: the catalogue's, an installed card, or None (not known)."""
    if name in CATALOGUE:
        return catalogue_card(CATALOGUE[name])
    path = models_dir / name / CARD_FILE
    if not path.is_file():
        return None
    return read_card(path, name)


def model_card(name: str, models_dir: Path) -> ModelCard:
    """The card of a configured model name; ``ModelError`` naming what is known."""
    card = known_card(name, models_dir)
    if card is None:
        raise ModelError(
            f"unknown model {name!r}: not in the catalogue ({', '.join(CATALOGUE)}) and no "
            f"{name}/{CARD_FILE} in {models_dir} (run `dicom-node models import FILE "
            f"--card CARD.toml --name {name}`)"
        )
    return card


def model_labels(name: str, models_dir: Path) -> tuple[str, ...] | None:
    """The findings ``name`` reports, sorted; None for a name with no card (or a card that
    cannot be read, which ``dicom-node models verify`` names)."""
    try:
        card = known_card(name, models_dir)
    except ModelError:
        return None
    return tuple(sorted(card.reported)) if card else None
