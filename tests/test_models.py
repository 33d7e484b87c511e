"""The untrained demo model: labelled, deterministic, and its scores spread instead of
saturating at 0 / 1 identically for every image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dicom_node.config.settings import ModelSettings, Settings, StorageSettings
from dicom_node.inference.classify import classify_batch
from dicom_node.inference.models import ModelBundle, load_bundle
from dicom_node.inference.preprocess import prepare
from dicom_node.results import UNTRAINED_LABEL

IMAGES = (
    "SIIM_1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "CR-MONO1-10-chest_noFileMeta.dcm",
)


def _untrained_scores(shared_data: Path, tmp_path: Path) -> tuple[np.ndarray, ModelBundle]:
    settings = Settings(
        storage=StorageSettings(root=str(tmp_path)),
        model=ModelSettings(
            models_dir=str(tmp_path / "models"), allow_untrained=True, device="cpu"
        ),
    )
    bundle = load_bundle(settings)  # no weights installed: the demo's untrained network
    inputs = np.stack(
        [
            prepare(shared_data / "dicom" / "cxr" / name, resolution=bundle.card.resolution).pixels
            for name in IMAGES
        ]
    )
    scores = classify_batch(bundle, inputs)
    return np.stack([s.probabilities for s in scores]), bundle


def test_untrained_demo_model_scores_spread_differ_between_images_and_stay_labelled(
    shared_data: Path, tmp_path: Path
) -> None:
    probabilities, bundle = _untrained_scores(shared_data, tmp_path)
    assert bundle.warning_label == UNTRAINED_LABEL
    # The released weights' operating points mean nothing for random weights: decide at 0.5.
    assert set(bundle.thresholds) == {0.5} and "untrained demo" in bundle.thresholds_source
    assert probabilities.shape == (2, 18)
    assert np.all((probabilities > 0.001) & (probabilities < 0.999)), probabilities
    assert probabilities.std() > 0.05  # spread over the labels, not one value
    assert np.abs(probabilities[0] - probabilities[1]).max() > 1e-3  # the image matters
    again, _ = _untrained_scores(shared_data, tmp_path / "again")
    np.testing.assert_allclose(again, probabilities, rtol=0, atol=1e-5)  # seeded
