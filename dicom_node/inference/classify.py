"""Classify a batch of prepared images and compute their class activation maps in one pass.

Pure computation under ``torch.inference_mode``: no I/O.  The CAM of label k is
``sum_c W[k, c] * F[c]`` over the final feature map F (before global average pooling), so the
logit is its spatial mean plus the bias: the heatmap comes from the very forward pass that
produced the probability, with no backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from dicom_node.errors import InferenceError
from dicom_node.inference.models import ModelBundle


@dataclass(frozen=True)
class ImageScores:
    """Per label: probability (sigmoid of the logit) and the CAM on the feature grid."""

    probabilities: np.ndarray  # (K,)
    cams: np.ndarray  # (K, h, w), float32


def classify_batch(bundle: ModelBundle, inputs: np.ndarray) -> list[ImageScores]:
    """``inputs``: (N, 1, R, R) float32 in [-1024, 1024] at the model's resolution."""
    try:
        with torch.inference_mode():
            batch = torch.from_numpy(inputs).to(bundle.device)
            if bundle.fp16:
                batch = batch.half()
            features = bundle.network.feature_map(batch)
            logits = bundle.network.head(features.mean(dim=(2, 3)))
            probabilities = torch.sigmoid(logits.float()).cpu().numpy()
            weight = bundle.network.head.weight.to(features.dtype)
            cams = torch.einsum("kc,nchw->nkhw", weight, features).float().cpu().numpy()
    except RuntimeError as exc:  # out of memory, device errors
        raise InferenceError(f"model forward failed: {exc}") from exc
    return [ImageScores(probabilities[i], cams[i]) for i in range(len(inputs))]
