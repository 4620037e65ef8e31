"""Reading and writing 3D images and label maps (NIfTI, MetaImage, NRRD, TIFF, DICOM series: see
:mod:`unetcli.data.image_io`), their checks, and the geometry the 3D path relies on.

Conventions used throughout (shapes are stated in every docstring):

* images are float32 ``(C, X, Y, Z)`` in the file's voxel axes; label maps are int64 ``(X, Y, Z)``;
* ``to_canonical`` reorients to RAS (closest canonical, like ``nib.as_closest_canonical``) and
  ``from_canonical`` undoes it exactly, so the pipeline is
  ``read_image -> to_canonical -> crop_to_nonzero -> resample`` and predictions go back with
  ``resample_to_shape -> uncrop -> from_canonical -> write_segmentation``;
* spacings are in mm, one per spatial axis of the array they describe (after ``to_canonical``
  use ``ImageProperties.canonical_spacing``).

Every backend hands over ``(X, Y, Z[, C])`` voxels and a voxel -> RAS affine, so the checks below
(finite values, integral labels, channel files and labels on the image's grid) are the same for every
format, and a mask is written in any format with its scan's geometry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from unetcli.data.image_io import Volume, VolumeSource, load_volume, write_label_volume
from unetcli.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
AFFINE_ATOL = 1e-4
ANISOTROPY_THRESHOLD = 3.0
_RAS = axcodes2ornt(("R", "A", "S"))


# --------------------------------------------------------------------------- properties


@dataclass(eq=False)
class ImageProperties:
    """What is needed to put a prediction back into the space of the original file.

    ``spacing`` and ``orientation`` describe the original voxel axes; the ``canonical_*``
    properties describe the array returned by ``to_canonical``. ``crop_box`` is left ``None``
    by ``read_image`` and may be set by the caller to the canonical-space box of
    ``crop_to_nonzero``. ``header`` is for writing back only (do not store it in checkpoints).
    """

    affine: np.ndarray  # 4x4 affine of the original file
    header: nib.Nifti1Header | None  # original NIfTI header (a Nifti2Header is a subclass); None for other formats
    original_shape: tuple[int, ...]  # spatial (X, Y, Z) shape of the original file
    spacing: tuple[float, float, float]  # voxel sizes (mm) along the original axes
    orientation: tuple[str, str, str]  # nib.aff2axcodes(affine)
    source: str = ""  # first file read, for messages
    crop_box: tuple[slice, ...] | None = None  # canonical-space crop, set by the caller

    @property
    def canonical_affine(self) -> np.ndarray:
        """4x4 affine of the array ``to_canonical`` returns (RAS axes)."""
        ornt = _orientation(self.affine, self.source)
        return self.affine @ inv_ornt_aff(ornt, self.original_shape)

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """Spatial shape after ``to_canonical`` (the original shape with axes permuted)."""
        ornt = _orientation(self.affine, self.source)
        shape = [0, 0, 0]
        for axis, (target, _flip) in enumerate(ornt):
            shape[int(target)] = self.original_shape[axis]
        return (shape[0], shape[1], shape[2])

    @property
    def canonical_spacing(self) -> tuple[float, float, float]:
        """Voxel sizes (mm) along the canonical (RAS) axes."""
        return voxel_sizes(self.canonical_affine)


# --------------------------------------------------------------------------- file names


def is_nifti(path: Path | str) -> bool:
    """True when the file name ends in ``.nii`` or ``.nii.gz`` (case-insensitive)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path | str) -> str:
    """File name without its NIfTI suffix: ``case_0000.nii.gz`` -> ``case_0000``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    raise ValueError(f"{name!r} is not a NIfTI file name (expected one of {', '.join(NIFTI_SUFFIXES)})")


# --------------------------------------------------------------------------- reading


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size (mm) along each array axis of ``affine``."""
    sizes = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def _orientation(affine: np.ndarray, source: str | Path = "") -> np.ndarray:
    """``io_orientation`` of a 4x4 affine; DataError if it is not a usable (finite, invertible) one."""
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise DataError(f"{source}: invalid affine (not a finite 4x4 matrix)")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{source}: invalid affine (voxel axes are degenerate, a voxel size is 0?)")
    ornt = io_orientation(affine)
    if np.isnan(ornt).any():
        raise DataError(f"{source}: cannot determine the orientation of the affine")
    return ornt


def _spatial(data: np.ndarray, path: Path, max_extra: int) -> np.ndarray:
    """Drop singleton axes after the third; DataError unless 3D (+ at most ``max_extra`` channel axis)."""
    shape = data.shape
    extra = [n for n in shape[3:] if n != 1]
    if len(shape) < 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {shape}", hint="2D images go through the PNG path")
    if len(extra) > max_extra or min(shape) == 0:
        kind = "3D volume" if max_extra == 0 else "3D volume or 4D (X, Y, Z, C) image"
        raise DataError(f"{path}: expected a {kind}, got shape {shape}")
    return data.reshape(shape[:3] + tuple(extra))


def _check_numeric(data: np.ndarray, path: Path) -> None:
    if data.dtype.fields is not None or not np.issubdtype(data.dtype, np.number) or np.iscomplexobj(data):
        raise DataError(f"{path}: unsupported voxel type {data.dtype} (RGB/complex volumes are not supported)")


def _read_one_image(path: VolumeSource, allow_channels: bool) -> tuple[np.ndarray, Volume]:
    """(C, X, Y, Z) float32 from one file (or DICOM series), checked for NaN/Inf."""
    volume = load_volume(path)
    data = volume.data
    _check_numeric(data, path)
    data = _spatial(data, path, max_extra=int(allow_channels))
    with np.errstate(over="ignore", invalid="ignore"):
        array = data.astype(np.float32)
    array = array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise DataError(f"{path}: {bad} voxel(s) are NaN or infinite (or too large for float32)",
                        hint="fix or remove the file")
    _orientation(volume.affine, path)
    return np.ascontiguousarray(array), volume


def _as_source(item: VolumeSource | str) -> VolumeSource:
    return Path(item) if isinstance(item, str) else item


def read_image(paths: Sequence[VolumeSource]) -> tuple[np.ndarray, ImageProperties]:
    """Read one case as float32 ``(C, X, Y, Z)`` in the file's own voxel axes.

    ``paths`` is either one 3D file per channel (nnU-Net: ``CASE_0000.nii.gz``,
    ``CASE_0001.nii.gz``, ...), a single 4D ``(X, Y, Z, C)`` file (Decathlon; or a multi-component
    MetaImage/NRRD), or one DICOM series; singleton axes after the third are dropped. Any format
    of :mod:`unetcli.data.image_io`. Channel files must agree in shape and affine
    (``np.allclose``, atol 1e-4). Any unreadable, damaged, non-finite or inconsistent input
    raises ``DataError`` naming the file; nothing else is raised for a bad file.
    """
    paths = [_as_source(p) for p in paths]
    if not paths:
        raise DataError("no image files given for this case")
    arrays, first = [], None
    for path in paths:
        array, volume = _read_one_image(path, allow_channels=len(paths) == 1)
        if first is None:
            first = (path, volume, array.shape[1:])
        else:
            _check_same_grid(path, array.shape[1:], volume.affine, first)
        arrays.append(array)
    ref_path, ref, _ = first
    image = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
    affine = np.array(ref.affine, dtype=np.float64)
    properties = ImageProperties(
        affine=affine,
        header=ref.header.copy() if ref.header is not None else None,
        original_shape=tuple(int(n) for n in image.shape[1:]),
        spacing=voxel_sizes(affine),
        orientation=tuple(nib.aff2axcodes(affine)),
        source=str(ref_path),
    )
    return image, properties


def _check_same_grid(path: VolumeSource, shape: tuple[int, ...], affine: np.ndarray,
                     first: tuple[VolumeSource, Volume, tuple[int, ...]]) -> None:
    ref_path, ref, ref_shape = first
    ref_name = ref_path.name if isinstance(ref_path, Path) else str(ref_path)
    if tuple(shape) != tuple(ref_shape):
        raise DataError(f"{path}: shape {tuple(shape)} differs from {ref_name}'s {tuple(ref_shape)}",
                        hint="all channel files of a case must be on the same voxel grid")
    if not np.allclose(affine, ref.affine, atol=AFFINE_ATOL):
        raise DataError(f"{path}: affine differs from {ref_name}'s ({affine_difference(affine, ref.affine)})",
                        hint="all channel files of a case must be on the same voxel grid")


def affine_difference(a: np.ndarray, b: np.ndarray) -> str:
    """Short description of how two affines differ: origin, spacing, orientation, max difference."""

    def fmt(values: Sequence[float]) -> str:
        return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"

    parts = [f"origin {fmt(a[:3, 3])} vs {fmt(b[:3, 3])}", f"spacing {fmt(voxel_sizes(a))} vs {fmt(voxel_sizes(b))}"]
    try:
        parts.append(f"orientation {''.join(nib.aff2axcodes(a))} vs {''.join(nib.aff2axcodes(b))}")
    except Exception:  # noqa: BLE001 - a degenerate affine has no axis codes; the rest still helps
        pass
    parts.append(f"max difference {float(np.max(np.abs(np.asarray(a) - np.asarray(b)))):.3g}")
    return "; ".join(parts)


def read_label(path: Path, reference: ImageProperties | None = None) -> np.ndarray:
    """Read a label map as int64 ``(X, Y, Z)`` in the file's own voxel axes.

    Values must be finite, integral and non-negative (a trailing singleton 4th axis is dropped;
    a real 4D label is rejected). With ``reference`` (the image's properties) the label must
    have the same shape and affine (``np.allclose``, atol 1e-4). Every problem is a
    ``DataError`` naming the file.
    """
    path = Path(path)
    volume = load_volume(path)
    data = volume.data
    _check_numeric(data, path)
    data = _spatial(data, path, max_extra=0)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise DataError(f"{path}: label map contains NaN or infinite values")
        if not np.array_equal(data, np.round(data)):
            raise DataError(f"{path}: label map has non-integer values (e.g. {_first_fraction(data)})",
                            hint="labels must be class indices 0..K-1")
    if data.size and data.min() < 0:
        raise DataError(f"{path}: label map has negative values (min {data.min()})",
                        hint="labels must be class indices 0..K-1")
    if data.size and data.max() > np.iinfo(np.int32).max:
        raise DataError(f"{path}: label value {data.max()} is too large for a class index")
    if reference is not None:
        _check_label_grid(path, data.shape, np.asarray(volume.affine), reference)
    else:
        _orientation(volume.affine, path)
    return np.ascontiguousarray(data, dtype=np.int64)


def _first_fraction(data: np.ndarray) -> float:
    flat = data.ravel()
    return float(flat[np.flatnonzero(flat != np.round(flat))[0]])


def _check_label_grid(path: Path, shape: tuple[int, ...], affine: np.ndarray, ref: ImageProperties) -> None:
    image_name = Path(ref.source).name or "the image"
    if tuple(shape) != tuple(ref.original_shape):
        raise DataError(
            f"{path}: label shape {tuple(shape)} differs from image {image_name}'s {tuple(ref.original_shape)}",
            hint="the label must be on the image's voxel grid",
        )
    if not np.allclose(affine, ref.affine, atol=AFFINE_ATOL):
        raise DataError(f"{path}: label affine differs from image {image_name}'s ({affine_difference(affine, ref.affine)})",
                        hint="the label must be on the image's voxel grid (same origin, spacing and orientation)")


# --------------------------------------------------------------------------- writing


def write_segmentation(labels: np.ndarray, properties: ImageProperties, path: Path) -> None:
    """Write an int ``(X, Y, Z)`` label map on the ORIGINAL grid, atomically, in the format of ``path``'s suffix.

    The mask carries its scan's geometry whatever the two formats: the original affine (spacing,
    origin, full direction matrix), and for NIfTI a copy of the scan's header when it was NIfTI
    (qform/sform codes, units; see :func:`unetcli.data.nifti_file.write_labels`). Values must be
    in 0..65535.
    """
    labels = np.asarray(labels)
    if labels.shape != tuple(properties.original_shape):
        raise ValueError(f"labels have shape {labels.shape}, expected the original grid {properties.original_shape}")
    if not np.issubdtype(labels.dtype, np.integer) and labels.dtype != np.bool_:
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    write_label_volume(labels, properties.affine, properties.header, path)


# --------------------------------------------------------------------------- orientation


def _apply(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply an orientation transform to the last three axes of (X,Y,Z) or (C,X,Y,Z)."""
    if array.ndim == 3:
        return np.ascontiguousarray(apply_orientation(array, ornt))
    if array.ndim == 4:
        moved = apply_orientation(np.moveaxis(array, 0, -1), ornt)  # transforms the first 3 axes
        return np.ascontiguousarray(np.moveaxis(moved, -1, 0))
    raise ValueError(f"expected an (X, Y, Z) or (C, X, Y, Z) array, got shape {array.shape}")


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) data to the closest RAS orientation.

    Axes are only permuted and flipped (no interpolation), as ``nib.as_closest_canonical``.
    Returns the reoriented array and its 4x4 affine; every voxel keeps its world position.
    """
    ornt = _orientation(affine)
    spatial = array.shape[-3:]
    return _apply(array, ornt), np.asarray(affine, dtype=np.float64) @ inv_ornt_aff(ornt, spatial)


def from_canonical(array: np.ndarray, properties: ImageProperties) -> np.ndarray:
    """Exact inverse of ``to_canonical`` for ``(X, Y, Z)`` or ``(C, X, Y, Z)`` canonical arrays.

    The spatial shape must be ``properties.canonical_shape``; the result has
    ``properties.original_shape`` in the file's own axes.
    """
    if tuple(array.shape[-3:]) != properties.canonical_shape:
        raise ValueError(f"array has spatial shape {array.shape[-3:]}, expected {properties.canonical_shape}")
    ornt = _orientation(properties.affine, properties.source)
    return _apply(array, ornt_transform(_RAS, ornt))


# --------------------------------------------------------------------------- resampling


def lowres_axis(spacing: Sequence[float]) -> int | None:
    """The single out-of-plane axis when max(spacing)/min(spacing) > 3, else None (nnU-Net rule).

    None too when two axes share the largest spacing (no single out-of-plane axis).
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    if spacing.max() / spacing.min() <= ANISOTROPY_THRESHOLD:
        return None
    largest = np.flatnonzero(np.isclose(spacing, spacing.max()))
    return int(largest[0]) if len(largest) == 1 else None


def resample(
    array: np.ndarray,
    current_spacing: Sequence[float],
    target_spacing: Sequence[float],
    order: int,
    new_shape: Sequence[int] | None = None,
) -> np.ndarray:
    """Resample ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) from ``current_spacing`` to ``target_spacing``.

    The new spatial shape is ``round(shape * current / target)`` unless ``new_shape`` is given.
    Use order 3 (or 1) for images, 0 for label maps, 1 for probabilities (each channel is
    resampled on its own). Anisotropic data (nnU-Net's rule): when the current spacing, or
    failing that the target spacing, has max/min > 3, each slice is resampled in-plane with
    ``order`` and the out-of-plane (largest-spacing) axis with nearest neighbour (order 0), so no
    values are blended across thick slices. Returns the input dtype.
    """
    shape = np.asarray(array.shape[-3:])
    if new_shape is None:
        ratio = np.asarray(current_spacing, dtype=np.float64) / np.asarray(target_spacing, dtype=np.float64)
        new_shape = np.maximum(np.round(shape * ratio), 1).astype(int)
    axis = lowres_axis(current_spacing)
    if axis is None:
        axis = lowres_axis(target_spacing)
    return resample_to_shape(array, tuple(int(n) for n in new_shape), order, separate_axis=axis)


def resample_to_shape(
    array: np.ndarray, new_shape: Sequence[int], order: int, *, separate_axis: int | None = None
) -> np.ndarray:
    """Resize the last three axes of ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) to exactly ``new_shape``.

    Voxel edges are aligned (``grid_mode``), edge values are extended. Used to map a prediction
    back onto the pre-resampling canonical grid. With ``separate_axis`` (0..2) that axis is
    resized with nearest neighbour and the other two with ``order``, slice by slice.
    """
    new_shape = tuple(int(n) for n in new_shape)
    if array.ndim == 3:
        return resample_to_shape(array[None], new_shape, order, separate_axis=separate_axis)[0]
    if array.ndim != 4 or len(new_shape) != 3:
        raise ValueError(f"expected a (C, X, Y, Z) array and a 3D shape, got {array.shape} and {new_shape}")
    if tuple(array.shape[1:]) == new_shape:
        return array.copy()
    out = [_resize_channel(channel, new_shape, order, separate_axis) for channel in array]
    return np.stack(out)


def _zoom(volume: np.ndarray, new_shape: tuple[int, ...], order: int) -> np.ndarray:
    factors = [new / old for new, old in zip(new_shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    assert out.shape == new_shape, (out.shape, new_shape)
    return out


def _resize_channel(volume: np.ndarray, new_shape: tuple[int, ...], order: int, axis: int | None) -> np.ndarray:
    if order == 0 or axis is None:
        return _zoom(volume, new_shape, order)
    in_plane = tuple(n for i, n in enumerate(new_shape) if i != axis)
    slices = [_zoom(s, in_plane, order) for s in np.moveaxis(volume, axis, 0)]
    stacked = np.moveaxis(np.stack(slices), 0, axis)
    return _zoom(stacked, new_shape, 0)  # only `axis` changes size here: nearest along it


# --------------------------------------------------------------------------- cropping


def crop_to_nonzero(
    image: np.ndarray, label: np.ndarray | None = None, margin: int = 0
) -> tuple[np.ndarray, np.ndarray | None, tuple[slice, ...]]:
    """Crop ``(C, X, Y, Z)`` image (and ``(X, Y, Z)`` label) to the box of voxels non-zero in any channel.

    The box is grown by ``margin`` voxels per side (clipped to the volume). An all-zero image
    keeps its full extent. Returns copies plus the spatial box (three slices) for ``uncrop``.
    """
    nonzero = np.any(image != 0, axis=0)
    box = []
    for axis in range(nonzero.ndim):
        other = tuple(a for a in range(nonzero.ndim) if a != axis)
        hits = np.flatnonzero(np.any(nonzero, axis=other))
        if hits.size == 0:
            box = [slice(0, n) for n in nonzero.shape]
            break
        size = nonzero.shape[axis]
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, size)))
    box_t = tuple(box)
    cropped_label = None if label is None else label[box_t].copy()
    return image[(slice(None),) + box_t].copy(), cropped_label, box_t


def uncrop(
    array: np.ndarray, box: tuple[slice, ...], full_shape: tuple[int, ...], fill: int | float = 0
) -> np.ndarray:
    """Paste a cropped ``(..., X', Y', Z')`` array into a ``full_shape`` volume filled with ``fill``.

    ``full_shape`` is the spatial shape (leading axes of ``array`` are kept) or the full shape.
    Inverse of ``crop_to_nonzero``. For probabilities, uncrop the label map instead (or paste
    each channel with its own fill: 1 for background, 0 otherwise).
    """
    lead = array.shape[: array.ndim - len(box)]
    full_shape = tuple(full_shape)
    out_shape = full_shape if len(full_shape) == array.ndim else lead + full_shape
    out = np.full(out_shape, fill, dtype=array.dtype)
    region = (Ellipsis,) + tuple(box)
    if out[region].shape != array.shape:
        raise ValueError(f"array of shape {array.shape} does not fit box {box} in {out_shape}")
    out[region] = array
    return out
