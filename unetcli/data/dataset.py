"""Find, read and validate a training folder before any training starts.

2D layouts (PNG):
- ``DATA/images/NAME.png`` + ``DATA/masks/NAME.png`` (``labels/`` is accepted for ``masks/``);
- the nnU-Net 2D layout ``DATA/imagesTr/NAME_0000.png`` (one file per channel) +
  ``DATA/labelsTr/NAME.png``, with an optional ``dataset.json`` for label and channel names.

Every problem found is reported, one line each, so a dataset can be fixed in one pass.
Reading and validating the cases is done by :mod:`unetcli.data.png_dataset` (2D) and
:mod:`unetcli.data.volumes` (3D); this module discovers the files and dispatches.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from unetcli.config import DataConfig
from unetcli.data.image_io import VOLUME_FORMATS, format_name, is_volume, volume_stem, volume_suffix
from unetcli.data.labels import parse_region_labels
from unetcli.data.png import PNG_SUFFIX
from unetcli.data.png_dataset import load_png_dataset
from unetcli.data.types import CaseFiles, Dataset, DatasetFiles, Regions
from unetcli.data.volumes import load_volume_dataset
from unetcli.errors import DataError

_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _wanted(path: Path, file_ending: str | None) -> str | None:
    """``png``, ``volume`` or None (not a case file) for ``path``; with ``file_ending`` only files ending in it count."""
    if file_ending and not path.name.lower().endswith(file_ending):
        return None
    if path.suffix.lower() == PNG_SUFFIX:
        return "png"
    return "volume" if is_volume(path) else None


def _image_files(folder: Path, file_ending: str | None = None) -> tuple[dict[str, Path], str]:
    """Stem -> path of the PNG or volume files in ``folder`` and which of the two it holds
    (``png`` or ``nifti``, the name every 3D format goes by). Volumes must all be of one format
    (NIfTI, MetaImage, NRRD or TIFF) unless ``file_ending`` (dataset.json) picks the files."""
    pngs: dict[str, Path] = {}
    volumes: dict[str, Path] = {}
    duplicates: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_symlink() and not p.exists():  # a dangling link is a missing case, not "no file"
            duplicates.append(f"{p}: broken symbolic link (its target {os.readlink(p)} does not exist)")
            continue
        kind = _wanted(p, file_ending) if p.is_file() else None
        if kind is None:
            continue
        found, stem = (pngs, p.stem) if kind == "png" else (volumes, volume_stem(p))
        if stem in found:  # e.g. a.png + a.PNG, or a.nii + a.nii.gz: which one is the case?
            duplicates.append(f"{p}: another file, {found[stem].name}, has the same case name '{stem}'")
            continue
        found[stem] = p
    if duplicates:
        raise DataError.from_problems(duplicates, hint="keep one file per case name (remove or rename the duplicate); "
                                                       "fix or remove broken links")
    if pngs and volumes:
        raise DataError(f"{folder}: holds both PNG and {format_name(next(iter(volumes.values())))} files",
                        hint="keep one file format per dataset")
    _check_one_format(folder, volumes)
    return (volumes, "nifti") if volumes else (pngs, "png")


def _check_one_format(folder: Path, volumes: dict[str, Path]) -> None:
    examples: dict[str, str] = {}
    for path in volumes.values():
        examples.setdefault(format_name(path), path.name)
    if len(examples) > 1:
        listed = ", ".join(f"{fmt} ({name})" for fmt, name in examples.items())
        raise DataError(f"{folder}: holds volumes of several formats: {listed}",
                        hint="keep one format per folder, or set \"file_ending\" in dataset.json to pick one")


def _suffix(file_format: str, example: Path | None = None) -> str:
    """The file ending to show in messages: the example file's own, else the format's usual one."""
    if file_format == "png":
        return PNG_SUFFIX
    return (volume_suffix(example) if example is not None else None) or ".nii.gz"


def _file_ending(root: Path) -> str | None:
    """``file_ending`` of ``root/dataset.json`` (nnU-Net), lower case; None when absent."""
    path = root / "dataset.json"
    try:
        ending = json.loads(path.read_text(encoding="utf-8")).get("file_ending") if path.is_file() else None
    except (OSError, ValueError, AttributeError):
        return None  # _read_dataset_json reports an unreadable dataset.json
    if ending is None:
        return None
    known = [PNG_SUFFIX, *(s for suffixes in VOLUME_FORMATS.values() for s in suffixes)]
    if not isinstance(ending, str) or ending.lower() not in known:
        raise DataError(f"{path}: file_ending {json.dumps(ending)} is not a known image format",
                        hint=f"use one of {', '.join(known)}")
    return ending.lower()


def _read_dataset_json(root: Path) -> tuple[list[str] | None, list[str] | None, Regions | None]:
    """Class names (index -> name), channel names and regions from ``root/dataset.json``."""
    path = root / "dataset.json"
    if not path.exists():
        return None, None, None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, found {type(meta).__name__}")
        labels = meta.get("labels")
        channels = meta.get("channel_names") if meta.get("channel_names") is not None else meta.get("modality")
        label_names, regions = None, None
        if isinstance(labels, dict) and any(isinstance(v, list) for v in labels.values()):
            label_names, regions = parse_region_labels(labels, meta.get("regions_class_order"))
        elif labels not in (None, {}, []):
            label_names = _label_names(labels)
        channel_names = _channel_names(channels)
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: cannot read labels/channel_names ({exc})", hint="see the nnU-Net dataset.json format") from exc
    return label_names, channel_names, regions


def _label_names(labels: object) -> list[str]:
    """nnU-Net v2 ``{"name": index}``, the Decathlon's ``{"index": "name"}``, or a list of names in
    index order; anything else is refused (it would silently give class_0, class_1, ...)."""
    if isinstance(labels, list) and labels and all(isinstance(n, str) and n.strip() for n in labels):
        return [n.strip() for n in labels]
    if not isinstance(labels, dict) or not labels:
        raise ValueError(f"'labels' must map names to label values ({{\"background\": 0, \"tumour\": 1}}) or list the names "
                         f"in label order, got {json.dumps(labels)[:60]}")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels.values()):
        by_index = {int(v): str(k) for k, v in labels.items()}
    elif all(isinstance(v, str) for v in labels.values()):
        by_index = {int(k): str(v) for k, v in labels.items()}
    else:
        raise ValueError("'labels' mixes names and label values; use {\"name\": value, ...}")
    if sorted(by_index) != list(range(len(by_index))):
        raise ValueError(f"label indices {sorted(by_index)} are not 0..{len(by_index) - 1}")
    return [by_index[i] for i in range(len(by_index))]


def _channel_names(channels: object) -> list[str] | None:
    """``{"0": "CT", "1": "T2"}``, a list in channel order, or one name (a single channel)."""
    if channels is None:
        return None
    if isinstance(channels, str) and channels.strip():
        return [channels.strip()]
    if isinstance(channels, list) and channels and all(isinstance(n, str) for n in channels):
        return [str(n) for n in channels]
    if isinstance(channels, dict) and channels and all(isinstance(n, str) for n in channels.values()):
        keys = sorted(channels, key=int)
        if [int(k) for k in keys] != list(range(len(keys))):
            raise ValueError(f"channel indices {[int(k) for k in keys]} are not 0..{len(keys) - 1}")
        return [str(channels[k]) for k in keys]
    raise ValueError(f"'channel_names' must map channel indices to names ({{\"0\": \"CT\"}}), got {json.dumps(channels)[:60]}")


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
    ending = _file_ending(root)
    images, file_format = _image_files(image_dir, ending)
    masks, _ = _image_files(mask_dir, ending)
    _check_pairs(images, masks, image_dir, mask_dir, file_format, ending)
    label_names, channel_names, regions = _read_dataset_json(root)
    cases = [CaseFiles(name, [images[name]], masks[name]) for name in sorted(images)]
    return DatasetFiles(root, "images_masks", cases, label_names, channel_names, file_format, regions)


def _discover_nnunet(root: Path) -> DatasetFiles:
    image_dir, label_dir = root / "imagesTr", root / "labelsTr"
    if not label_dir.is_dir():
        raise DataError(f"{root}: imagesTr/ found but no labelsTr/", hint="add labelsTr/NAME.ext for every case")
    label_names, channel_names, regions = _read_dataset_json(root)
    ending = _file_ending(root)
    images, file_format = _image_files(image_dir, ending)
    labels, _ = _image_files(label_dir, ending)
    ext = _suffix(file_format, next(iter(images.values()), None))
    if file_format == "nifti" and images and set(images) == set(labels):
        # Decathlon layout: one (possibly 4D, channels-last) file per case, named like its label.
        cases = [CaseFiles(name, [images[name]], labels[name]) for name in sorted(images)]
        return DatasetFiles(root, "decathlon", cases, label_names, channel_names, file_format, regions)
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
    _check_pairs({k: v[0] for k, v in channels.items()}, labels, image_dir, label_dir, file_format, ending)
    cases = [CaseFiles(c, [channels[c][i] for i in range(n_channels)], labels[c]) for c in sorted(channels)]
    return DatasetFiles(root, "nnunet", cases, label_names, channel_names, file_format, regions)


def _check_pairs(images: dict[str, Path], masks: dict[str, Path], image_dir: Path, mask_dir: Path,
                 file_format: str = "png", file_ending: str | None = None) -> None:
    if not images and file_ending:
        raise DataError(f"{image_dir}: no {file_ending} images found (the file_ending of dataset.json)",
                        hint="add images, or set file_ending in dataset.json to the ending of the files")
    if not images:
        raise DataError(f"{image_dir}: no .png or .nii.gz images found (nor .mha, .nrrd, .tif)",
                        hint="add images or point DATA at the right folder")
    ext = _suffix(file_format, next(iter(masks.values()), None))
    problems = [f"{images[s]}: no mask named {s}{ext} in {mask_dir}" for s in sorted(set(images) - set(masks))]
    problems += [f"{masks[s]}: mask has no image named {s} in {image_dir}" for s in sorted(set(masks) - set(images))]
    if problems:
        raise DataError.from_problems(problems, hint="images and masks are paired by file name (same stem)")


def load_dataset(files: DatasetFiles, cfg: DataConfig) -> Dataset:
    """Read every case, validate it and normalise it: PNG in memory, NIfTI preprocessed and cached."""
    if files.file_format == "nifti":
        return load_volume_dataset(files, cfg)
    return load_png_dataset(files, cfg)


def split_cases(names: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded train/validation split by case name. With a single case, it validates on itself.
    Slices of a volume (``NAME@z``, 2D-on-3D) are split by volume: none validates on a training
    volume's neighbouring slices."""
    volumes = sorted({n.split("@", 1)[0] for n in names})
    if len(volumes) < len(names):
        train, val = split_cases(volumes, val_fraction, seed)
        return expand_to_cases(train, names), expand_to_cases(val, names)
    if len(names) < 2 or val_fraction == 0:
        return list(names), list(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n_val = min(len(names) - 1, max(1, round(val_fraction * len(names))))
    val = sorted(names[i] for i in order[:n_val])
    train = sorted(names[i] for i in order[n_val:])
    return train, val


def expand_to_cases(names: list[str], case_names: list[str]) -> list[str]:
    """The loaded cases that ``names`` (files' case names) stand for: the case itself, or, for a
    volume served as 2D slices (``NAME@z``), all of its slices, so that a volume's slices always
    stay on one side of a split."""
    wanted = set(names)
    return [c for c in case_names if c in wanted or c.split("@", 1)[0] in wanted]
