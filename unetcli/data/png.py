"""Reading and writing 2D PNG images and masks (Pillow, which scikit-image already depends on).

Pillow is used directly rather than through ``skimage.io`` because masks saved as palette
("P" mode) PNGs must be read as their raw indices, not expanded to colours.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from unetcli.atomic import atomic_path
from unetcli.errors import DataError

PNG_SUFFIX = ".png"


def _open(path: Path) -> Image.Image:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)", hint="re-export or remove it")
    try:
        img = Image.open(path)
        img.load()  # decode now so truncated data fails here, with the file's name
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: not a readable PNG image ({exc})", hint="re-export the file or remove it") from exc
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: image is too large to decode safely ({exc})") from exc
    return img


def read_png_image(path: Path) -> np.ndarray:
    """Read an image as float32 (C, H, W): grayscale (8/16-bit) -> C=1, RGB -> C=3.

    An alpha channel is dropped; palette images are expanded to RGB.
    """
    img = _open(path)
    if img.mode in ("1", "L", "LA", "P", "PA"):
        img = img.convert("L") if img.mode in ("1", "L", "LA") else img.convert("RGB")
    elif img.mode in ("RGBA", "RGBX", "CMYK", "YCbCr"):
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3:
        arr = np.moveaxis(arr, -1, 0)
    else:
        raise DataError(f"{path}: unsupported image layout with shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.float32)


def read_png_mask(path: Path) -> np.ndarray:
    """Read a mask of class indices as int64 (H, W).

    Grayscale and palette masks give their stored values (palette indices, not colours).
    RGB(A) masks are accepted only when R == G == B (a grayscale mask saved as colour).
    """
    img = _open(path)
    arr = np.asarray(img)
    if img.mode == "1":
        arr = arr.astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] < 3:  # grayscale + alpha: the alpha is not a label
        arr = arr[..., 0]
    if arr.ndim == 3:
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            raise DataError(
                f"{path}: mask is a colour ({img.mode}) image; masks must hold one class index per pixel",
                hint="save masks as 8-bit grayscale or palette PNGs with values 0..K-1",
            )
        arr = rgb[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{path}: mask must be 2D, got shape {arr.shape}")
    return arr.astype(np.int64)


def write_png_mask(labels: np.ndarray, path: Path) -> None:
    """Write an (H, W) label map as 8-bit (or 16-bit if a value exceeds 255) PNG, atomically."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"expected an (H, W) label map, got shape {labels.shape}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError("label values must be in 0..65535 to be written as PNG")
    dtype = np.uint8 if labels.max(initial=0) <= 255 else np.uint16
    img = Image.fromarray(labels.astype(dtype))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG", optimize=True)
