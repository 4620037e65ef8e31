"""Intensity normalisation, applied identically at training and prediction time."""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu

FOREGROUND_MASKS = ("nonzero", "robust")
"""How ``zscore_nonzero`` finds the voxels it normalises over (see :func:`foreground_mask`)."""
FOREGROUND_SIGMA = 1.0
"""Gaussian smoothing (voxels) before thresholding: background noise averages out, anatomy does not."""
FOREGROUND_FRACTION = 0.1
"""Foreground is brighter than this share of the typical foreground intensity (the median above
Otsu's threshold): far below tissue and CSF in skull-stripped MRI, far above smoothed noise."""
MIN_COMPONENT_SHARE = 0.1
"""Connected foreground pieces smaller than this share of the largest are background specks."""


def normalize_image(image: np.ndarray, scheme: str, foreground: str = "nonzero") -> np.ndarray:
    """Normalise each channel of a (C, *S) image independently; returns float32.

    ``zscore``: (x - mean) / std over all pixels. ``zscore_nonzero``: statistics over the
    foreground only (skull-stripped MRI, where background would dominate), background set to 0;
    ``foreground`` says how it is found (:func:`foreground_mask`). ``minmax``: scaled to [0, 1].
    ``none``: unchanged. A constant channel becomes zeros.
    """
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image.astype(np.float32, copy=False)):
        if scheme == "none":
            out[c] = channel
        elif scheme == "minmax":
            lo, hi = float(channel.min()), float(channel.max())
            out[c] = (channel - lo) / (hi - lo) if hi > lo else 0.0
        elif scheme == "zscore":
            if channel.size == 0:
                out[c] = 0.0
                continue
            mean, std = float(channel.mean()), float(channel.std())
            out[c] = (channel - mean) / max(std, 1e-8)
        elif scheme == "zscore_nonzero":
            mask, counted = foreground_masks(channel, foreground)
            values = channel[counted]
            if values.size == 0:
                out[c] = 0.0
                continue
            normed = (channel - float(values.mean())) / max(float(values.std()), 1e-8)
            out[c] = np.where(mask, normed, 0.0)
        else:
            raise ValueError(f"unknown normalisation scheme {scheme!r}")
    return out


def foreground_masks(channel: np.ndarray, method: str = "robust") -> tuple[np.ndarray, np.ndarray]:
    """The foreground of one channel (*S) and the part of it that statistics are taken over (booleans).

    ``nonzero``: every voxel that is not exactly 0, both times (nnU-Net's rule; a test scan whose
    background holds noise instead of zeros then gets another mask and other statistics).
    ``robust``: the same whether the background is exactly 0 or noise: the foreground is every voxel
    above a low threshold (a :data:`FOREGROUND_FRACTION` of the typical foreground intensity, found on a
    smoothed copy with Otsu's method) both in the smoothed image and itself, without small specks,
    holes filled (dark ventricles stay in); statistics count its voxels above twice the threshold, so
    the few noise voxels that cling to its edge do not. Falls back to ``nonzero`` where no
    foreground stands out.
    """
    if method == "nonzero":
        return (channel != 0,) * 2
    if method != "robust":
        raise ValueError(f"unknown foreground mask {method!r}")
    smoothed = ndimage.gaussian_filter(channel.astype(np.float32, copy=False), FOREGROUND_SIGMA)
    if float(smoothed.max()) <= float(smoothed.min()):
        return (channel != 0,) * 2
    bright = smoothed[smoothed > threshold_otsu(smoothed)]
    level = FOREGROUND_FRACTION * float(np.median(bright)) if bright.size else 0.0
    mask = _large_components((smoothed > level) & (channel > level)) if level > 0 else np.zeros(channel.shape, bool)
    if not mask.any():  # nothing positive stands out: no basis for a threshold
        return (channel != 0,) * 2
    mask = ndimage.binary_fill_holes(mask)
    return mask, mask & (channel > 2 * level)


def foreground_mask(channel: np.ndarray, method: str = "robust") -> np.ndarray:
    """The foreground of one channel (*S): what ``zscore_nonzero`` keeps (:func:`foreground_masks`)."""
    return foreground_masks(channel, method)[0]


def components_at_least(mask: np.ndarray, share: float) -> np.ndarray:
    """``mask`` without the face-connected pieces smaller than ``share`` of the largest piece
    (``share`` 1: the largest piece alone, the first of equal ones); an empty mask stays empty."""
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    keep = sizes >= share * sizes.max() if share < 1 else np.arange(len(sizes)) == int(np.argmax(sizes))
    keep[0] = False
    return keep[labels]


def _large_components(mask: np.ndarray) -> np.ndarray:
    """``mask`` without connected pieces smaller than :data:`MIN_COMPONENT_SHARE` of the largest."""
    return components_at_least(mask, MIN_COMPONENT_SHARE)
