"""Image measurements shared by the evaluations, the demo and the benchmarks.

Images are float arrays or tensors in [0, 1], shaped (..., H, W, 3) for numpy ("np" pipeline output)
unless a function says otherwise.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mean_saturation", "clipped_fraction"]


def _as_np(images) -> np.ndarray:
    if hasattr(images, "detach"):
        images = images.detach().cpu().numpy()
    arr = np.asarray(images, dtype=np.float64)
    if arr.shape[-1] != 3:
        raise ValueError(f"images: expected channels-last RGB (..., H, W, 3), got shape {arr.shape}")
    return arr


def mean_saturation(images) -> float:
    """Mean HSV saturation, (max - min) / max per pixel (0 where max is 0), over all pixels."""
    arr = _as_np(images)
    hi = arr.max(axis=-1)
    lo = arr.min(axis=-1)
    sat = np.where(hi > 0, (hi - lo) / np.where(hi > 0, hi, 1.0), 0.0)
    return float(sat.mean())


def clipped_fraction(images) -> float:
    """Fraction of channel values that hit 0 or 255 once quantised to 8 bits."""
    arr = np.round(np.clip(_as_np(images), 0.0, 1.0) * 255.0)
    return float(((arr == 0) | (arr == 255)).mean())
