"""Classify a batch of prepared images and compute their class activation maps in one pass.

Pure computation: no I/O.  The model card's preprocessing recipe turns the prepared
[-1024, 1024] images into the model's input, and the bundle's runtime (torch or onnxruntime)
gives the probabilities and, where the model has a CAM path, the CAMs of the same forward pass
(``sum_c W[k, c] * F[c]`` over the final feature map F: no backward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dicom_node.inference.models import ModelBundle
from dicom_node.inference.preprocess import model_input


@dataclass(frozen=True)
class ImageScores:
    """Per label: probability and the CAM on the feature grid (None: the model gives none)."""

    probabilities: np.ndarray  # (K,)
    cams: np.ndarray | None  # (K, h, w), float32


def classify_batch(bundle: ModelBundle, inputs: np.ndarray) -> list[ImageScores]:
    """``inputs``: (N, 1, R, R) float32 in [-1024, 1024] at the model's resolution."""
    probabilities, cams = bundle.runtime.run(model_input(bundle.card, inputs))
    return [
        ImageScores(probabilities[i], None if cams is None else cams[i]) for i in range(len(inputs))
    ]
