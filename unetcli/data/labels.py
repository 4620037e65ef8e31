"""Class values and names: which mask values are classes, what the classes and channels are called,
and the two label structures beyond "one class per voxel": overlapping regions and the ignore label.

Conventions (nnU-Net v2's): a label named ``ignore`` must have the highest value and marks
unlabelled voxels; regions are ``dataset.json`` labels given as lists of values, with
``regions_class_order`` naming the value each region is painted with in predicted label maps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.config import DataConfig
from unetcli.data.types import DatasetFiles, Regions
from unetcli.errors import DataError

log = logging.getLogger("unetcli")


IGNORE_NAME = "ignore"


def parse_region_labels(labels: dict[str, Any], order: Any) -> tuple[list[str], Regions]:
    """nnU-Net region ``labels`` (``{"background": 0, "whole": [1, 2, 3], "core": [2, 3], "ignore": 4}``)
    and ``regions_class_order`` -> names of the stored values (0..max) and the regions.

    Raises ValueError with what is wrong (the caller names the file)."""
    if labels.get("background") != 0:
        raise ValueError('region labels need "background": 0')
    ignore = labels.get(IGNORE_NAME)
    if ignore is not None and (isinstance(ignore, bool) or not isinstance(ignore, int)):
        raise ValueError(f'"{IGNORE_NAME}" must be one integer label value, got {ignore!r}')
    names, values = [], []
    for name, value in labels.items():
        if name in ("background", IGNORE_NAME):
            continue
        members = value if isinstance(value, list) else [value]
        if not members or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in members):
            raise ValueError(f"region {name!r} must be a label value > 0 or a list of them, got {value!r}")
        names.append(str(name))
        values.append(sorted(set(members)))
    if not isinstance(order, list) or len(order) != len(names) or not all(isinstance(v, int) and v > 0 for v in order):
        raise ValueError(f"regions need 'regions_class_order': one label value > 0 per region ({len(names)}: "
                         f"{', '.join(names)}), the value painted for each in predicted label maps; got {order!r}")
    highest = max(max(v) for v in values)
    if ignore is not None and ignore <= highest:
        raise ValueError(f'the "{IGNORE_NAME}" label ({ignore}) must be higher than every region value (up to {highest})')
    top = max(highest, ignore or 0, *order)
    stored = ["background"] + [f"label_{v}" for v in range(1, top + 1)]
    if ignore is not None:
        stored[ignore] = IGNORE_NAME
    return stored, Regions(names, values, [int(v) for v in order])


@dataclass(frozen=True)
class LabelLayout:
    """What a network predicts for a dataset's stored classes (see :class:`~unetcli.data.types.Dataset`)."""

    num_outputs: int
    label_values: list[int]
    label_names: list[str]
    regions: list[list[int]] | None = None
    ignore_index: int | None = None


def label_layout(label_values: list[int], names: list[str], regions: Regions | None, root: Path) -> LabelLayout:
    """From the stored classes (``label_values``, with ``names``, ``ignore`` among them) to the
    network's outputs: the classes without ``ignore``, or one output per region."""
    ignored = [i for i, n in enumerate(names) if n.lower() == IGNORE_NAME]
    if ignored and ignored != [len(names) - 1]:
        raise DataError(f"{root}: the label named '{IGNORE_NAME}' must have the highest label value",
                        hint="give the ignore label the highest value (nnU-Net convention)")
    ignore_index = ignored[0] if ignored else None
    if regions is not None:
        to_class = {v: i for i, v in enumerate(label_values)}
        sets = [[to_class[v] for v in values if v in to_class] for values in regions.values]
        return LabelLayout(len(sets), [0, *regions.order], ["background", *regions.names], sets, ignore_index)
    if ignore_index is None:
        return LabelLayout(len(label_values), list(label_values), list(names))
    if ignore_index < 2:
        raise DataError(f"{root}: besides '{IGNORE_NAME}' there must be background and at least one class")
    return LabelLayout(ignore_index, label_values[:ignore_index], names[:ignore_index], None, ignore_index)


def dataset_label_layout(label_values: list[int], cfg: DataConfig, files: DatasetFiles) -> LabelLayout:
    """The stored classes' names (config, else ``dataset.json``, else ``class_i``) and the layout they give."""
    names = resolve_names(cfg.label_names or files.label_names, len(label_values), "class", files.root)
    return label_layout(label_values, names, files.regions, files.root)


def resolve_names(names: list[str] | None, n: int, prefix: str, root: Path) -> list[str]:
    if names is None:
        return [f"{prefix}_{i}" for i in range(n)]
    if len(names) != n:
        raise DataError(f"{root}: {len(names)} {prefix} names given for {n} {prefix}es", hint=f"list one name per {prefix}")
    return list(names)


def label_values_from_masks(masks: dict[str, np.ndarray], cfg: DataConfig, files: DatasetFiles) -> list[int]:
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
