"""A MONAI bundle folder imports as a model card: labels and input spec from
``configs/metadata.json``, weights from ``models/model.safetensors`` or ``models/model.ts``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from dicom_node.errors import ModelError
from dicom_node.inference.byom import import_model
from dicom_node.inference.card import read_card
from dicom_node.inference.classify import classify_batch
from dicom_node.inference.models import load_bundle
from tests.byom_support import ENTRY, model_settings, seeded_densenet

LABELS = [label or f"unused {i}" for i, label in enumerate(ENTRY.labels)]


def _metadata(spatial_shape: list[int] | None = None) -> dict[str, Any]:
    return {
        "name": "CXR classifier",
        "version": "0.3.1",
        "authors": "Example hospital AI group",
        "license": "Apache-2.0",
        "task": "chest X-ray finding classification",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "num_channels": 1,
                    "spatial_shape": spatial_shape or [224, 224],
                    "value_range": [0, 1],
                }
            },
            "outputs": {
                "pred": {
                    "type": "logits",
                    "format": "classification",
                    "num_channels": len(LABELS),
                    "channel_def": {str(i): label for i, label in enumerate(LABELS)},
                }
            },
        },
    }


def _bundle(folder: Path, weights: str, spatial_shape: list[int] | None = None) -> Path:
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps(_metadata(spatial_shape)))
    network = seeded_densenet()
    if weights == "ts":
        traced = torch.jit.trace(network, torch.zeros(1, 1, 224, 224))
        traced.save(str(folder / "models" / "model.ts"))
    elif weights == "safetensors":
        save_file(network.state_dict(), str(folder / "models" / "model.safetensors"))
    else:
        torch.save(network, folder / "models" / "model.pt")
    return folder


def test_torchscript_bundle_imports_with_labels_input_spec_and_stated_default_thresholds(
    tmp_path: Path,
) -> None:
    bundle = _bundle(tmp_path / "bundle", "ts")
    with pytest.raises(ModelError, match="allow_torchscript"):
        import_model(tmp_path / "models", "monai-cxr", bundle, None)
    record = import_model(tmp_path / "models", "monai-cxr", bundle, None, allow_torchscript=True)
    assert record.format == "torchscript"
    card = read_card(tmp_path / "models" / "monai-cxr" / "model.toml", "monai-cxr")
    assert list(card.labels) == LABELS and (card.resolution, card.channels) == (224, 1)
    assert card.version == "0.3.1" and card.preprocessing.recipe == "mean-std"
    assert set(card.op_thresholds) == {0.5}
    assert "thresholds 0.5 for 18 finding(s) (none given)" in card.source
    assert "licence Apache-2.0" in card.source
    settings = model_settings(tmp_path, tmp_path / "models", "monai-cxr", allow_torchscript=True)
    loaded = load_bundle(settings)
    assert not loaded.runtime.heatmaps  # the bundle names no CAM path
    pixels = np.random.default_rng(0).uniform(-1024, 1024, (2, 1, 224, 224)).astype(np.float32)
    expected = torch.sigmoid(seeded_densenet()(torch.from_numpy((pixels + 1024) / 2048)))
    scores = classify_batch(loaded, pixels)
    np.testing.assert_allclose(
        np.stack([s.probabilities for s in scores]), expected.detach().numpy(), atol=1e-4
    )


def test_safetensors_bundle_needs_the_architecture_from_a_partial_card(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path / "bundle", "safetensors")
    with pytest.raises(ModelError, match="missing key 'architecture'"):
        import_model(tmp_path / "models", "monai-st", bundle, None)
    partial = tmp_path / "partial.toml"
    partial.write_text(
        'architecture = "densenet121"\n[thresholds]\nAtelectasis = 0.2\n'
        '[heatmap]\nfeatures = "x"\nclassifier = "y"\n'
    )
    with pytest.raises(ModelError, match="heatmap"):
        import_model(tmp_path / "models", "monai-st", bundle, partial)
    for text, expected in (
        ('architecture = "densenet121"\ncolour = "blue"\n', "key 'colour' is not one it may set"),
        ('architecture = "densenet121"\n[thresholds]\nBogus = 0.2\n', "thresholds.Bogus is not"),
    ):
        partial.write_text(text)
        with pytest.raises(ModelError, match=expected):
            import_model(tmp_path / "models", "monai-st", bundle, partial)
    partial.write_text('architecture = "densenet121"\n[thresholds]\nAtelectasis = 0.2\n')
    import_model(tmp_path / "models", "monai-st", bundle, partial)
    card = read_card(tmp_path / "models" / "monai-st" / "model.toml", "monai-st")
    assert card.op_thresholds[0] == 0.2 and "for 17 finding(s)" in card.source
    assert load_bundle(model_settings(tmp_path, tmp_path / "models", "monai-st")).runtime.heatmaps


@pytest.mark.parametrize(
    ("weights", "shape", "expected"),
    [
        ("pt", None, "models/model.pt is a pickle and is not loaded"),
        ("ts", [224, 224, 64], "is not 2D; only 2D classifiers"),
    ],
)
def test_bundle_with_pickled_weights_or_3d_input_is_refused(
    tmp_path: Path, weights: str, shape: list[int] | None, expected: str
) -> None:
    bundle = _bundle(tmp_path / "bundle", weights, shape)
    with pytest.raises(ModelError, match=expected):
        import_model(tmp_path / "models", "monai-bad", bundle, None, allow_torchscript=True)
    assert not (tmp_path / "models" / "monai-bad").exists()
