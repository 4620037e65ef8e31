"""Intensity normalisation, applied identically at training and prediction time."""

from __future__ import annotations

import numpy as np


def normalize_image(image: np.ndarray, scheme: str) -> np.ndarray:
    """Normalise each channel of a (C, *S) image independently; returns float32.

    ``zscore``: (x - mean) / std over all pixels. ``zscore_nonzero``: statistics over non-zero
    pixels only (skull-stripped MRI, where background would dominate), background left at 0.
    ``minmax``: scaled to [0, 1]. ``none``: unchanged. A constant channel becomes zeros.
    """
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image.astype(np.float32, copy=False)):
        if scheme == "none":
            out[c] = channel
        elif scheme == "minmax":
            lo, hi = float(channel.min()), float(channel.max())
            out[c] = (channel - lo) / (hi - lo) if hi > lo else 0.0
        elif scheme in ("zscore", "zscore_nonzero"):
            mask = channel != 0 if scheme == "zscore_nonzero" else None
            values = channel[mask] if mask is not None else channel
            if values.size == 0:
                out[c] = 0.0
                continue
            mean, std = float(values.mean()), float(values.std())
            normed = (channel - mean) / max(std, 1e-8)
            out[c] = np.where(mask, normed, 0.0) if mask is not None else normed
        else:
            raise ValueError(f"unknown normalisation scheme {scheme!r}")
    return out
