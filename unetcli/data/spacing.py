"""The target-spacing rule of a dataset (nnU-Net v2's), one home for ``unet plan`` and ``--no-plan`` runs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ANISOTROPY_RATIO = 3.0
"""An axis is out-of-plane when its spacing is more than this many times the others'."""


def is_thick_slice(spacing: Sequence[float] | None) -> bool:
    """Thick-slice 3D data: the coarsest axis is more than ANISOTROPY_RATIO times the finest (nnU-Net's
    "dummy 2D" rule: such data is augmented in-plane only and gets in-plane rotations)."""
    return spacing is not None and len(spacing) == 3 and max(spacing) / min(spacing) > ANISOTROPY_RATIO


def out_of_plane_axis(spacing: Sequence[float], shape: Sequence[float]) -> int | None:
    """The axis that is both thick (spacing > 3x every other) and short (fewer than a third of the
    voxels of every other axis), else None. Both conditions, as in nnU-Net: a long thick axis
    (a coarse but large field of view) is still resampled normally."""
    spacing, shape = np.asarray(spacing, float), np.asarray(shape, float)
    if len(spacing) < 2:
        return None
    axis = int(np.argmax(spacing))
    others = np.delete(np.arange(len(spacing)), axis)
    thick = spacing[axis] > ANISOTROPY_RATIO * spacing[others].max()
    short = shape[axis] * ANISOTROPY_RATIO < shape[others].min()
    return axis if thick and short else None


def fullres_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> list[float]:
    """The median spacing per axis; an out-of-plane axis gets the 10th percentile of its spacings
    instead (the thinnest common slices), never below the largest in-plane spacing, so thick-slice
    cases are not upsampled into many interpolated slices."""
    values = np.asarray(spacings, float)
    target = np.median(values, axis=0)
    median_shape = np.median(np.asarray(shapes, float), axis=0)
    axis = out_of_plane_axis(target, median_shape)
    if axis is not None:
        others = np.delete(target, axis)
        target[axis] = max(float(np.percentile(values[:, axis], 10)), float(others.max()))
    return [float(v) for v in target]
