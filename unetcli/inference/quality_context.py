"""What the quality check of ``unet predict`` knows about a model: its outputs, the training cases'
reference measures and the predicted-Dice model (fitted by ``unet cv``, or the unfitted one).

Where the training reference comes from, first found wins:

- a ``unet cv`` folder: ``quality_model.json`` (written when the cross-validation is scored: the
  out-of-fold fit and every fold's training cases together);
- the checkpoint's (or exported file's) metadata, ``quality_reference`` (runs trained by this version);
- ``quality_reference.json`` in the run folder (added to a run trained before, see docs/quality.md).

Without any, only the uncertainty signals are computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.atomic import read_written_json
from unetcli.errors import CheckpointError
from unetcli.inference.quality import UNFITTED, QualityModel
from unetcli.inference.quality_signals import OPTIONAL_PER_CASE_KEYS, PER_CASE_KEYS, REFERENCE_VERSION

QUALITY_MODEL_FILE = "quality_model.json"
REFERENCE_FILE = "quality_reference.json"


@dataclass
class QualityContext:
    """What every case's quality check needs from the model."""

    num_outputs: int
    regions: bool
    structures: list[str]
    """Names of the foreground outputs (classes without the background, or regions)."""
    channels: list[str]
    spatial_dims: int
    grid_voxel_volume: float
    """Volume of a voxel of the network's grid: mL (3D) or 1 pixel (2D)."""
    reference: dict[str, Any] | None = None
    model: QualityModel = field(default_factory=lambda: UNFITTED)

    @property
    def unit(self) -> str:
        return "mL" if self.spatial_dims == 3 else "px"

    @classmethod
    def from_metadata(cls, meta: dict[str, Any], reference: dict[str, Any] | None,
                      model: QualityModel | None = None) -> QualityContext:
        regions = bool(meta.get("regions"))
        names = list(meta["label_names"])
        preprocessing = meta.get("preprocessing") or {}
        volume = float(np.prod(preprocessing["target_spacing"])) / 1000 if "target_spacing" in preprocessing else 1.0
        three_d = meta.get("file_format", "png") == "nifti"
        return cls(int(meta["num_classes"]), regions, names[1:], list(meta.get("channel_names") or []), 3 if three_d else 2,
                   volume, reference, model or UNFITTED)


def _checked_reference(reference: Any, where: str) -> dict[str, Any] | None:
    """A reference this version reads, or None (an older or newer one is skipped, not fatal)."""
    if not isinstance(reference, dict) or reference.get("version") != REFERENCE_VERSION or not reference.get("cases"):
        return None
    present = [*PER_CASE_KEYS, *(k for k in OPTIONAL_PER_CASE_KEYS if k in reference)]
    if any(not isinstance(reference.get(k), list) or len(reference[k]) != reference["cases"] for k in present):
        raise CheckpointError(f"{where}: the training reference for quality checks is damaged",
                              hint="predict with --qc off, or train the run again")
    return reference


def _run_folder(source: Path) -> Path:
    """The run folder of a run folder or of a checkpoint inside its ``checkpoints/``."""
    return source.parent.parent if source.is_file() and source.parent.name == "checkpoints" else source


def quality_context(source: Path, metadata: dict[str, Any], same_grid: bool = True, single: bool = True) -> QualityContext:
    """The quality context of the model loaded from ``source``; ``same_grid`` False for models of
    different configurations averaged on the file's grid (no single network input to compare);
    ``single`` False when ``source`` is one of several models averaged (its fit does not apply)."""
    model_file = source / QUALITY_MODEL_FILE
    if single and source.is_dir() and model_file.is_file():
        hint = "rerun the same `unet cv` command to score it again, or predict with --qc off"
        stored = read_written_json(model_file, "quality model", hint)
        try:
            model = QualityModel.from_dict(stored["model"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{model_file}: quality model is damaged ({exc})", hint=hint) from exc
        reference = _checked_reference(stored.get("reference"), str(model_file))
        return QualityContext.from_metadata(metadata, reference if same_grid else None, model)
    reference = _checked_reference(metadata.get("quality_reference"), str(source))
    sidecar = _run_folder(source) / REFERENCE_FILE
    if reference is None and sidecar.is_file():
        stored = read_written_json(sidecar, "training reference", "remove it, or write it again (docs/quality.md)")
        reference = _checked_reference(stored, str(sidecar))
    return QualityContext.from_metadata(metadata, reference if same_grid else None)
