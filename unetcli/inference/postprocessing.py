"""Postprocessing of predicted label maps: keep only the largest connected component.

``unet cv`` decides on its out-of-fold predictions whether this helps (all foreground classes
together, then each class on its own) and stores the choice; ``unet predict`` applies it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from unetcli.data.preprocessing import components_at_least


@dataclass
class Postprocessing:
    """``foreground``: keep the largest component of all foreground together; ``classes``: class
    indices whose own largest component alone is kept (after the foreground step)."""

    foreground: bool = False
    classes: list[int] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return self.foreground or bool(self.classes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> Postprocessing:
        values = values or {}
        return cls(bool(values.get("foreground", False)), [int(c) for c in values.get("classes", [])])


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest face-connected component of a boolean mask (all of it when empty)."""
    return components_at_least(mask, 1.0)


def keep_largest(labels: np.ndarray, foreground: bool = False, classes: Sequence[int] = ()) -> np.ndarray:
    """``labels`` (class indices or label values, 0 = background) with smaller components set to 0."""
    out = labels.copy()
    if foreground:
        out[(out != 0) & ~largest_component(out != 0)] = 0
    for c in classes:
        mask = out == c
        out[mask & ~largest_component(mask)] = 0
    return out


def apply_postprocessing(labels: np.ndarray, spec: Postprocessing | None) -> np.ndarray:
    if spec is None or not spec.active:
        return labels
    return keep_largest(labels, spec.foreground, spec.classes)
