"""The NIfTI backend (nibabel): parse a ``.nii`` / ``.nii.gz`` file completely, write a label map with its header.

Files are decompressed completely in memory before nibabel parses them, so a damaged ``.nii.gz``
(truncated, bit flips caught only by the gzip CRC at the end of the stream) is reported as a
``DataError`` naming the file instead of being read as silently corrupted voxels.
"""

from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from unetcli.atomic import atomic_path
from unetcli.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_HINT = "re-export the file or remove it"


def load(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Parse one file fully (gzip CRC checked) -> (image, raw voxel array); failures are DataErrors naming it."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    if not raw:
        raise DataError(f"{path}: file is empty (0 bytes)", hint="re-export or remove it")
    if raw[:2] == _GZIP_MAGIC:
        try:
            # GzipFile (not gzip.decompress) so trailing zero padding is accepted as by nibabel.
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
                raw = stream.read()
        except (OSError, EOFError, zlib.error, ValueError) as exc:  # BadGzipFile is an OSError
            raise DataError(f"{path}: damaged gzip data ({type(exc).__name__}: {exc})", hint=_HINT) from exc
    image_class = _image_class(raw)
    if image_class is None:
        named_gz = path.name.lower().endswith(".gz") and raw[:2] != _GZIP_MAGIC
        raise DataError(f"{path}: not a NIfTI file ({'named .gz but not a gzip file, and ' if named_gz else ''}"
                        "no NIfTI-1/NIfTI-2 header)", hint=_HINT)
    try:
        img = image_class.from_bytes(raw)
        needed = int(img.header.get_data_offset()) + math.prod(img.shape) * img.header.get_data_dtype().itemsize
        if needed > len(raw):  # checked before nibabel allocates what a damaged header claims
            raise DataError(f"{path}: file is truncated or its header is damaged (header describes {needed} "
                            f"bytes, the file holds {len(raw)})", hint=_HINT)
        data = np.asanyarray(img.dataobj)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel/numpy raise many types for corrupt headers
        raise DataError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})", hint=_HINT) from exc
    return img, data


def _image_class(raw: bytes) -> type[nib.Nifti1Image] | None:
    """Nifti1Image or Nifti2Image from the header-size field and the single-file magic, else None."""
    for cls, size, magic_at, magic in ((nib.Nifti1Image, 348, 344, b"n+1\0"), (nib.Nifti2Image, 540, 4, b"n+2\0")):
        if len(raw) < size:
            continue
        sizeof_hdr = {int.from_bytes(raw[:4], "little"), int.from_bytes(raw[:4], "big")}
        if size in sizeof_hdr and raw[magic_at : magic_at + 4] == magic:
            return cls
    return None


def header_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """``(shape, affine)`` from the header alone; the full read validates the file later."""
    try:
        img = nib.load(str(path))
        return tuple(int(n) for n in img.shape), np.asarray(img.affine, np.float64)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for damaged headers
        raise DataError(f"{path}: cannot read the NIfTI header ({type(exc).__name__}: {exc})",
                        hint="re-export or remove the file") from exc


def _fresh_header(affine: np.ndarray) -> nib.Nifti1Header:
    """A header for a mask whose scan was not NIfTI: the affine as both sform and qform, code 'scanner'
    (a qform cannot hold a shear; nibabel then keeps the sform, which is exact)."""
    img = nib.Nifti1Image(np.zeros((1, 1, 1), np.uint8), affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    return img.header


def write_labels(labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None, path: Path) -> None:
    """Write an int ``(X, Y, Z)`` label map as NIfTI, atomically, with ``affine`` and a copy of ``header``.

    qform/sform (and their codes), pixdim and units of ``header`` are kept (a fresh header is made when
    the scan was not NIfTI); the data type becomes uint8 (max < 256), int16 (< 32768) or uint16
    (< 65536); scl_slope/scl_inter are reset to 1/0 so integers are stored exactly; ``dim`` becomes 3D
    when the input was 4D; cal_min/cal_max and the intent are cleared. ``path`` must end in ``.nii.gz``
    (gzip, deterministic bytes) or ``.nii``.
    """
    labels = np.asarray(labels)
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high > 65535:
        raise ValueError("label values must be in 0..65535 to be written as NIfTI")
    dtype = np.uint8 if high < 256 else np.int16 if high < 32768 else np.uint16
    header = header.copy() if header is not None else _fresh_header(affine)
    header.set_data_dtype(dtype)
    header.set_data_shape(labels.shape)
    header.set_slope_inter(1.0, 0.0)
    header.set_intent("none")
    header["cal_min"], header["cal_max"] = 0, 0
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = image_class(labels.astype(dtype), affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    raw = img.to_bytes()
    if Path(path).name.lower().endswith(".nii.gz"):
        raw = gzip.compress(raw, compresslevel=6, mtime=0)
    elif not Path(path).name.lower().endswith(".nii"):
        raise ValueError(f"{path}: output name must end in .nii.gz or .nii")
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)
