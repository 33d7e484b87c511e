"""Bilinear resampling with PyTorch's ``interpolate(mode="bilinear", align_corners=False)``
semantics, in numpy, so that mapping heatmaps and resizing images cost no torch import.

Output sample ``d`` reads the input at ``s = (d + 0.5) * in / out - 0.5``, clamped at 0 (the
half-pixel convention: pixel centres of the two grids line up); it blends pixels
``i0 = floor(s)`` and ``i1 = min(i0 + 1, in - 1)`` with weights ``1 - (s - i0)`` and
``s - i0``.  No anti-aliasing filter is applied when shrinking, as in PyTorch's default.
The two axes are independent, so each is one (out x in) matrix and a resize is two matrix
products.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=32)
def bilinear_matrix(size: int, output_size: int) -> np.ndarray:
    """Rows: output samples; columns: input pixels; float32 weights, each row summing to 1.

    Cached, so it is returned read-only."""
    if size < 1 or output_size < 1:
        raise ValueError(f"sizes must be positive, not {size} -> {output_size}")
    # As PyTorch computes it for float32 data: a float32 scale, the position rounded once to
    # float32 (a fused multiply-add; exact in float64 first), float32 weights.  The weights
    # then agree to the bit, and results to float32 rounding of the sums.
    scale = np.float64(np.float32(size) / np.float32(output_size))
    position = ((np.arange(output_size) + 0.5) * scale - 0.5).astype(np.float32)
    position = np.maximum(position, np.float32(0.0))
    first = np.minimum(np.floor(position).astype(np.int64), size - 1)
    second = np.minimum(first + 1, size - 1)
    fraction = np.clip(position - first.astype(np.float32), 0.0, 1.0).astype(np.float32)
    matrix = np.zeros((output_size, size), dtype=np.float32)
    rows = np.arange(output_size)
    np.add.at(matrix, (rows, first), np.float32(1.0) - fraction)
    np.add.at(matrix, (rows, second), fraction)
    matrix.flags.writeable = False
    return matrix


def resize_bilinear(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``image`` (..., H, W) resampled to (..., rows, columns); float32."""
    data = np.asarray(image, dtype=np.float32)
    vertical = bilinear_matrix(data.shape[-2], rows)
    horizontal = bilinear_matrix(data.shape[-1], columns)
    return vertical @ data @ horizontal.T
