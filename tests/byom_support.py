"""Site models for the bring-your-own-model tests: one seeded DenseNet-121 of the catalogue,
as a safetensors state dict, a TorchScript archive and an ONNX export, each with its card."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torchxrayvision as xrv

from dicom_node.config.settings import ModelSettings, Settings, StorageSettings
from dicom_node.inference.card import thresholds_table
from dicom_node.inference.catalogue import CATALOGUE
from dicom_node.inference.toml_writer import render_card

ENTRY = CATALOGUE["densenet121-res224-all"]
TORCHSCRIPT_HEATMAP = {"features": "features", "classifier": "classifier", "relu": True}


def seeded_densenet(seed: int = 1) -> torch.nn.Module:
    """The catalogue's DenseNet-121 with random weights and a head scaled so that the
    probabilities spread over (0, 1) instead of saturating (logits of order one)."""
    torch.manual_seed(seed)
    network = xrv.models.DenseNet(num_classes=len(ENTRY.labels)).eval()
    with torch.no_grad():
        network.classifier.weight.copy_(torch.randn_like(network.classifier.weight) * 3e-4)
        network.classifier.bias.zero_()
    return network


def card_text(card_format: str, **changes: Any) -> str:
    """A valid card for the seeded network in ``card_format``; ``changes`` replace keys
    (None removes one)."""
    values: dict[str, Any] = {
        "format": card_format,
        "labels": list(ENTRY.labels),
        "version": "site-1",
        "intended_use": "Adult frontal chest X-ray triage (test model)",
        "source": "dicom-node tests; random weights; licence CC0",
        "input": {"size": 224, "channels": 1},
        "preprocessing": {"recipe": "xrv"},
        "thresholds": thresholds_table(ENTRY.labels, ENTRY.op_thresholds),
    }
    if card_format in ("safetensors", "xrv-release"):
        values["architecture"] = "densenet121"
    if card_format == "torchscript":
        values["heatmap"] = dict(TORCHSCRIPT_HEATMAP)
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    plain = {k: v for k, v in values.items() if not isinstance(v, dict)}
    return render_card(plain | {k: v for k, v in values.items() if isinstance(v, dict)})


def write_card(path: Path, card_format: str, **changes: Any) -> Path:
    path.write_text(card_text(card_format, **changes), encoding="utf-8")
    return path


def model_settings(root: Path, models_dir: Path, name: str, **model: Any) -> Settings:
    return Settings(
        storage=StorageSettings(root=str(root)),
        model=ModelSettings(models_dir=str(models_dir), name=name, device="cpu", **model),
    )


def with_model(settings: Settings, **model: Any) -> Settings:
    return dataclasses.replace(settings, model=dataclasses.replace(settings.model, **model))
