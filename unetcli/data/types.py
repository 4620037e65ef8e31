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
class Regions:
    """nnU-Net-style regions: each a set of stored label values, trained with one sigmoid output.

    ``order`` (``regions_class_order``) is the label value written for each region when a
    prediction is turned back into a label map, painted in the listed order (later regions win).
    """

    names: list[str]
    values: list[list[int]]
    order: list[int]


@dataclass
class DatasetFiles:
    root: Path
    layout: str
    """``images_masks`` or ``nnunet``."""
    cases: list[CaseFiles]
    label_names: list[str] | None = None
    channel_names: list[str] | None = None
    file_format: str = "png"
    """``png`` or ``nifti``: 3D volumes of any format (NIfTI, MetaImage, NRRD, TIFF); the name predates
    the other formats and stays, as it is stored in checkpoints."""
    regions: Regions | None = None
    """Overlapping regions declared in ``dataset.json`` (labels given as lists)."""


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
    """Network outputs: classes incl. background, or regions."""
    in_channels: int
    spatial_dims: int
    label_values: list[int]
    """Value written in predicted masks for each predicted index (``[0, 255]`` for binary 0/255
    masks; ``[0, *regions_class_order]`` for a region model)."""
    label_names: list[str]
    """Name of each predicted index (index 0 is background)."""
    channel_names: list[str]
    file_format: str = "png"
    preprocessing: dict | None = None
    """3D: how volumes were reoriented, cropped, resampled and normalised (repeated at prediction)."""
    regions: list[list[int]] | None = None
    """Region model: the class indices (of ``Case.label``) each region holds; ``num_classes`` is then
    the number of regions (one sigmoid output each)."""
    ignore_index: int | None = None
    """Class index in ``Case.label`` of the ``ignore`` label (unlabelled voxels), left out of the
    loss, the validation and foreground sampling; with classes it is ``num_classes``."""
