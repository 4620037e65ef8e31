"""Class values and names: which mask values are classes, and what the classes and channels are called."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from unetcli.config import DataConfig
from unetcli.data.types import DatasetFiles
from unetcli.errors import DataError

log = logging.getLogger("unetcli")


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
