"""DICOM series (SimpleITK / GDCM): find every series under a folder, check it, read it as one volume.

A series is the set of files sharing a SeriesInstanceUID. Before it is read, each file's header is
checked: every slice must have the same size, pixel spacing and orientation, no two slices may sit
at the same position and the slices must be evenly spaced along the slice normal (a gap means a
missing file). SimpleITK would otherwise read such a set silently into a distorted volume. The
volume comes back in the internal ``(X, Y, Z)`` order with its voxel -> RAS affine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from unetcli.data.itk_file import captured_stderr, run_reader, to_internal_axes, itk_affine
from unetcli.errors import DataError

_POSITION, _ORIENTATION, _ROWS, _COLUMNS, _PIXEL_SPACING = "0020|0032", "0020|0037", "0028|0010", "0028|0011", "0028|0030"
_SERIES_NUMBER = "0020|0011"
_HINT = "export each series to its own folder, complete, or remove the stray files"
_GEOMETRY_ATOL = 1e-3
_GAP_TOLERANCE = 0.2
"""A step between neighbouring slices may differ from the series' usual step by this fraction."""


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series: its folder, SeriesInstanceUID and files (in GDCM's order)."""

    folder: Path
    uid: str
    files: tuple[Path, ...]

    def __str__(self) -> str:
        return f"{self.folder} (DICOM series {self.uid})"


@dataclass(frozen=True)
class _Slice:
    path: Path
    size: tuple[int, int]
    spacing: tuple[float, ...]
    orientation: tuple[float, ...]
    position: tuple[float, ...]


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or any file with the DICOM preamble (``DICM`` at byte 128)."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def find_dicom_series(root: Path) -> list[DicomSeries]:
    """Every series in ``root`` and its sub-folders, sorted by folder and UID."""
    found = []
    for folder in sorted({p.parent for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith(".") and is_dicom_file(p)}):
        with captured_stderr():
            uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
            for uid in sorted(uids):
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
                found.append(DicomSeries(folder, uid, tuple(Path(f) for f in files)))
    return found


def series_case_names(series: list[DicomSeries], root: Path) -> dict[str, DicomSeries]:
    """A file-name-safe case name per series: its folder's path under ``root`` (``root``'s own name for
    series directly in it), plus the SeriesNumber (or, failing that, the UID) when a folder holds several."""
    names: dict[str, DicomSeries] = {}
    for item in series:
        relative = item.folder.relative_to(root).parts if item.folder != Path(root) else (Path(root).resolve().name,)
        base = _safe("_".join(relative))
        siblings = [s for s in series if s.folder == item.folder]
        name = base if len(siblings) == 1 else f"{base}_{_safe(_tag(item.files[0], _SERIES_NUMBER) or item.uid)}"
        if name in names:
            name = f"{base}_{_safe(item.uid)}"
        names[name] = item
    return names


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()) or "series"


def _tag(path: Path, key: str) -> str | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with captured_stderr():
        reader.ReadImageInformation()
    return reader.GetMetaData(key).strip() if reader.HasMetaDataKey(key) else None


def _numbers(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.strip().split("\\") if v.strip())


def _read_slice(path: Path) -> _Slice:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    run_reader(path, reader.ReadImageInformation, "DICOM")
    try:
        values = {key: reader.GetMetaData(key) for key in (_POSITION, _ORIENTATION, _ROWS, _COLUMNS)}
        spacing = _numbers(reader.GetMetaData(_PIXEL_SPACING)) if reader.HasMetaDataKey(_PIXEL_SPACING) else (1.0, 1.0)
        return _Slice(path, (int(values[_ROWS]), int(values[_COLUMNS])), spacing, _numbers(values[_ORIENTATION]),
                      _numbers(values[_POSITION]))
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"{path}: DICOM file lacks a usable slice position, orientation or size ({exc})",
                        hint="only image series with ImagePositionPatient and ImageOrientationPatient can be read") from exc


def _check_same_grid(series: DicomSeries, slices: list[_Slice]) -> None:
    first = slices[0]
    for other in slices[1:]:
        differs = [what for what, a, b in (("size", first.size, other.size), ("pixel spacing", first.spacing, other.spacing),
                                           ("orientation", first.orientation, other.orientation))
                   if len(a) != len(b) or not np.allclose(a, b, atol=_GEOMETRY_ATOL)]
        if differs:
            raise DataError(f"{series}: slices of clashing geometry in one series: {other.path} and {first.path} differ in "
                            f"{', '.join(differs)} ({_describe(other)} vs {_describe(first)})", hint=_HINT)


def _describe(item: _Slice) -> str:
    return f"{item.size[1]}x{item.size[0]}, spacing {'/'.join(f'{v:g}' for v in item.spacing)}, " \
           f"orientation {'/'.join(f'{v:.3g}' for v in item.orientation)}"


def _check_spacing(series: DicomSeries, slices: list[_Slice]) -> list[_Slice]:
    """Slices sorted along the normal; DataError for two slices at one position or a gap (missing slices)."""
    row, column = np.asarray(slices[0].orientation[:3]), np.asarray(slices[0].orientation[3:6])
    normal = np.cross(row, column)
    ordered = sorted(slices, key=lambda s: float(np.dot(normal, s.position)))
    if len(ordered) < 2:
        return ordered
    depth = np.array([float(np.dot(normal, s.position)) for s in ordered])
    steps = np.diff(depth)
    for k in np.flatnonzero(steps < _GEOMETRY_ATOL):
        raise DataError(f"{series}: {ordered[k].path} and {ordered[k + 1].path} are at the same slice position",
                        hint=_HINT)
    usual = float(np.median(steps))
    for k in np.flatnonzero(np.abs(steps - usual) > _GAP_TOLERANCE * usual):
        missing = max(int(round(steps[k] / usual)) - 1, 0)
        raise DataError(f"{series}: slices are not evenly spaced: {steps[k]:.3g} mm between {ordered[k].path.name} and "
                        f"{ordered[k + 1].path.name}, {usual:.3g} mm elsewhere"
                        + (f" (about {missing} missing slice(s))" if missing else ""), hint=_HINT)
    return ordered


def checked_files(series: DicomSeries) -> list[Path]:
    """The series' files in slice order, after the geometry checks (DataError naming the files otherwise)."""
    slices = [_read_slice(path) for path in series.files]
    if not slices:
        raise DataError(f"{series}: no files in the series")
    _check_same_grid(series, slices)
    return [s.path for s in _check_spacing(series, slices)]


def read_dicom_series(series: DicomSeries) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels (X, Y, Z), affine)`` of a checked series."""
    files = checked_files(series)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    image = run_reader(files[0], reader.Execute, "DICOM series")
    return to_internal_axes(sitk.GetArrayFromImage(image), image.GetDimension()), \
        itk_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def read_dicom_geometry(series: DicomSeries) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape (X, Y, Z), affine)`` from the headers (the series is checked, its pixels not decoded)."""
    data_files = checked_files(series)
    first, last = _read_slice(data_files[0]), _read_slice(data_files[-1])
    row, column = np.asarray(first.orientation[:3]), np.asarray(first.orientation[3:6])
    normal = np.cross(row, column)
    step = (float(np.dot(normal, last.position) - np.dot(normal, first.position)) / (len(data_files) - 1)
            if len(data_files) > 1 else 1.0)
    direction = np.stack([row, column, normal], axis=1)
    spacing = (first.spacing[1], first.spacing[0], step)  # PixelSpacing is (between rows, between columns)
    affine = itk_affine(spacing, first.position, tuple(direction.ravel()))
    return (first.size[1], first.size[0], len(data_files)), affine
