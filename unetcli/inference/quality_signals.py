"""Per-case measurements that tell a scan or a prediction apart from the training cases.

The same functions measure the training cases (their preprocessed images and labels, when a run
is trained: :func:`training_reference`) and every case ``unet predict`` sees (its preprocessed
image and the network's label map), so that both sides are measured on the same grid, after the
same normalisation. What the training cases gave is stored in the checkpoint's metadata as
``quality_reference``; :mod:`unetcli.inference.quality` compares a case with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unetcli.data.scan_geometry import ScanGeometry

REFERENCE_VERSION = 1
QUANTILES = np.linspace(0.0, 1.0, 101)
"""The intensity distribution of a case is kept as these quantiles (0 %, 1 %, ..., 100 %)."""
SHAPE_RANGE = slice(1, 100)
"""Quantiles 1 % .. 99 % compared for the distribution's shape (the extremes are single voxels)."""
MAX_SAMPLES = 2_000_000
"""Quantiles of larger volumes are taken on every n-th voxel (the same rule for training and prediction)."""
DRIFT_BLOCK = {2: 16, 3: 8}
"""Edge, in network-grid voxels, of the blocks whose mean intensities :func:`intensity_drift` compares."""
DRIFT_MIN_BLOCKS = 4


@dataclass
class CaseMeasures:
    """What one case (training or predicted) gave, on the network's grid."""

    geometry: ScanGeometry
    quantiles: list[list[float]] | None
    """Per channel, :data:`QUANTILES` of the normalised intensities inside the (predicted) structures;
    None when there are none."""
    volumes: list[float]
    """Per foreground output (class or region), its volume: mL on a 3D grid, pixels in 2D."""
    outside_largest: list[float]
    """Per foreground output, the share of its voxels outside its largest connected piece (0 if empty)."""
    pieces: list[int]
    """Per foreground output, its number of face-connected pieces."""
    drift: list[list[float]] | None = None
    """Per channel and foreground output, :func:`intensity_drift` (NaN where the structure is too small)."""


def intensity_quantiles(image: np.ndarray, foreground: np.ndarray) -> list[list[float]] | None:
    """Per channel of a normalised (C, *S) image: the :data:`QUANTILES` of its intensities inside
    ``foreground`` (the labelled structures of a training case, the predicted ones of a new case:
    intensities of the anatomy, whatever share of the scan is background); None if it is empty."""
    inside = np.asarray(foreground, dtype=bool).ravel()
    if not inside.any():
        return None
    step = max(1, int(np.ceil(inside.size / MAX_SAMPLES)))
    out = []
    for channel in image:
        values = np.asarray(channel, dtype=np.float32).ravel()[::step][inside[::step]]
        if values.size == 0:  # every foreground voxel fell between the samples
            values = np.asarray(channel, dtype=np.float32).ravel()[inside]
        out.append([float(v) for v in np.quantile(values, QUANTILES)])
    return out


def intensity_drift(image: np.ndarray, labels: np.ndarray, num_foreground: int) -> list[list[float]]:
    """How unevenly each structure is lit: per channel of a normalised (C, *S) image and per foreground
    output, the spread (10th to 90th percentile) of the structure's mean intensity over blocks of
    :data:`DRIFT_BLOCK` voxels that it fills at least a quarter of. A bias field (the slow intensity
    drift of a receive coil, which a network trained on corrected scans has not seen) moves these
    block means apart while leaving the structure's overall percentiles in range. NaN where fewer
    than :data:`DRIFT_MIN_BLOCKS` blocks qualify."""
    labels = np.asarray(labels)
    edge = DRIFT_BLOCK.get(labels.ndim, 8)
    blocks = [-(-n // edge) for n in labels.shape]
    padded = tuple((0, b * edge - n) for b, n in zip(blocks, labels.shape))
    shape = [v for b in blocks for v in (b, edge)]
    axes = tuple(range(1, 2 * labels.ndim, 2))

    def block_sums(volume: np.ndarray) -> np.ndarray:
        return np.pad(volume, padded).reshape(shape).sum(axis=axes)

    out: list[list[float]] = [[] for _ in range(len(image))]
    for value in range(1, num_foreground + 1):
        inside = (labels == value).astype(np.float32)
        counts = block_sums(inside)
        filled = counts >= edge ** labels.ndim / 4
        too_small = filled.sum() < DRIFT_MIN_BLOCKS
        for c, channel in enumerate(image):
            if too_small:
                out[c].append(math.nan)
                continue
            means = block_sums(np.asarray(channel, dtype=np.float32) * inside)[filled] / counts[filled]
            low, high = np.percentile(means, [10, 90])
            out[c].append(float(high - low))
    return out


def shape_distance(quantiles: Sequence[float], reference: Sequence[float]) -> float:
    """How far apart two intensity distributions are, in the units of the normalised image (its SDs):
    the mean absolute difference of their 1 % .. 99 % quantiles (the 1-Wasserstein distance, trimmed)."""
    a, b = np.asarray(quantiles)[SHAPE_RANGE], np.asarray(reference)[SHAPE_RANGE]
    return float(np.abs(a - b).mean())


def output_masks(labels: np.ndarray, num_foreground: int) -> Iterable[np.ndarray]:
    """The mask of each foreground output in a label map of painted outputs (1 .. ``num_foreground``)."""
    for value in range(1, num_foreground + 1):
        yield labels == value


def class_volumes(labels: np.ndarray, num_foreground: int, voxel_volume: float) -> list[float]:
    """Per foreground output (label values 1 .. ``num_foreground``), voxels x ``voxel_volume``."""
    counts = np.bincount(np.asarray(labels).ravel().astype(np.int64), minlength=num_foreground + 1)
    return [float(counts[k]) * voxel_volume for k in range(1, num_foreground + 1)]


def fragmentation(labels: np.ndarray, num_foreground: int) -> tuple[list[float], list[int]]:
    """Per foreground output, the share of its voxels outside its largest face-connected piece (0 for
    one solid structure, large for a prediction broken into fragments) and its number of pieces."""
    labels = np.asarray(labels)
    boxes = ndimage.find_objects(labels.astype(np.int64), max_label=num_foreground)
    shares, counts = [], []
    for value, box in zip(range(1, num_foreground + 1), boxes):
        if box is None:
            shares.append(0.0)
            counts.append(0)
            continue
        pieces, count = ndimage.label(labels[box] == value)
        sizes = np.bincount(pieces.ravel())[1:]
        shares.append(float(1.0 - sizes.max() / sizes.sum()) if count > 1 else 0.0)
        counts.append(int(count))
    return shares, counts


def paint_training_labels(label: np.ndarray, num_classes: int, regions: list[list[int]] | None) -> np.ndarray:
    """A training label map (class indices) as a prediction looks: classes as they are (the ignore
    label dropped), or regions painted in order as ``paint_regions`` paints predicted ones."""
    label = np.asarray(label)
    if regions is None:
        return np.where(label < num_classes, label, 0)
    painted = np.zeros(label.shape, np.uint8)
    for k, classes in enumerate(regions):
        painted[np.isin(label, classes)] = k + 1
    return painted


def measure_case(geometry: ScanGeometry, image: np.ndarray, labels: np.ndarray, num_foreground: int,
                 voxel_volume: float) -> CaseMeasures:
    """Everything :class:`CaseMeasures` holds, for one normalised image and a painted label map."""
    return CaseMeasures(geometry, intensity_quantiles(image, np.asarray(labels) > 0),
                        class_volumes(labels, num_foreground, voxel_volume), *fragmentation(labels, num_foreground),
                        drift=intensity_drift(image, labels, num_foreground))


def training_reference(cases: Sequence[CaseMeasures], unit: str, names: Sequence[str]) -> dict:
    """The training cases' measures as plain lists (checkpoint metadata): per case geometry,
    intensity percentiles and distance to the training distribution, structure volumes and
    fragmentation; plus the training distribution itself (the mean of the cases' quantiles,
    their 1-Wasserstein barycentre)."""
    measured = [c for c in cases if c.quantiles is not None]
    centre = np.asarray([c.quantiles for c in measured], dtype=np.float64).mean(axis=0) if measured else np.zeros((0, 0))
    return {
        "version": REFERENCE_VERSION,
        "cases": len(cases),
        "unit": unit,
        "names": list(names),
        "spacing": [list(c.geometry.spacing) for c in cases],
        "field_of_view": [list(c.geometry.field_of_view) for c in cases],
        "obliquity_deg": [c.geometry.obliquity_deg for c in cases],
        "axis_codes": sorted({c.geometry.axis_codes for c in cases}),
        "intensity_quantiles": [[float(v) for v in channel] for channel in centre],
        "intensity_percentiles": [None if c.quantiles is None else [[q[1], q[50], q[99]] for q in c.quantiles] for c in cases],
        "intensity_shape": [None if c.quantiles is None else [shape_distance(q, ref) for q, ref in zip(c.quantiles, centre)]
                            for c in cases],
        "volumes": [c.volumes for c in cases],
        "outside_largest": [c.outside_largest for c in cases],
        "intensity_drift": [c.drift for c in cases],
    }


PER_CASE_KEYS = ("spacing", "field_of_view", "obliquity_deg", "volumes", "outside_largest", "intensity_percentiles",
                 "intensity_shape")
"""The reference's lists with one entry per training case (intensities: None for a case without structures)."""
OPTIONAL_PER_CASE_KEYS = ("intensity_drift",)
"""Per-case lists that references made by earlier versions lack (their signals are then not checked)."""


def merge_references(references: Sequence[dict]) -> dict | None:
    """One reference for several models trained on overlapping cases (the folds of a
    cross-validation): every case once, by name; the intensity distribution is the mean of theirs
    (each case's distance to it stays the one measured in its first model's reference)."""
    usable = [r for r in references if isinstance(r, dict) and r.get("cases")]
    if not usable:
        return None
    merged: dict = {**usable[0], "names": [], "axis_codes": sorted({c for r in usable for c in r["axis_codes"]})}
    keys = PER_CASE_KEYS + tuple(k for k in OPTIONAL_PER_CASE_KEYS if all(k in r for r in usable))
    for key in (*PER_CASE_KEYS, *OPTIONAL_PER_CASE_KEYS):
        merged.pop(key, None)
    for key in keys:
        merged[key] = []
    for reference in usable:
        for i, name in enumerate(reference["names"]):
            if name not in merged["names"]:
                merged["names"].append(name)
                for key in keys:
                    merged[key].append(reference[key][i])
    merged["cases"] = len(merged["names"])
    merged["intensity_quantiles"] = np.mean([r["intensity_quantiles"] for r in usable], axis=0).tolist()
    return merged
