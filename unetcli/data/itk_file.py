"""The SimpleITK backend: MetaImage (``.mha`` / ``.mhd``) and NRRD (``.nrrd``, Slicer's ``.seg.nrrd``) files.

SimpleITK gives arrays as ``(Z, Y, X[, C])`` with origin and direction in LPS; they are turned
into the internal ``(X, Y, Z[, C])`` arrays and voxel -> RAS affines here, and back when writing:
``affine[:3, :3] = F @ direction @ diag(spacing)``, ``affine[:3, 3] = F @ origin`` with
``F = diag(-1, -1, 1)`` (LPS -> RAS). The full direction matrix is kept, oblique ones included.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import SimpleITK as sitk

from unetcli.atomic import atomic_path
from unetcli.errors import DataError, OutputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_HINT = "re-export the file or remove it"
_STDERR_LOCK = threading.Lock()
T = TypeVar("T")


@contextlib.contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect what ITK's C++ readers print on stderr (MetaIO reports a truncated file only there), so that
    it becomes part of one clear error instead of stray lines on the user's terminal."""
    lines: list[str] = []
    with _STDERR_LOCK, tempfile.TemporaryFile(mode="w+b") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode("utf-8", "replace").splitlines())


def _reason(exc: Exception, printed: list[str]) -> str:
    """A short reason from ITK's long exception text and whatever its readers printed."""
    text = printed + str(exc).splitlines()
    if any("not read completely" in line for line in text):
        return "file is truncated, the voxel data ends early"
    nrrd = [re.sub(r"^\[nrrd\]\s*\w+:\s*", "", line) for line in text if line.startswith("[nrrd]")]
    nrrd = [line for line in nrrd if line and not line.startswith("trouble reading") and line != "trouble"]
    if nrrd:
        return "bad NRRD header: " + "; ".join(nrrd[:2])
    errors = [re.sub(r"^.*?ERROR:\s*\w+\(0x[0-9a-f]+\):\s*", "", line) for line in text if "ERROR" in line]
    return (errors or [line for line in text if line.strip()] or ["unknown reason"])[0].strip()


def run_reader(path: Path, read: Callable[[], T], what: str) -> T:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)", hint="re-export or remove it")
    printed: list[str] = []
    try:
        with captured_stderr() as printed:
            return read()
    except RuntimeError as exc:
        raise DataError(f"{path}: not a readable {what} file ({_reason(exc, printed)})", hint=_HINT) from exc


def _kind(path: Path) -> str:
    return "NRRD" if path.name.lower().endswith(".nrrd") else "MetaImage"


def itk_affine(spacing: tuple[float, ...], origin: tuple[float, ...], direction: tuple[float, ...]) -> np.ndarray:
    """4x4 voxel (x, y, z) -> RAS mm affine of an ITK image (any dimension; a 2D image gets z spacing 1)."""
    dim = len(spacing)
    n = min(dim, 3)
    rotation, sizes, corner = np.eye(3), np.ones(3), np.zeros(3)
    rotation[:n, :n] = np.reshape(direction, (dim, dim))[:n, :n]
    sizes[:n], corner[:n] = spacing[:n], origin[:n]
    affine = np.eye(4)
    affine[:3, :3] = LPS_TO_RAS @ rotation @ np.diag(sizes)
    affine[:3, 3] = LPS_TO_RAS @ corner
    return affine


def itk_geometry_of(affine: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin, direction) in ITK's LPS terms for a voxel -> RAS affine (inverse of :func:`itk_affine`)."""
    matrix = LPS_TO_RAS @ np.asarray(affine, np.float64)[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    direction = matrix / spacing
    origin = LPS_TO_RAS @ np.asarray(affine, np.float64)[:3, 3]
    return tuple(spacing.tolist()), tuple(origin.tolist()), tuple(direction.ravel().tolist())


def to_internal_axes(array: np.ndarray, dimension: int) -> np.ndarray:
    """SimpleITK's ``(..., Y, X[, C])`` (spatial axes reversed) -> ``(X, Y, ...[, C])``."""
    order = list(range(dimension))[::-1] + list(range(dimension, array.ndim))
    return np.transpose(array, order)


def read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels (X, Y, Z[, C]), affine)`` of a MetaImage or NRRD file; DataError naming it when unreadable."""
    path = Path(path)
    image = run_reader(path, lambda: sitk.ReadImage(str(path)), _kind(path))
    data = to_internal_axes(sitk.GetArrayFromImage(image), image.GetDimension())
    return data, itk_affine(image.GetSpacing(), image.GetOrigin(), image.GetDirection())


def itk_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape (X, Y, Z[, C]), affine)`` from the header only."""
    path = Path(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    run_reader(path, reader.ReadImageInformation, _kind(path))
    components = reader.GetNumberOfComponents()
    shape = tuple(int(n) for n in reader.GetSize()) + ((components,) if components > 1 else ())
    return shape, itk_affine(reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())


def write_itk_labels(labels: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write an int ``(X, Y, Z)`` label map (uint8, or uint16 above 255) as compressed MetaImage or NRRD, atomically."""
    labels = np.asarray(labels)
    high = int(labels.max()) if labels.size else 0
    if labels.size and (int(labels.min()) < 0 or high > 65535):
        raise ValueError("label values must be in 0..65535")
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(labels.astype(np.uint8 if high < 256 else np.uint16))))
    spacing, origin, direction = itk_geometry_of(affine)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    with atomic_path(path) as tmp:  # the temporary name keeps the suffix: SimpleITK picks the writer by it
        try:
            sitk.WriteImage(image, str(tmp), True)
        except RuntimeError as exc:
            raise OutputError(f"{path}: cannot write ({_reason(exc, [])})",
                              hint=f"check the free space and permissions of {Path(path).parent}") from exc
