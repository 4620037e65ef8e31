"""A validation overlay as an RGB array: the image in grey, reference contours green, prediction contours magenta."""

from __future__ import annotations

import numpy as np

REFERENCE = (0, 224, 0)
PREDICTION = (255, 0, 255)


def _edges(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def overlay_rgb(image: np.ndarray, truth: np.ndarray, pred: np.ndarray, scale: int = 1) -> np.ndarray:
    """``uint8`` (H*scale, W*scale, 3): every foreground class's contour, reference then prediction on top."""
    image = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(image, [1, 99]) if image.size else (0.0, 1.0)
    grey = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=-1).astype(np.uint8)
    if scale > 1:
        rgb, truth, pred = (np.repeat(np.repeat(a, scale, 0), scale, 1) for a in (rgb, truth, pred))
    for labels, colour in ((truth, REFERENCE), (pred, PREDICTION)):
        for value in np.unique(labels):
            if value != 0:
                rgb[_edges(labels == value)] = colour
    return rgb
