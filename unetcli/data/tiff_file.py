"""The TIFF backend (tifffile): 3D ``(Z, Y, X)`` stacks with their voxel spacing.

A TIFF has no orientation or origin: volumes get an axis-aligned affine ``diag(x, y, z)`` at the origin.
The spacing comes, first found first, from a sidecar ``NAME.json`` holding ``{"spacing": [z, y, x]}``
next to ``NAME.tif`` (nnU-Net's convention), or from ImageJ metadata (``spacing`` for z, the
XResolution/YResolution tags, in pixels per unit, for x and y). A 3D TIFF with neither is refused:
guessing 1 mm would silently train on, and predict at, the wrong scale. Values are taken in the file's
own unit (mm for medical scans). Masks are written with both (ImageJ metadata and the sidecar).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import tifffile

from unetcli.atomic import atomic_path, atomic_write_text
from unetcli.errors import DataError

_HINT = "re-export the file or remove it"


def sidecar_path(path: Path) -> Path:
    """``case_0000.tif`` -> ``case_0000.json`` (same folder, same stem)."""
    name = Path(path).name
    stem = name[: -len(".tiff")] if name.lower().endswith(".tiff") else name[: -len(".tif")]
    return Path(path).with_name(stem + ".json")


def _sidecar_spacing(path: Path) -> tuple[float, float, float] | None:
    """(x, y, z) from ``{"spacing": [z, y, x]}`` in the sidecar, None without a sidecar."""
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return None
    try:
        spacing = json.loads(sidecar.read_text(encoding="utf-8"))["spacing"]
        values = [float(v) for v in spacing]
        if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"expected 3 positive numbers, got {spacing}")
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise DataError(f"{sidecar}: not a usable spacing sidecar for {path.name} ({type(exc).__name__}: {exc})",
                        hint='it must hold {"spacing": [z, y, x]} in mm') from exc
    return values[2], values[1], values[0]


def _imagej_spacing(tif: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """(x, y, z) from ImageJ calibration: ``spacing`` (z) and the resolution tags (pixels per unit)."""
    meta = tif.imagej_metadata or {}
    tags = tif.pages[0].tags
    if "spacing" not in meta or "XResolution" not in tags or "YResolution" not in tags:
        return None
    try:
        x = _per_pixel(tags["XResolution"].value)
        y = _per_pixel(tags["YResolution"].value)
        z = float(meta["spacing"])
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return (x, y, z) if all(math.isfinite(v) and v > 0 for v in (x, y, z)) else None


def _per_pixel(rational: tuple[int, int]) -> float:
    numerator, denominator = rational
    return float(denominator) / float(numerator)


def _spacing(path: Path, tif: tifffile.TiffFile) -> tuple[float, float, float]:
    spacing = _sidecar_spacing(path) or _imagej_spacing(tif)
    if spacing is None:
        # How to fix it is in the message itself: a dataset's problems are listed together under one hint.
        raise DataError(f"{path}: 3D TIFF without voxel spacing (no ImageJ calibration): add {sidecar_path(path).name} next to it "
                        'holding {"spacing": [z, y, x]} in mm, as nnU-Net does',
                        hint=f'write {sidecar_path(path)} holding {{"spacing": [z, y, x]}} (mm)')
    return spacing


def _check_complete(path: Path, tif: tifffile.TiffFile) -> None:
    """tifffile reads what is there of a truncated file (and only logs a warning): check the pages first."""
    size = path.stat().st_size
    expected = int((tif.imagej_metadata or {}).get("images", 0) or 0)
    if expected > len(tif.pages):
        raise DataError(f"{path}: file is truncated ({len(tif.pages)} of {expected} images)", hint=_HINT)
    for page in tif.pages:
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts)]
        if ends and max(ends) > size:
            raise DataError(f"{path}: file is truncated (image data ends at byte {max(ends)}, the file has {size})", hint=_HINT)


def _open(path: Path) -> tifffile.TiffFile:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)", hint="re-export or remove it")
    try:
        return tifffile.TiffFile(str(path))
    except Exception as exc:  # noqa: BLE001 - tifffile raises many types for damaged files
        raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})", hint=_HINT) from exc


def _affine(spacing: tuple[float, float, float]) -> np.ndarray:
    return np.diag([*spacing, 1.0])


def _shape_3d(path: Path, shape: tuple[int, ...], axes: str) -> None:
    if len(shape) != 3:
        raise DataError(f"{path}: expected a 3D (Z, Y, X) TIFF stack, got shape {shape} (axes {axes})",
                        hint="store one 3D stack per file (one file per channel: NAME_0000.tif, NAME_0001.tif)")


def read_tiff(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels (X, Y, Z), affine)`` of a 3D TIFF stack; DataError naming the file when damaged or without spacing."""
    path = Path(path)
    with _open(path) as tif:
        _check_complete(path, tif)
        series = tif.series[0]
        _shape_3d(path, tuple(series.shape), series.axes)
        spacing = _spacing(path, tif)
        try:
            data = series.asarray()
        except Exception as exc:  # noqa: BLE001 - decoding errors of damaged strips come in many types
            raise DataError(f"{path}: not a readable TIFF file ({type(exc).__name__}: {exc})", hint=_HINT) from exc
    return np.transpose(data), _affine(spacing)


def tiff_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape (X, Y, Z), affine)`` without decoding the voxels."""
    path = Path(path)
    with _open(path) as tif:
        series = tif.series[0]
        _shape_3d(path, tuple(series.shape), series.axes)
        return tuple(int(n) for n in series.shape[::-1]), _affine(_spacing(path, tif))


def write_tiff_labels(labels: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write an int ``(X, Y, Z)`` label map as an ImageJ ``(Z, Y, X)`` TIFF (uint8, or uint16 above 255) with its
    spacing in the ImageJ calibration and in a ``{"spacing": [z, y, x]}`` sidecar, both atomically."""
    labels = np.asarray(labels)
    high = int(labels.max()) if labels.size else 0
    if labels.size and (int(labels.min()) < 0 or high > 65535):
        raise ValueError("label values must be in 0..65535")
    x, y, z = (float(v) for v in np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0))
    stack = np.ascontiguousarray(np.transpose(labels).astype(np.uint8 if high < 256 else np.uint16))
    atomic_write_text(sidecar_path(path), json.dumps({"spacing": [z, y, x]}))
    with atomic_path(path) as tmp:
        tifffile.imwrite(str(tmp), stack, imagej=True, resolution=(1.0 / x, 1.0 / y),
                         metadata={"spacing": z, "unit": "mm", "axes": "ZYX"}, compression="zlib")
