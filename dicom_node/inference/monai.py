"""A MONAI bundle folder as a model card: labels and input spec from ``configs/metadata.json``.

A bundle (MONAI Bundle specification) describes its network in ``network_data_format``: the
input's channels, spatial shape and value range, the output's ``channel_def`` (the label of
each output, in order).  What a bundle does not say (architecture for a state dict, operating
thresholds) comes from an optional partial card given with ``--card``; thresholds the bundle
and card leave open are 0.5, and the card's source line says so.  Only 2D classifiers are
accepted.  Weights: ``models/model.safetensors`` (into a catalogue architecture) or
``models/model.ts`` (TorchScript, behind ``allow_torchscript``); never ``models/model.pt``,
a pickle.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from dicom_node.errors import ModelError
from dicom_node.inference.toml_writer import render_card

METADATA = Path("configs") / "metadata.json"
WEIGHTS = (("models/model.safetensors", "safetensors"), ("models/model.ts", "torchscript"))
DEFAULT_THRESHOLD = 0.5


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / METADATA).is_file()


def bundle_card(folder: Path, supplement: str | None) -> tuple[str, Path]:
    """The card text for the bundle in ``folder`` and its weights file."""
    try:
        metadata = json.loads((folder / METADATA).read_text(encoding="utf-8"))
        extra = tomllib.loads(supplement) if supplement else {}
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder.name}: {METADATA} or the card cannot be read ({exc})") from None
    image, scores = _io(metadata, folder.name)
    labels = _labels(scores, folder.name)
    _check_supplement(extra, labels, folder.name)
    weights, weights_format = _weights(folder)
    size = _size(image, folder.name)
    low, high = (list(image.get("value_range") or [0, 1]) + [0, 1])[:2]
    recipe: dict[str, Any] = (
        {"recipe": "xrv"}
        if (low, high) == (-1024, 1024)
        else {"recipe": "mean-std", "mean": [0.0] * size[1], "std": [1.0] * size[1]}
    )
    given = extra.get("thresholds", {})
    defaulted = [label for label in labels if label and label not in given]
    source = str(extra.get("source") or _source(metadata))
    if defaulted:
        source += f"; thresholds {DEFAULT_THRESHOLD} for {len(defaulted)} finding(s) (none given)"
    values: dict[str, Any] = {
        "format": extra.get("format", weights_format),
        "labels": labels,
        "version": str(extra.get("version") or metadata.get("version") or "bundle"),
        "intended_use": str(
            extra.get("intended_use")
            or metadata.get("intended_use")
            or metadata.get("task")
            or "chest X-ray classification (MONAI bundle)"
        ),
        "source": source,
        "input": {"size": size[0], "channels": size[1]},
        "preprocessing": extra.get("preprocessing", recipe),
        "output": {"activation": "none" if scores.get("type") == "probabilities" else "sigmoid"}
        | extra.get("output", {}),
        "thresholds": {label: given.get(label, DEFAULT_THRESHOLD) for label in labels if label},
    }
    for key in ("architecture", "heatmap", "weights_sha256"):
        if key in extra:
            values[key] = extra[key]
    return render_card(_ordered(values)), weights


SUPPLEMENT_KEYS = {
    "format", "architecture", "version", "intended_use", "source", "weights_sha256",
    "preprocessing", "output", "heatmap", "thresholds",
}  # fmt: skip


def _check_supplement(extra: dict[str, Any], labels: list[str], name: str) -> None:
    """A partial card may add what a bundle does not say, never labels or input."""
    unknown = sorted(set(extra) - SUPPLEMENT_KEYS)
    if unknown:
        raise ModelError(
            f"{name}: the partial card's key {unknown[0]!r} is not one it may set "
            f"(allowed: {', '.join(sorted(SUPPLEMENT_KEYS))}; labels and input come from "
            "the bundle)"
        )
    thresholds = extra.get("thresholds", {})
    strange = sorted(set(thresholds) - set(labels)) if isinstance(thresholds, dict) else []
    if strange:
        raise ModelError(f"{name}: the partial card's thresholds.{strange[0]} is not a label")


def _ordered(values: dict[str, Any]) -> dict[str, Any]:
    """Top-level keys before tables, as TOML needs."""
    plain = {k: v for k, v in values.items() if not isinstance(v, dict)}
    return plain | {k: v for k, v in values.items() if isinstance(v, dict)}


def _io(metadata: dict[str, Any], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    formats = metadata.get("network_data_format", {})
    inputs, outputs = formats.get("inputs", {}), formats.get("outputs", {})
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{name}: network_data_format must have one input and one output")
    image, scores = next(iter(inputs.values())), next(iter(outputs.values()))
    if scores.get("format") != "classification":
        raise ModelError(
            f"{name}: the output format is {scores.get('format')!r}, not 'classification'"
        )
    return image, scores


def _labels(scores: dict[str, Any], name: str) -> list[str]:
    channel_def = scores.get("channel_def") or {}
    count = int(scores.get("num_channels") or len(channel_def))
    if not channel_def or sorted(channel_def, key=int) != [str(i) for i in range(count)]:
        raise ModelError(f"{name}: the output's channel_def must name outputs 0..{count - 1}")
    return [str(channel_def[str(i)]) for i in range(count)]


def _size(image: dict[str, Any], name: str) -> tuple[int, int]:
    shape = image.get("spatial_shape") or []
    if len(shape) != 2:
        raise ModelError(f"{name}: spatial_shape {shape} is not 2D; only 2D classifiers")
    if shape[0] != shape[1] or not all(isinstance(s, int) for s in shape):
        raise ModelError(f"{name}: spatial_shape {shape} must be a square, fixed size")
    return int(shape[0]), int(image.get("num_channels", 1))


def _weights(folder: Path) -> tuple[Path, str]:
    for relative, weights_format in WEIGHTS:
        if (folder / relative).is_file():
            return folder / relative, weights_format
    raise ModelError(
        f"{folder.name}: no models/model.safetensors or models/model.ts (models/model.pt is "
        "a pickle and is not loaded)"
    )


def _source(metadata: dict[str, Any]) -> str:
    parts = [
        f"MONAI bundle {metadata.get('name', '')}".strip(),
        str(metadata.get("authors", "")),
        str(metadata.get("copyright", "")),
        f"licence {metadata.get('license')}" if metadata.get("license") else "",
    ]
    return "; ".join(part for part in parts if part)
