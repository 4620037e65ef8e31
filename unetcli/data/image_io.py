"""One reader/writer interface for the medical image files users have, the backend chosen by file name.

=============  ==========================  =========================================
format         suffixes                    backend
=============  ==========================  =========================================
NIfTI          ``.nii.gz``, ``.nii``       nibabel (:mod:`unetcli.data.nifti_file`)
MetaImage      ``.mha``, ``.mhd``          SimpleITK (:mod:`unetcli.data.itk_file`)
NRRD           ``.nrrd``, ``.seg.nrrd``    SimpleITK
TIFF           ``.tif``, ``.tiff``         tifffile (:mod:`unetcli.data.tiff_file`)
DICOM series   a folder                    SimpleITK (:mod:`unetcli.data.dicom`)
=============  ==========================  =========================================

Whatever the file, a :class:`Volume` holds the voxels in the internal order ``(X, Y, Z[, C])``
(nibabel's: the first array axis is the file's fastest-varying one) and a 4x4 affine mapping voxel
indices to RAS millimetres (nibabel's convention). SimpleITK's ``(Z, Y, X)`` arrays and LPS
origin/direction are converted at the backend's edge, so nothing above this module knows which file a
volume came from. Masks are written back in any of these formats with the scan's geometry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from unetcli.data import itk_file, nifti_file, tiff_file
from unetcli.data.dicom import DicomSeries, read_dicom_series, read_dicom_geometry
from unetcli.errors import ConfigError, DataError

VOLUME_FORMATS: dict[str, tuple[str, ...]] = {
    "NIfTI": (".nii.gz", ".nii"),
    "MetaImage": (".mha", ".mhd"),
    "NRRD": (".seg.nrrd", ".nrrd"),
    "TIFF": (".tif", ".tiff"),
}
"""Format name -> the file name endings it is read from (longest first within a format)."""

_SUFFIXES = sorted((s for suffixes in VOLUME_FORMATS.values() for s in suffixes), key=len, reverse=True)
OUTPUT_FORMATS = ("nii.gz", "nii", "mha", "nrrd")
"""What ``unet predict --output-format`` may ask for (formats that keep a full direction matrix)."""

VolumeSource = Path | DicomSeries
"""One image: a file, or a DICOM series (many files read as one volume)."""


@dataclass
class Volume:
    """A volume as read: voxels ``(X, Y, Z)`` or ``(X, Y, Z, C)``, the voxel -> RAS mm affine, and for
    NIfTI the header (masks are written back with a copy of it)."""

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None


# --------------------------------------------------------------------------- file names


def volume_suffix(path: Path | str) -> str | None:
    """The volume file ending of ``path`` (lower case, e.g. ``.seg.nrrd``), or None for other files."""
    name = Path(path).name.lower()
    return next((s for s in _SUFFIXES if name.endswith(s) and len(name) > len(s)), None)


def is_volume(path: Path | str) -> bool:
    """True for a file name of any readable volume format (NIfTI, MetaImage, NRRD, TIFF)."""
    return volume_suffix(path) is not None


def volume_stem(path: Path | str) -> str:
    """File name without its volume suffix: ``case_0000.nii.gz`` -> ``case_0000``, ``case.seg.nrrd`` -> ``case``."""
    suffix = volume_suffix(path)
    if suffix is None:
        raise ValueError(f"{Path(path).name!r} is not a volume file name (expected one of {', '.join(_SUFFIXES)})")
    return Path(path).name[: -len(suffix)]


def format_name(path: Path | str) -> str:
    """``NIfTI``, ``MetaImage``, ``NRRD`` or ``TIFF`` for a volume file name."""
    suffix = volume_suffix(path)
    return next(name for name, suffixes in VOLUME_FORMATS.items() if suffix in suffixes)


def check_output_format(output_format: str) -> str:
    """``output_format`` normalised (``.NRRD`` -> ``nrrd``); ConfigError unless one of :data:`OUTPUT_FORMATS`."""
    fmt = output_format.lower().lstrip(".")
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"--output-format {output_format}: not one of {', '.join(OUTPUT_FORMATS)}",
                          hint="TIFF masks are written for TIFF inputs only (a TIFF cannot hold an origin or direction)")
    return fmt


def output_suffix(source: VolumeSource, output_format: str | None = None) -> str:
    """The file ending of a mask predicted from ``source``: ``output_format`` when given, else the input's
    own format (NIfTI as ``.nii.gz``; ``.mhd`` as the single-file ``.mha``; a DICOM series as ``.nii.gz``)."""
    if output_format:
        return "." + check_output_format(output_format)
    if isinstance(source, DicomSeries):
        return ".nii.gz"
    suffix = volume_suffix(source)
    if suffix in (".nii", ".nii.gz") or suffix is None:
        return ".nii.gz"
    return {".mhd": ".mha", ".seg.nrrd": ".nrrd"}.get(suffix, suffix)


# --------------------------------------------------------------------------- reading and writing


def load_volume(source: VolumeSource) -> Volume:
    """Read a whole volume (see :class:`Volume`); any unreadable or damaged input is a ``DataError`` naming it."""
    if isinstance(source, DicomSeries):
        data, affine = read_dicom_series(source)
        return Volume(data, affine)
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = volume_suffix(path)
    if suffix in VOLUME_FORMATS["NIfTI"]:
        img, data = nifti_file.load(path)
        return Volume(data, np.asarray(img.affine, np.float64), img.header)
    if suffix in VOLUME_FORMATS["TIFF"]:
        data, affine = tiff_file.read_tiff(path)
        return Volume(data, affine)
    if suffix is None:
        raise DataError(f"{path}: not a volume file (expected one of {', '.join(_SUFFIXES)})")
    data, affine = itk_file.read_itk(path)
    return Volume(data, affine)


def volume_geometry(source: VolumeSource) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` from the header alone (cheap): the shape in ``(X, Y, Z[, C])`` order."""
    if isinstance(source, DicomSeries):
        return read_dicom_geometry(source)
    path = Path(source)
    suffix = volume_suffix(path)
    if suffix in VOLUME_FORMATS["NIfTI"]:
        return nifti_file.header_geometry(path)
    if suffix in VOLUME_FORMATS["TIFF"]:
        return tiff_file.tiff_geometry(path)
    return itk_file.itk_geometry(path)


def write_label_volume(labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, path: Path) -> None:
    """Write an integer ``(X, Y, Z)`` label map with the given geometry, atomically, in the format of ``path``'s
    suffix. NIfTI keeps a copy of ``header`` (when the scan was NIfTI); the others store spacing, origin and
    direction (TIFF: spacing only, in ImageJ metadata and a ``.json`` sidecar)."""
    suffix = volume_suffix(path)
    if suffix in VOLUME_FORMATS["NIfTI"]:
        nifti_file.write_labels(labels, affine, header, path)
    elif suffix in VOLUME_FORMATS["TIFF"]:
        tiff_file.write_tiff_labels(labels, affine, path)
    elif suffix is not None:
        itk_file.write_itk_labels(labels, affine, path)
    else:
        raise ValueError(f"{path}: output name must end in one of {', '.join(_SUFFIXES)}")

