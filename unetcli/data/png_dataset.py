"""2D datasets of PNG images and masks: read, validate and normalise every case."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from unetcli.config import DataConfig
from unetcli.data.labels import dataset_label_layout, label_values_from_masks, resolve_names
from unetcli.data.png import read_png_image, read_png_mask
from unetcli.data.preprocessing import normalize_image
from unetcli.data.types import Case, Dataset, DatasetFiles
from unetcli.errors import DataError, UnetCliError


def load_image_channels(paths: list[Path]) -> np.ndarray:
    """Read one case's channel files and stack them as (C, H, W) float32."""
    arrays = [read_png_image(p) for p in paths]
    for path, arr in zip(paths[1:], arrays[1:]):
        if arr.shape[1:] != arrays[0].shape[1:]:
            raise DataError(f"{path}: size {arr.shape[1:]} differs from {paths[0]} {arrays[0].shape[1:]}")
    return np.concatenate(arrays, axis=0)


def load_png_dataset(files: DatasetFiles, cfg: DataConfig) -> Dataset:
    """Read every PNG case, validate it, map binary masks and normalise the images."""
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

    label_values = label_values_from_masks(masks, cfg, files)
    value_to_class = {v: i for i, v in enumerate(label_values)}
    cases = []
    for case in files.cases:
        mask = masks[case.name]
        if label_values != list(range(len(label_values))):
            lut = np.zeros(max(label_values) + 1, dtype=np.int64)
            for value, cls in value_to_class.items():
                lut[value] = cls
            mask = lut[mask]
        image = normalize_image(images[case.name], cfg.normalization, cfg.foreground_mask)
        cases.append(Case(case.name, image, mask))
    layout = dataset_label_layout(label_values, cfg, files)
    in_channels = next(iter(channel_counts.values()))
    channel_names = resolve_names(files.channel_names, in_channels, "channel", files.root)
    return Dataset(cases, layout.num_outputs, in_channels, 2, layout.label_values, layout.label_names, channel_names,
                   regions=layout.regions, ignore_index=layout.ignore_index)
