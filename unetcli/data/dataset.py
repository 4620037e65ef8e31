"""Find, read and validate a training folder before any training starts.

2D layouts (PNG):
- ``DATA/images/NAME.png`` + ``DATA/masks/NAME.png`` (``labels/`` is accepted for ``masks/``);
- the nnU-Net 2D layout ``DATA/imagesTr/NAME_0000.png`` (one file per channel) +
  ``DATA/labelsTr/NAME.png``, with an optional ``dataset.json`` for label and channel names.

Every problem found is reported, one line each, so a dataset can be fixed in one pass.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unetcli.config import DataConfig
from unetcli.data.nifti import is_nifti, nifti_stem
from unetcli.data.png import PNG_SUFFIX, read_png_image, read_png_mask
from unetcli.data.preprocessing import normalize_image
from unetcli.errors import DataError, UnetCliError

log = logging.getLogger("unetcli")

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


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


def _image_files(folder: Path) -> tuple[dict[str, Path], str]:
    """Stem -> path of the PNG or NIfTI files in ``folder`` and which of the two it holds."""
    pngs: dict[str, Path] = {}
    niftis: dict[str, Path] = {}
    duplicates: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() == PNG_SUFFIX:
            found, stem = pngs, p.stem
        elif is_nifti(p):
            found, stem = niftis, nifti_stem(p)
        else:
            continue
        if stem in found:  # e.g. a.png + a.PNG, or a.nii + a.nii.gz: which one is the case?
            duplicates.append(f"{p}: another file, {found[stem].name}, has the same case name '{stem}'")
            continue
        found[stem] = p
    if duplicates:
        raise DataError.from_problems(duplicates, hint="keep one file per case name (remove or rename the duplicate)")
    if pngs and niftis:
        raise DataError(f"{folder}: holds both PNG and NIfTI files", hint="keep one file format per dataset")
    return (niftis, "nifti") if niftis else (pngs, "png")


def _suffix(file_format: str) -> str:
    return ".nii.gz" if file_format == "nifti" else PNG_SUFFIX


def _read_dataset_json(root: Path) -> tuple[list[str] | None, list[str] | None]:
    path = root / "dataset.json"
    if not path.exists():
        return None, None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        labels = meta.get("labels")
        channels = meta.get("channel_names") or meta.get("modality")
        label_names = None
        if isinstance(labels, dict) and labels:
            # nnU-Net v2 maps name -> index; the Decathlon maps "index" -> name.
            if all(isinstance(v, int) for v in labels.values()):
                by_index = {int(v): str(k) for k, v in labels.items()}
            else:
                by_index = {int(k): str(v) for k, v in labels.items()}
            if sorted(by_index) != list(range(len(by_index))):
                raise ValueError(f"label indices {sorted(by_index)} are not 0..{len(by_index) - 1}")
            label_names = [by_index[i] for i in range(len(by_index))]
        channel_names = [str(channels[k]) for k in sorted(channels, key=int)] if isinstance(channels, dict) else None
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read labels/channel_names ({exc})", hint="see the nnU-Net dataset.json format") from exc
    return label_names, channel_names


def discover_dataset(root: Path) -> DatasetFiles:
    """Detect the layout and file format of ``root`` and pair images with label maps by name.

    Layouts: ``images/`` + ``masks/`` (or ``labels/``); nnU-Net v2 ``imagesTr/NAME_0000.ext`` +
    ``labelsTr/NAME.ext`` (+ ``dataset.json``); the Medical Segmentation Decathlon's
    ``imagesTr/NAME.nii.gz`` (4D, channels last) + ``labelsTr/NAME.nii.gz``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found", hint="pass a folder holding images/ and masks/ (or imagesTr/ and labelsTr/)")
    if (root / "imagesTr").is_dir():
        return _discover_nnunet(root)
    image_dir = root / "images"
    mask_dir = next((root / n for n in ("masks", "labels") if (root / n).is_dir()), None)
    if not image_dir.is_dir() or mask_dir is None:
        raise DataError(
            f"{root}: no images/ + masks/ (or imagesTr/ + labelsTr/) folders found",
            hint="put images in DATA/images/NAME.png (or .nii.gz) and label maps with the same name in DATA/masks/",
        )
    images, file_format = _image_files(image_dir)
    masks, _ = _image_files(mask_dir)
    _check_pairs(images, masks, image_dir, mask_dir, file_format)
    label_names, channel_names = _read_dataset_json(root)
    cases = [CaseFiles(name, [images[name]], masks[name]) for name in sorted(images)]
    return DatasetFiles(root, "images_masks", cases, label_names, channel_names, file_format)


def _discover_nnunet(root: Path) -> DatasetFiles:
    image_dir, label_dir = root / "imagesTr", root / "labelsTr"
    if not label_dir.is_dir():
        raise DataError(f"{root}: imagesTr/ found but no labelsTr/", hint="add labelsTr/NAME.ext for every case")
    label_names, channel_names = _read_dataset_json(root)
    images, file_format = _image_files(image_dir)
    labels, _ = _image_files(label_dir)
    ext = _suffix(file_format)
    if file_format == "nifti" and images and set(images) == set(labels):
        # Decathlon layout: one (possibly 4D, channels-last) file per case, named like its label.
        cases = [CaseFiles(name, [images[name]], labels[name]) for name in sorted(images)]
        return DatasetFiles(root, "decathlon", cases, label_names, channel_names, file_format)
    problems: list[str] = []
    channels: dict[str, dict[int, Path]] = {}
    for stem, path in images.items():
        match = _CHANNEL_SUFFIX.match(stem)
        if not match:
            problems.append(f"{path}: image name lacks the channel suffix _0000 (nnU-Net layout: NAME_0000{ext})")
            continue
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    n_channels = len(channel_names) if channel_names else max((len(c) for c in channels.values()), default=1)
    for case, files in sorted(channels.items()):
        missing = [f"{case}_{i:04d}{ext}" for i in range(n_channels) if i not in files]
        if missing:
            problems.append(f"{image_dir}: case {case} is missing channel file(s) {', '.join(missing)}")
    if problems:
        raise DataError.from_problems(problems)
    _check_pairs({k: v[0] for k, v in channels.items()}, labels, image_dir, label_dir, file_format)
    cases = [CaseFiles(c, [channels[c][i] for i in range(n_channels)], labels[c]) for c in sorted(channels)]
    return DatasetFiles(root, "nnunet", cases, label_names, channel_names, file_format)


def _check_pairs(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path,
                 file_format: str = "png") -> None:
    if not images:
        raise DataError(f"{image_dir}: no .png or .nii.gz images found", hint="add images or point DATA at the right folder")
    ext = _suffix(file_format)
    problems = [f"{images[s]}: no mask named {s}{ext} in {mask_dir}" for s in sorted(set(images) - set(masks))]
    problems += [f"{masks[s]}: mask has no image named {s} in {image_dir}" for s in sorted(set(masks) - set(images))]
    if problems:
        raise DataError.from_problems(problems, hint="images and masks are paired by file name (same stem)")


def load_image_channels(paths: list[Path]) -> np.ndarray:
    """Read one case's channel files and stack them as (C, H, W) float32."""
    arrays = [read_png_image(p) for p in paths]
    for path, arr in zip(paths[1:], arrays[1:]):
        if arr.shape[1:] != arrays[0].shape[1:]:
            raise DataError(f"{path}: size {arr.shape[1:]} differs from {paths[0]} {arrays[0].shape[1:]}")
    return np.concatenate(arrays, axis=0)


def load_dataset(files: DatasetFiles, cfg: DataConfig) -> Dataset:
    """Read every case, validate it, map binary masks, normalise images (3D: preprocess + cache)."""
    if files.file_format == "nifti":
        from unetcli.data.volumes import load_volume_dataset

        return load_volume_dataset(files, cfg)
    problems: list[str] = []
    images: dict[str, np.ndarray] = {}
    masks: dict[str, np.ndarray] = {}
    for case in files.cases:
        try:
            image = load_image_channels(case.images)
            mask = read_png_mask(case.label)  # type: ignore[arg-type]
        except UnetCliError as exc:
            problems.append(exc.message)
            continue
        if image.shape[1:] != mask.shape:
            problems.append(
                f"{case.label}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{case.images[0].name} size {image.shape[2]}x{image.shape[1]} (W x H)"
            )
            continue
        if not np.isfinite(image).all():
            problems.append(f"{case.images[0]}: image holds NaN or infinite values")
            continue
        images[case.name], masks[case.name] = image, mask
    channel_counts = {name: img.shape[0] for name, img in images.items()}
    if len(set(channel_counts.values())) > 1:
        common = max(set(channel_counts.values()), key=list(channel_counts.values()).count)
        for case in files.cases:
            if case.name in channel_counts and channel_counts[case.name] != common:
                problems.append(
                    f"{case.images[0]}: has {channel_counts[case.name]} channel(s) while most images have {common}",
                    )
    if problems:
        raise DataError.from_problems(problems, hint="fix or remove these files, then run again")

    label_values = _label_values(masks, cfg, files)
    value_to_class = {v: i for i, v in enumerate(label_values)}
    cases = []
    for case in files.cases:
        mask = masks[case.name]
        if label_values != list(range(len(label_values))):
            lut = np.zeros(max(label_values) + 1, dtype=np.int64)
            for value, cls in value_to_class.items():
                lut[value] = cls
            mask = lut[mask]
        image = normalize_image(images[case.name], cfg.normalization)
        cases.append(Case(case.name, image, mask))
    num_classes = len(label_values)
    in_channels = next(iter(channel_counts.values()))
    label_names = _names(cfg.label_names or files.label_names, num_classes, "class", files.root)
    channel_names = _names(files.channel_names, in_channels, "channel", files.root)
    return Dataset(cases, num_classes, in_channels, 2, label_values, label_names, channel_names)


def _names(names: list[str] | None, n: int, prefix: str, root: Path) -> list[str]:
    if names is None:
        return [f"{prefix}_{i}" for i in range(n)]
    if len(names) != n:
        raise DataError(f"{root}: {len(names)} {prefix} names given for {n} {prefix}es", hint=f"list one name per {prefix}")
    return list(names)


def _label_values(masks: dict[str, np.ndarray], cfg: DataConfig, files: DatasetFiles) -> list[int]:
    """Class index -> stored mask value, after checking every mask against the declared classes."""
    values_per_case = {name: np.unique(m) for name, m in masks.items()}
    all_values = sorted(set().union(*(set(v.tolist()) for v in values_per_case.values())))
    by_name = {c.name: c for c in files.cases}
    if cfg.map_binary_masks and set(all_values) <= {0, 255} and 255 in all_values:
        log.info("masks hold only 0 and 255: treating them as binary (255 -> class 1)")
        return [0, 255]
    declared = cfg.num_classes or (len(cfg.label_names) if cfg.label_names else None)
    declared = declared or (len(files.label_names) if files.label_names else None)
    problems = []
    if declared is not None:
        for name, values in values_per_case.items():
            bad = [int(v) for v in values if v < 0 or v >= declared]
            if bad:
                problems.append(
                    f"{by_name[name].label}: label value(s) {bad} outside the declared classes 0..{declared - 1}"
                )
        hint = "fix the masks or declare more classes (data.num_classes)"
    else:
        declared = max(all_values) + 1
        unused = sorted(set(range(declared)) - set(all_values))
        if unused:
            # A gap in the label values almost always means a stray value in a few masks.
            typical = max(v for v in all_values if v < unused[0]) if unused[0] > 0 else 0
            for name, values in values_per_case.items():
                stray = [int(v) for v in values if v > unused[0]]
                if stray:
                    problems.append(
                        f"{by_name[name].label}: label value(s) {stray} outside the classes the masks use "
                        f"(0..{typical}; value(s) {unused[:5]} never appear)"
                    )
        hint = "fix the masks, or set data.num_classes if those labels are meant"
    if any(v < 0 for v in all_values):
        problems.append("negative label values found")
    if problems:
        raise DataError.from_problems(problems, hint=hint)
    if declared < 2:
        raise DataError(f"{files.root}: every mask is all background (label 0)", hint="at least one foreground class is needed")
    return list(range(declared))


def split_cases(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/validation split by case name. With a single case, it validates on itself."""
    if len(names) < 2 or val_fraction == 0:
        return list(names), list(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(names[i] for i in order[n_val:])
    return train, val
