"""Spatial augmentation of training patches in physical space (mm), as nnU-Net does it.

A patch is rotated and scaled about its centre in millimetres, not in voxel or normalised
coordinates: on a 1 x 1 x 4 mm grid a turn of the voxel array would shear the anatomy. The
patch is resampled from a region of the case large enough to hold every rotated voxel, so real
data fills it wherever the case has data; only beyond the case's own edge is it padded (image 0,
labels the ignore label or background), never by replicating the patch's border.

Thick-slice data (:func:`unetcli.data.spacing.is_thick_slice`, nnU-Net's "dummy 2D"
rule) is rotated, scaled and deformed only in the plane of its two fine axes: out of plane, a
4 mm slice holds too little to interpolate from. 90-degree turns happen only in planes of equal
spacing and equal patch size, where they are exact.

Every random draw comes from the caller's ``numpy`` generator (a batch is a pure function of
(seed, position)); the resampling itself runs on tensors (``grid_sample``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from unetcli.data.spacing import is_thick_slice

ROTATION_RANGE = math.pi / 6
"""Rotations of isotropic 3D data are drawn from U(-30, 30) degrees about each axis (nnU-Net's range)."""
SCALE_RANGE = (0.7, 1.4)
"""Anatomy is scaled by U(0.7, 1.4) (nnU-Net's range), the same factor on every moving axis."""
ELASTIC_MAGNITUDE = 0.05
"""Elastic displacements reach up to this share of the smallest moving patch extent (mm)."""
ELASTIC_CONTROL_POINTS = 4
"""Control points per axis of the smooth random displacement field (its wavelength ~ patch / 3)."""


@dataclass(frozen=True)
class Warp:
    """A sampled spatial transform of one patch.

    ``matrix`` (nd, nd) maps a patch voxel's offset from the patch centre to the source offset, both
    in voxels (the mm rotation/scaling conjugated by the spacing); ``displacement`` (nd, *patch) is
    an optional elastic offset in source voxels.
    """

    matrix: np.ndarray
    displacement: torch.Tensor | None = None


def moving_axes(spacing: Sequence[float]) -> tuple[int, ...]:
    """Axes a spatial transform may move: all, or for thick-slice 3D data the two fine ones."""
    if is_thick_slice(spacing):
        thick = int(np.argmax(spacing))
        return tuple(a for a in range(3) if a != thick)
    return tuple(range(len(spacing)))


def square_planes(spacing: Sequence[float], patch: Sequence[int]) -> list[tuple[int, int]]:
    """Axis pairs where a 90-degree turn is exact: equal spacing and equal patch size."""
    nd = len(patch)
    return [(a, b) for a in range(nd) for b in range(a + 1, nd)
            if patch[a] == patch[b] and math.isclose(spacing[a], spacing[b], rel_tol=1e-3)]


def rotation_range(spacing: Sequence[float], patch: Sequence[int]) -> float:
    """The largest rotation angle (radians) for this grid and patch, by nnU-Net's rule: a full turn in
    the plane of thick slices (nothing out of plane can go wrong) and of 2D patches no longer than 1.5x
    their width, 15 degrees for longer 2D patches, 30 degrees about each axis of isotropic 3D data."""
    if len(patch) == 2:
        return math.pi if max(patch) / min(patch) <= 1.5 else math.pi / 12
    return math.pi if is_thick_slice(spacing) else ROTATION_RANGE


def _plane_rotation(nd: int, axes: tuple[int, int], angle: float) -> np.ndarray:
    rot = np.eye(nd)
    c, s = math.cos(angle), math.sin(angle)
    rot[np.ix_(axes, axes)] = [[c, -s], [s, c]]
    return rot


def random_rotation_scale(spacing: Sequence[float], rng: np.random.Generator,
                          rotation: float = ROTATION_RANGE, scale_range: Sequence[float] = SCALE_RANGE) -> np.ndarray:
    """An (nd, nd) voxel-space matrix: a rotation of U(-rotation, rotation) about each rotation axis
    and a scaling by U(*scale_range), in mm about the patch centre, in-plane only for thick slices.

    Output offsets map to source offsets as ``source = matrix @ output`` (voxels).
    """
    nd, axes = len(spacing), moving_axes(spacing)
    planes = [(axes[0], axes[1])] if len(axes) == 2 else [(1, 2), (0, 2), (0, 1)]
    physical = np.eye(nd)
    for plane in planes:
        physical = physical @ _plane_rotation(nd, plane, float(rng.uniform(-rotation, rotation)))
    scale = float(rng.uniform(*scale_range))
    shrink = np.ones(nd)
    shrink[list(axes)] = 1.0 / scale  # sampling the source 1/s as far out magnifies the anatomy s-fold
    physical = physical @ np.diag(shrink)
    sp = np.asarray(spacing, dtype=np.float64)
    # voxel offset -> mm (diag sp), transform in mm, mm -> source voxels (diag 1/sp)
    return np.diag(1.0 / sp) @ physical @ np.diag(sp)


def random_displacement(patch: Sequence[int], spacing: Sequence[float], rng: np.random.Generator,
                        magnitude: float = ELASTIC_MAGNITUDE) -> torch.Tensor:
    """A smooth random displacement field (nd, *patch) in source voxels: control-point noise,
    interpolated (bi/trilinear) to the patch, scaled to at most ``magnitude`` times the smallest
    moving patch extent in mm. For thick slices it is zero along the slice axis and the same in
    every slice (as nnU-Net's dummy-2D augmentation deforms every slice alike)."""
    nd, axes = len(patch), moving_axes(spacing)
    extent = min(patch[a] * spacing[a] for a in axes)
    control = tuple(ELASTIC_CONTROL_POINTS if a in axes else 1 for a in range(nd))
    noise = rng.standard_normal((nd,) + control).astype(np.float32)
    mode = "bilinear" if nd == 2 else "trilinear"
    field = F.interpolate(torch.from_numpy(noise)[None], size=list(patch), mode=mode, align_corners=True)[0]
    field = field / field.abs().amax().clamp_min(1e-6)
    mm = float(rng.uniform(0.0, magnitude * extent))
    per_axis = torch.tensor([mm / spacing[a] if a in axes else 0.0 for a in range(nd)], dtype=torch.float32)
    return field * per_axis.view(nd, *([1] * nd))


def extract_window(array: np.ndarray, starts: Sequence[int], size: Sequence[int], fill: float, lead: int = 0) -> np.ndarray:
    """The window ``[starts, starts + size)`` of the trailing axes of ``array``, ``fill`` outside it
    (float32 with ``lead`` leading axes kept, else the array's own dtype)."""
    spatial = array.shape[lead:]
    out = np.full(array.shape[:lead] + tuple(size), fill, dtype=np.float32 if lead else array.dtype)
    src = tuple(slice(min(max(a, 0), s), max(min(a + n, s), 0)) for a, n, s in zip(starts, size, spatial))
    dst = tuple(slice(r.start - a, r.stop - a) for r, a in zip(src, starts))
    if all(r.stop > r.start for r in src):
        lead_all = (slice(None),) * lead
        out[lead_all + dst] = array[lead_all + src]
    return out


def source_coordinates(starts: Sequence[int], patch: Sequence[int], warp: Warp) -> torch.Tensor:
    """Where each voxel of the warped patch comes from: (nd, *patch) float32 source voxel indices.

    The patch centre (``starts + (patch - 1) / 2``) stays in place; other voxels move by ``warp``."""
    nd = len(patch)
    axes = [torch.arange(p, dtype=torch.float32) - (p - 1) / 2 for p in patch]
    matrix = warp.matrix.astype(np.float32)
    coords = []
    for i in range(nd):  # row i of matrix @ offsets, built from broadcast 1D axes (no (nd, *patch) offset grid)
        row = sum(float(matrix[i, j]) * axes[j].view(*([1] * j), -1, *([1] * (nd - j - 1))) for j in range(nd))
        coords.append((row + (starts[i] + (patch[i] - 1) / 2)).expand(*patch))
    out = torch.stack(coords)
    if warp.displacement is not None:
        out = out + warp.displacement
    return out


def warp_patch(image: np.ndarray, label: np.ndarray, starts: Sequence[int], patch: Sequence[int], warp: Warp,
               label_fill: int) -> tuple[np.ndarray, np.ndarray]:
    """The patch at ``starts`` of a case, transformed by ``warp`` about its centre.

    Reads only the region of the case (image (C, *S), label (*S)) that the warped patch covers,
    padded beyond the case's edge with 0 (image) and ``label_fill`` (labels); the image is
    interpolated linearly, the labels by nearest neighbour. Returns image (C, *patch) float32 and
    label (*patch) in the label's dtype.
    """
    nd = len(patch)
    coords = source_coordinates(starts, patch, warp)
    lo = [int(math.floor(float(c.min()))) for c in coords]
    hi = [int(math.floor(float(c.max()))) + 2 for c in coords]  # +2: the upper interpolation neighbour, exclusive
    size = [h - low for h, low in zip(hi, lo)]
    region = torch.from_numpy(extract_window(image, lo, size, 0.0, lead=1))
    region_label = torch.from_numpy(extract_window(label, lo, size, label_fill).astype(np.int64))
    local = [coords[a] - lo[a] for a in range(nd)]
    # grid_sample's grid: normalised to [-1, 1] (align_corners: -1 and 1 are the first and last voxel
    # centres), coordinate order reversed (x = last axis).
    grid = torch.stack([local[a] * (2.0 / max(size[a] - 1, 1)) - 1.0 for a in reversed(range(nd))], dim=-1)[None]
    out = F.grid_sample(region[None], grid, mode="bilinear", padding_mode="zeros", align_corners=True)[0]
    # Nearest neighbour by rounding, in integers: no label value ever goes through a float blend.
    flat = torch.zeros(tuple(patch), dtype=torch.int64)
    for a in range(nd):
        stride = int(np.prod(size[a + 1:]))
        flat += local[a].round().long().clamp_(0, size[a] - 1) * stride
    return out.numpy(), region_label.view(-1)[flat].numpy().astype(label.dtype, copy=False)
