"""Where a scan sits in space, in the terms a user checks a scan by: voxel size, field of view,
axis codes and how far its axes are tilted from the scanner's (obliquity).

Used to compare a scan given to ``unet predict`` with the scans a model was trained on; read
from the header alone for training files (cheap), from the affine already read at prediction.
"""

from __future__ import annotations

from dataclasses import dataclass

import nibabel as nib
import numpy as np

from unetcli.data.image_io import VolumeSource, volume_geometry


@dataclass(frozen=True)
class ScanGeometry:
    """Spacing and field of view along the canonical (RAS) axes; for PNG images, pixels."""

    spacing: tuple[float, ...]
    """mm per voxel along R, A, S (PNG: 1 per row and column)."""
    shape: tuple[int, ...]
    """Voxels along R, A, S (PNG: rows, columns)."""
    axis_codes: str
    """The file's own axis order, e.g. ``LPS`` (PNG: empty)."""
    obliquity_deg: float
    """Largest angle between a voxel axis and the nearest scanner axis (0 for an axis-aligned scan)."""

    @property
    def field_of_view(self) -> tuple[float, ...]:
        """Extent along each canonical axis: mm for 3D volumes, pixels for PNG."""
        return tuple(float(s * n) for s, n in zip(self.spacing, self.shape))


def obliquity_degrees(affine: np.ndarray) -> float:
    """The largest angle (degrees) between a voxel axis of ``affine`` and its nearest world axis."""
    axes = np.asarray(affine, dtype=np.float64)[:3, :3]
    norms = np.linalg.norm(axes, axis=0)
    if np.any(norms <= 0):
        return 0.0
    cosines = np.abs(axes / norms).max(axis=0)
    return float(np.degrees(np.arccos(np.clip(cosines, -1.0, 1.0))).max())


def nifti_geometry(affine: np.ndarray, shape: tuple[int, ...]) -> ScanGeometry:
    """The geometry of a volume of spatial ``shape`` (the file's own axes) with ``affine``."""
    ornt = nib.io_orientation(affine)
    spacing, canonical_shape = [0.0, 0.0, 0.0], [0, 0, 0]
    zooms = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    for axis, (target, _flip) in enumerate(ornt):
        spacing[int(target)], canonical_shape[int(target)] = float(zooms[axis]), int(shape[axis])
    return ScanGeometry(tuple(spacing), tuple(canonical_shape), "".join(nib.aff2axcodes(affine)), obliquity_degrees(affine))


def image_geometry(shape: tuple[int, ...]) -> ScanGeometry:
    """A PNG image of spatial ``shape`` (rows, columns): pixel units, no orientation."""
    return ScanGeometry(tuple(1.0 for _ in shape), tuple(int(n) for n in shape), "", 0.0)


def read_scan_geometry(source: VolumeSource) -> ScanGeometry:
    """The geometry of a 3D scan in any format unetcli reads, from its header alone (no voxel data)."""
    shape, affine = volume_geometry(source)
    return nifti_geometry(affine, tuple(int(n) for n in shape[:3]))
