"""Several networks that predict as one: in every sliding-window position each model's softmax is
averaged, so memory does not grow with the number of models (no per-model probability maps)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from unetcli.errors import CheckpointError
from unetcli.models.network import SegmentationNetwork


class EnsembleNetwork(nn.Module):
    """Returns ``log(mean_k softmax(model_k(x)))``: the sliding window's softmax of it is exactly the
    mean of the models' probabilities, so the window code needs no change. For region models
    (``activation="sigmoid"``) it returns ``logit(mean_k sigmoid(model_k(x)))`` likewise.

    Shape: (N, C, *S) -> (N, K, *S') like each member; all members must share input size rules.
    """

    def __init__(self, models: Sequence[SegmentationNetwork], activation: str = "softmax") -> None:
        super().__init__()
        if not models:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)
        self.activation = activation

    @property
    def margin(self) -> tuple[int, ...]:
        return self.members[0].margin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = None
        for model in self.members:
            logits = model(x).float()
            p = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)
            mean = p if mean is None else mean.add_(p)
        mean = mean / len(self.members)  # type: ignore[operator]
        if self.activation == "sigmoid":  # logit, written out so that ONNX export needs no logit operator
            mean = mean.clamp(1e-6, 1 - 1e-6)
            return mean.log() - torch.log1p(-mean)
        return mean.clamp_min_(1e-12).log_()


CV_FILE = "cv.json"
"""Marks a cross-validation folder written by ``unet cv``: ``{"folds": k, ...}`` and ``fold_0 .. fold_{k-1}/``."""


def cv_fold_runs(folder: Path) -> list[Path] | None:
    """The fold run folders of a ``unet cv`` folder, or None when ``folder`` is not one. Every fold
    must be trained: an ensemble of some folds would silently be another model."""
    marker = folder / CV_FILE
    if not marker.is_file():
        return None
    try:
        folds = int(json.loads(marker.read_text(encoding="utf-8"))["folds"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{marker}: not a readable cross-validation record ({exc})",
                              hint="rerun `unet cv` into this folder") from exc
    runs = [folder / f"fold_{k}" for k in range(folds)]
    missing = [r.name for r in runs if not (r / "checkpoints" / "last.pt").is_file()]
    if missing:
        raise CheckpointError(f"{folder}: fold(s) {', '.join(missing)} not trained yet",
                              hint=f"finish the cross-validation first: rerun `unet cv` with --out {folder}")
    return runs
