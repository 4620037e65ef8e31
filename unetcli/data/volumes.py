"""3D datasets (NIfTI, MetaImage, NRRD, TIFF): plan, preprocess once, cache on disk, serve memory-mapped arrays.

Preprocessing (the same steps run at prediction time, from parameters stored in the checkpoint):
reorient to RAS -> crop to the non-zero box -> resample to the target spacing -> normalise each
channel (z-score for MRI; for CT, clip to the foreground's 0.5..99.5 percentiles and z-score
with global foreground statistics, as nnU-Net does).

Preprocessed cases are cached as ``.npy`` files keyed by a hash of the input files (path, size,
modification time) and the preprocessing parameters, so later epochs and later runs on unchanged
data skip the decoding and resampling; training reads them memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from unetcli import __version__
from unetcli.atomic import atomic_path, atomic_write_text, ensure_writable_folder
from unetcli.config import DataConfig
from unetcli.data.labels import dataset_label_layout, label_values_from_masks, resolve_names
from unetcli.data.types import Case, CaseFiles, Dataset, DatasetFiles
from unetcli.data.image_io import format_name, volume_geometry
from unetcli.data.tiff_file import sidecar_path
from unetcli.data.nifti import (
    ImageProperties,
    crop_to_nonzero,
    from_canonical,
    read_image,
    read_label,
    resample,
    resample_to_shape,
    to_canonical,
    uncrop,
)
from unetcli.data.preprocessing import normalize_image
from unetcli.data.spacing import fullres_spacing
from unetcli.errors import DataError, UnetCliError

log = logging.getLogger("unetcli")

CACHE_VERSION = 1
CT_NAMES = {"ct"}


def default_cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    env = os.environ.get("UNETCLI_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "unetcli"


@dataclass
class VolumeGeometry:
    """Where a preprocessed volume came from, to map predictions back onto the original grid."""

    crop_box: list[list[int]]
    """Canonical-space crop, [start, stop) per axis."""
    canonical_shape: list[int]
    cropped_shape: list[int]
    """Shape after cropping, before resampling."""

    def box(self) -> tuple[slice, ...]:
        return tuple(slice(a, b) for a, b in self.crop_box)


# --------------------------------------------------------------------------- planning


def _header_geometry(path: Path) -> tuple[tuple[float, float, float], tuple[int, int, int]]:
    """Canonical (RAS) spacing and shape from the header alone (cheap); the full read validates the file later."""
    shape, affine = volume_geometry(path)
    if len(shape) < 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {shape}")
    try:
        _, canonical_affine = to_canonical(np.zeros((1, 1, 1, 1), np.float32), affine)
        ornt = nib.io_orientation(affine)
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise DataError(f"{path}: unusable geometry in the header ({exc})", hint="re-export or remove the file") from exc
    spacing = tuple(float(v) for v in np.linalg.norm(canonical_affine[:3, :3], axis=0))
    canonical = [0, 0, 0]
    for axis, (target, _) in enumerate(ornt):
        canonical[int(target)] = int(shape[axis])
    return spacing, tuple(canonical)  # type: ignore[return-value]


def channel_schemes(channel_names: list[str], n_channels: int, cfg: DataConfig) -> list[str]:
    """Normalisation per channel: ``ct`` for channels named CT (dataset.json), else ``data.normalization``."""
    names = channel_names if len(channel_names) == n_channels else [""] * n_channels
    return ["ct" if n.strip().lower() in CT_NAMES else cfg.normalization for n in names]


def preprocessing_parameters(files: DatasetFiles, cfg: DataConfig) -> dict[str, Any]:
    """The dataset-level preprocessing parameters (target spacing; CT statistics are added later)."""
    problems, spacings, shapes = [], [], []
    for case in files.cases:
        try:
            spacing, shape = _header_geometry(case.images[0])
            spacings.append(spacing)
            shapes.append(shape)
        except DataError as exc:
            problems.append(exc.message)
    if problems:
        raise DataError.from_problems(problems, hint="fix or remove these files, then run again")
    # Without a plan: the planner's rule (data.spacing), on the files' shapes (the plan uses cropped shapes).
    spacing = list(cfg.target_spacing) if cfg.target_spacing else fullres_spacing(spacings, shapes)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise DataError(f"data.target_spacing {spacing} must be 3 positive numbers (mm)")
    first = files.cases[0]
    shape, _ = volume_geometry(first.images[0])
    n_channels = len(first.images) if len(first.images) > 1 else (shape[3] if len(shape) == 4 else 1)
    schemes = channel_schemes(files.channel_names or [], n_channels, cfg)
    plan = {"target_spacing": spacing, "crop_to_nonzero": cfg.crop_to_nonzero, "schemes": schemes, "ct_stats": None}
    if "zscore_nonzero" in schemes:  # only then: other datasets keep their cached volumes
        plan["foreground_mask"] = cfg.foreground_mask
    if "ct" in schemes:
        plan["ct_stats"] = _ct_statistics(files, [c for c, s in enumerate(schemes) if s == "ct"])
    return plan


def _normalise(image: np.ndarray, plan: dict[str, Any], mask: np.ndarray | None = None) -> np.ndarray:
    out = np.empty(image.shape, np.float32)
    for c, scheme in enumerate(plan["schemes"]):
        if scheme == "ct":
            stats = plan["ct_stats"][c]
            out[c] = (np.clip(image[c], stats["lo"], stats["hi"]) - stats["mean"]) / max(stats["std"], 1e-8)
        else:
            # Plans (and checkpoints) from before the robust mask lack the key: they keep the non-zero mask.
            out[c] = normalize_image(image[c : c + 1], scheme, plan.get("foreground_mask", "nonzero"))[0]
    return out


def preprocess(image: np.ndarray, props: ImageProperties, plan: dict[str, Any],
               label: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, VolumeGeometry]:
    """(C, X, Y, Z) image on its file grid -> network-ready (C, X', Y', Z') float32 (+ label)."""
    image, _ = to_canonical(image, props.affine)
    if label is not None:
        label, _ = to_canonical(label, props.affine)
    canonical_shape = list(image.shape[1:])
    if plan["crop_to_nonzero"]:
        image, label, box = crop_to_nonzero(image, label)
    else:
        box = tuple(slice(0, n) for n in canonical_shape)
    cropped_shape = list(image.shape[1:])
    spacing, target = props.canonical_spacing, plan["target_spacing"]
    if not np.allclose(spacing, target, rtol=1e-3):
        image = resample(image.astype(np.float32, copy=False), spacing, target, order=3)
        if label is not None:
            label = resample(label, spacing, target, order=0, new_shape=image.shape[1:])
    image = _normalise(image.astype(np.float32, copy=False), plan)
    geometry = VolumeGeometry([[s.start, s.stop] for s in box], canonical_shape, cropped_shape)
    return image, label, geometry


def restore_labels(probs: np.ndarray, props: ImageProperties, geometry: VolumeGeometry,
                   regions: bool = False) -> np.ndarray:
    """Class probabilities (K, X', Y', Z') on the network grid -> class indices on the file's grid.

    Resampling goes class by class with a running argmax, so memory holds two volumes, not K.
    Region probabilities (``regions``) are painted instead: region k as k + 1 where > 0.5, in order.
    """
    target = tuple(geometry.cropped_shape)
    if regions:
        labels = np.zeros(target, np.int64)
        for k in range(probs.shape[0]):
            pk = probs[k] if tuple(probs.shape[1:]) == target else resample_to_shape(probs[k], target, order=1)
            labels[pk > 0.5] = k + 1
    elif tuple(probs.shape[1:]) == target:
        labels = np.argmax(probs, axis=0)
    else:
        best = np.full(target, -np.inf, np.float32)
        labels = np.zeros(target, np.int64)
        for k in range(probs.shape[0]):
            pk = resample_to_shape(probs[k], target, order=1)
            better = pk > best
            labels[better], best[better] = k, pk[better]
    labels = uncrop(labels.astype(np.int64), geometry.box(), tuple(geometry.canonical_shape), fill=0)
    return from_canonical(labels, props)


def restore_probabilities(probs: np.ndarray, props: ImageProperties, geometry: VolumeGeometry,
                          regions: bool = False) -> np.ndarray:
    """Class (or region) probabilities (K, X', Y', Z') on the network grid -> (K, *file grid),
    linear per channel; outside the crop every voxel is background (probability 1 for class 0)."""
    target = tuple(geometry.cropped_shape)
    out = []
    for k in range(probs.shape[0]):
        pk = probs[k] if tuple(probs.shape[1:]) == target else resample_to_shape(probs[k], target, order=1)
        fill = 1.0 if k == 0 and not regions else 0.0
        out.append(from_canonical(uncrop(pk.astype(np.float32), geometry.box(), tuple(geometry.canonical_shape), fill=fill), props))
    return np.stack(out)


def _resample_labels_smoothly(labels: np.ndarray, target: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(target, labels.dtype)
    best = np.full(target, -1.0, np.float32)
    for k in np.unique(labels):
        pk = resample_to_shape((labels == k).astype(np.float32), target, order=1)
        better = pk > best
        out[better], best[better] = k, pk[better]
    return out


def restore_label_map(labels: np.ndarray, props: ImageProperties, geometry: VolumeGeometry) -> np.ndarray:
    """Class indices (X', Y', Z') on the network grid -> the file's grid.

    Where the grids differ, each class's indicator is resampled linearly and the largest wins
    (nnU-Net's way of resampling segmentations). Nearest neighbour would turn every boundary into
    the network grid's staircase: on scans stored at 1.2-1.7 mm and predicted on a 2 mm grid it
    cost 0.015 mean grey/white-matter Dice (scripts/bench_robustness.py, set ``regrid``). Memory
    stays at two volumes of the file's grid, whatever the number of classes.
    """
    target = tuple(geometry.cropped_shape)
    if tuple(labels.shape) != target:
        labels = _resample_labels_smoothly(labels, target)
    labels = uncrop(labels.astype(np.int64), geometry.box(), tuple(geometry.canonical_shape), fill=0)
    return from_canonical(labels, props)


# --------------------------------------------------------------------------- caching


def _file_stamp(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def _stamps(path: Path) -> list[Any]:
    """The file's stamp, and its spacing sidecar's for a TIFF (a corrected spacing must prepare the case again)."""
    sidecar = sidecar_path(path) if format_name(path) == "TIFF" else None
    return _file_stamp(path) + (_file_stamp(sidecar) if sidecar is not None and sidecar.is_file() else [])


def _cache_key(case: CaseFiles, plan: dict[str, Any]) -> str:
    payload = json.dumps({"images": [_stamps(p) for p in case.images], "label": _stamps(case.label),  # type: ignore[arg-type]
                          "plan": plan, "cache_version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:20]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, array)


def _read_case(case: CaseFiles) -> tuple[np.ndarray, ImageProperties, np.ndarray]:
    image, props = read_image(case.images)
    label = read_label(case.label, reference=props)  # type: ignore[arg-type]
    return image, props, label


def _ct_statistics(files: DatasetFiles, ct_channels: list[int]) -> list[dict[str, float] | None]:
    """Foreground intensity statistics of CT channels over the dataset (one extra read pass)."""
    rng = np.random.default_rng(0)
    samples: dict[int, list[np.ndarray]] = {c: [] for c in ct_channels}
    for case in files.cases:
        image, _, label = _read_case(case)
        for c in ct_channels:
            values = image[c][label > 0]
            if len(values) > 10000:
                values = rng.choice(values, 10000, replace=False)
            samples[c].append(values)
    stats: list[dict[str, float] | None] = []
    for c in range(max(ct_channels) + 1):
        if c not in samples:
            stats.append(None)
            continue
        values = np.concatenate(samples[c]) if samples[c] else np.zeros(1)
        lo, hi = np.percentile(values, [0.5, 99.5])
        clipped = np.clip(values, lo, hi)
        stats.append({"lo": float(lo), "hi": float(hi), "mean": float(clipped.mean()), "std": float(clipped.std())})
    return stats


def slice_cases(cases: list[Case], axis: int) -> list[Case]:
    """2D-on-3D: every slice along canonical ``axis`` (0..2) becomes a 2D case (views, no copies)."""
    if axis not in (0, 1, 2):
        raise DataError(f"data.slice_axis must be 0, 1 or 2 (2 = axial in RAS), got {axis}")
    out = []
    for case in cases:
        image, label = np.moveaxis(case.image, axis + 1, 1), np.moveaxis(case.label, axis, 0)  # type: ignore[arg-type]
        out += [Case(f"{case.name}@{z}", image[:, z], label[z]) for z in range(label.shape[0])]
    return out


def load_volume_dataset(files: DatasetFiles, cfg: DataConfig) -> Dataset:
    """Validate, preprocess (or fetch from the cache) and memory-map every case of a 3D dataset.

    All problems are collected and reported together (one line each) before anything trains.
    """
    plan = preprocessing_parameters(files, cfg)
    cache = default_cache_dir(cfg)
    problems: list[str] = []
    entries: dict[str, dict[str, Any]] = {}
    for case in files.cases:
        try:
            key = _cache_key(case, plan)
            meta_path = cache / f"{key}.json"
            if meta_path.is_file():
                try:
                    entries[case.name] = {"key": key, **json.loads(meta_path.read_text(encoding="utf-8"))}
                    continue
                except (OSError, ValueError, TypeError):
                    log.warning("%s: damaged preprocessing cache entry; preparing the case again", meta_path)
            image, props, label = _read_case(case)
            image_pp, label_pp, geometry = preprocess(image, props, plan, label)
        except UnetCliError as exc:
            problems.append(exc.message)
            continue
        ensure_writable_folder(cache, "preprocessing cache",
                               hint="set UNETCLI_CACHE or data.cache_dir (--set data.cache_dir=DIR) to a writable folder")
        _save_npy(cache / f"{key}_image.npy", image_pp)
        _save_npy(cache / f"{key}_label.npy", label_pp.astype(np.uint8 if label_pp.max(initial=0) < 256 else np.int16))  # type: ignore[union-attr]
        meta = {"case": case.name, "channels": int(image_pp.shape[0]), "shape": list(image_pp.shape[1:]),
                "labels": sorted(int(v) for v in np.unique(label_pp)), "geometry": geometry.__dict__,
                "unetcli": __version__}
        atomic_write_text(cache / f"{key}.json", json.dumps(meta))
        entries[case.name] = {"key": key, **meta}
    if problems:
        raise DataError.from_problems(problems, hint="fix or remove these files, then run again")
    channel_counts = {name: e["channels"] for name, e in entries.items()}
    if len(set(channel_counts.values())) > 1:
        raise DataError.from_problems([f"{files.root}: case {n} has {c} channel(s), others differ" for n, c in channel_counts.items()])
    label_values = label_values_from_masks({n: np.asarray(e["labels"]) for n, e in entries.items()}, cfg, files)
    if label_values != list(range(len(label_values))):
        raise DataError(f"{files.root}: 3D label maps must hold class indices 0..K-1, found {label_values}")
    cases = [
        Case(name, np.load(cache / f"{e['key']}_image.npy", mmap_mode="r"), np.load(cache / f"{e['key']}_label.npy", mmap_mode="r"))
        for name, e in entries.items()
    ]
    in_channels = next(iter(channel_counts.values()))
    layout = dataset_label_layout(label_values, cfg, files)
    spatial_dims = 3
    if cfg.slice_axis is not None:
        cases = slice_cases(cases, cfg.slice_axis)
        spatial_dims = 2
    plan["slice_axis"] = cfg.slice_axis
    log.info("3D dataset: %d cases, %d channel(s), %d %s, target spacing %s mm; cache %s",
             len(cases), in_channels, layout.num_outputs, "regions" if layout.regions else "classes",
             [round(s, 3) for s in plan["target_spacing"]], cache)
    return Dataset(
        cases, layout.num_outputs, in_channels, spatial_dims, layout.label_values, layout.label_names,
        resolve_names(files.channel_names, in_channels, "channel", files.root),
        file_format="nifti", preprocessing=plan, regions=layout.regions, ignore_index=layout.ignore_index,
    )
