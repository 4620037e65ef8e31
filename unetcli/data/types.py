"""The dataset types every layer shares: the files of a dataset, and the loaded cases."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class CaseFiles:
    """The files of one case: one image file per channel and an optional label map."""

    name: str
    images: list[Path]
    label: Path | None


@dataclass
class DatasetFiles:
    root: Path
    layout: str
    """``images_masks`` or ``nnunet``."""
    cases: list[CaseFiles]
    label_names: list[str] | None = None
    channel_names: list[str] | None = None
    file_format: str = "png"
    """``png`` or ``nifti``."""


@dataclass
class Case:
    """A loaded case: normalised image (C, *S) float32 and class-index labels (*S) int64."""

    name: str
    image: np.ndarray
    label: np.ndarray | None


@dataclass
class Dataset:
    cases: list[Case]
    num_classes: int
    in_channels: int
    spatial_dims: int
    label_values: list[int]
    """Value stored in the mask files for each class index (``[0, 255]`` for binary 0/255 masks)."""
    label_names: list[str]
    channel_names: list[str]
    file_format: str = "png"
    preprocessing: dict | None = None
    """3D: how volumes were reoriented, cropped, resampled and normalised (repeated at prediction)."""
