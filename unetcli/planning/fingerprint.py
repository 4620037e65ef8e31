"""A dataset's fingerprint: what planning needs to know about the data, read once and cached.

Per case: spacing and shape (canonical axes) before and after cropping to the non-zero box. Per
channel: foreground intensity statistics from a bounded sample of foreground voxels. Class voxel
fractions. The modality of each channel from ``dataset.json``'s channel names.

The fingerprint is cached next to the preprocessed volumes, keyed by the files' paths, sizes and
modification times, so planning again (or ``unet train`` after ``unet plan``) reads no image.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from unetcli.atomic import atomic_write_text
from unetcli.config import DataConfig
from unetcli.data.nifti import crop_to_nonzero, read_image, read_label, to_canonical
from unetcli.data.png import read_png_mask
from unetcli.data.png_dataset import load_image_channels
from unetcli.data.types import CaseFiles, DatasetFiles
from unetcli.data.volumes import default_cache_dir
from unetcli.errors import DataError, UnetCliError
from unetcli.planning.rules import modality

log = logging.getLogger("unetcli")

FINGERPRINT_VERSION = 1
SAMPLES_PER_CASE = 10_000


@dataclass
class CaseFingerprint:
    name: str
    spacing: list[float]
    shape: list[int]
    """Spatial shape before cropping (canonical axes)."""
    cropped_shape: list[int]


@dataclass
class Fingerprint:
    spatial_dims: int
    file_format: str
    channel_names: list[str]
    modalities: list[str]
    """``ct``, ``mri`` or ``other`` per channel."""
    cases: list[CaseFingerprint]
    intensity: list[dict[str, float]]
    """Per channel, over foreground voxels: mean, std, p00_5, p99_5."""
    class_fractions: dict[str, float]
    """Voxel share of each label value over all cases."""

    @property
    def spacings(self) -> list[list[float]]:
        return [c.spacing for c in self.cases]

    @property
    def cropped_shapes(self) -> list[list[int]]:
        return [c.cropped_shape for c in self.cases]

    @property
    def cropped_fraction(self) -> float:
        """The median share of voxels that cropping to the non-zero box keeps."""
        return float(np.median([np.prod(c.cropped_shape) / np.prod(c.shape) for c in self.cases]))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> Fingerprint:
        cases = [CaseFingerprint(**c) for c in values["cases"]]
        return cls(**{**values, "cases": cases})


def _read_case(case: CaseFiles, file_format: str, crop: bool) -> tuple[np.ndarray, np.ndarray, list[float], list[int], list[int]]:
    """Image (C, *S), label (*S) cropped, spacing, shape before and after cropping."""
    if file_format == "png":
        image = load_image_channels(case.images)
        label = read_png_mask(case.label)  # type: ignore[arg-type]
        return image, label, [1.0, 1.0], list(image.shape[1:]), list(image.shape[1:])
    image, props = read_image(case.images)
    label = read_label(case.label, reference=props)  # type: ignore[arg-type]
    image, _ = to_canonical(image, props.affine)
    label, _ = to_canonical(label, props.affine)
    shape = list(image.shape[1:])
    if crop:
        image, label, _ = crop_to_nonzero(image, label)
    return image, label, list(props.canonical_spacing), shape, list(image.shape[1:])  # type: ignore[union-attr]


def _cache_path(files: DatasetFiles, cfg: DataConfig) -> Path:
    stamps = []
    for case in files.cases:
        for path in [*case.images, case.label]:
            st = Path(path).stat()  # type: ignore[arg-type]
            stamps.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])  # type: ignore[arg-type]
    payload = json.dumps({"files": stamps, "crop": cfg.crop_to_nonzero, "version": FINGERPRINT_VERSION,
                          "channel_names": files.channel_names}, sort_keys=True)
    return default_cache_dir(cfg) / f"fingerprint_{hashlib.sha1(payload.encode()).hexdigest()[:20]}.json"


def compute_fingerprint(files: DatasetFiles, cfg: DataConfig) -> Fingerprint:
    """Read every case once (or the cached fingerprint) and summarise it; problems are collected
    and reported together, one line per file."""
    try:
        cache = _cache_path(files, cfg)
        if cache.is_file():
            return Fingerprint.from_dict(json.loads(cache.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError, KeyError):
        cache = None  # type: ignore[assignment]
    fingerprint = _measure(files, cfg)
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(cache, json.dumps(fingerprint.to_dict()))
        except (OSError, UnetCliError):
            log.warning("could not cache the dataset fingerprint in %s", cache.parent)
    return fingerprint


def _measure(files: DatasetFiles, cfg: DataConfig) -> Fingerprint:
    rng = np.random.default_rng(0)
    problems: list[str] = []
    cases: list[CaseFingerprint] = []
    samples: list[list[np.ndarray]] = []
    counts: dict[int, int] = {}
    crop = cfg.crop_to_nonzero and files.file_format == "nifti"
    for case in files.cases:
        try:
            image, label, spacing, shape, cropped = _read_case(case, files.file_format, crop)
        except UnetCliError as exc:
            problems.append(exc.message)
            continue
        cases.append(CaseFingerprint(case.name, [float(s) for s in spacing], shape, cropped))
        foreground = label > 0
        for c in range(image.shape[0]):
            values = image[c][foreground] if foreground.any() else image[c].ravel()
            if len(values) > SAMPLES_PER_CASE:
                values = rng.choice(values, SAMPLES_PER_CASE, replace=False)
            if len(samples) <= c:
                samples.append([])
            samples[c].append(values.astype(np.float64))
        for value, n in zip(*np.unique(label, return_counts=True)):
            counts[int(value)] = counts.get(int(value), 0) + int(n)
    if problems:
        raise DataError.from_problems(problems, hint="fix or remove these files, then run again")
    n_channels = len(samples)
    names = files.channel_names if files.channel_names and len(files.channel_names) == n_channels else [""] * n_channels
    total = max(sum(counts.values()), 1)
    return Fingerprint(
        spatial_dims=2 if files.file_format == "png" else 3, file_format=files.file_format,
        channel_names=list(names), modalities=[modality(n) for n in names], cases=cases,
        intensity=[_intensity(np.concatenate(s)) for s in samples],
        class_fractions={str(k): counts[k] / total for k in sorted(counts)},
    )


def _intensity(values: np.ndarray) -> dict[str, float]:
    lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 0.0)
    return {"mean": float(values.mean()) if values.size else 0.0, "std": float(values.std()) if values.size else 0.0,
            "p00_5": float(lo), "p99_5": float(hi)}
