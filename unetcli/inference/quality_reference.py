"""The training cases' reference measures for quality checks, made when a run is trained and kept
in its checkpoints' metadata (``quality_reference``): what ``unet predict`` compares new cases with.

Measured on the cases as the network trained on them (preprocessed, normalised, on the network's
grid) with their label maps, by the same functions that measure a predicted case
(:mod:`unetcli.inference.quality_signals`); the geometry comes from the files' headers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from unetcli.data.scan_geometry import ScanGeometry, image_geometry, read_scan_geometry
from unetcli.data.types import Dataset, DatasetFiles
from unetcli.inference.quality_signals import measure_case, paint_training_labels, training_reference


def _whole_cases(dataset: Dataset, names: Sequence[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(case name, image, label) of each training case; the slices of a 2D-on-3D dataset
    (``NAME@z``) stacked back into their volume, as the network predicts it slice by slice."""
    wanted = set(names)
    chosen = [c for c in dataset.cases if c.name in wanted and c.label is not None]
    if (dataset.preprocessing or {}).get("slice_axis") is None:
        for case in chosen:
            yield case.name, np.asarray(case.image), np.asarray(case.label)
        return
    volumes: dict[str, list] = {}
    for case in chosen:
        volumes.setdefault(case.name.rsplit("@", 1)[0], []).append(case)
    for name, slices in volumes.items():
        yield name, np.stack([s.image for s in slices], axis=1), np.stack([s.label for s in slices])


def reference_from_dataset(files: DatasetFiles, dataset: Dataset, names: Sequence[str]) -> dict[str, Any] | None:
    """The reference measures of the training cases ``names`` (None if there are none)."""
    geometry_of = {c.name: c.images[0] for c in files.cases}
    three_d = dataset.file_format == "nifti"
    preprocessing = dataset.preprocessing or {}
    voxel = float(np.prod(preprocessing["target_spacing"])) / 1000 if three_d else 1.0
    structures = dataset.num_classes if dataset.regions is not None else dataset.num_classes - 1
    measures, measured_names = [], []
    for name, image, label in _whole_cases(dataset, names):
        geometry: ScanGeometry = read_scan_geometry(geometry_of[name]) if three_d else image_geometry(image.shape[1:])
        painted = paint_training_labels(label, dataset.num_classes, dataset.regions)
        measures.append(measure_case(geometry, image, painted, structures, voxel))
        measured_names.append(name)
    return training_reference(measures, "mL" if three_d else "px", measured_names) if measures else None
