"""Several networks that predict as one: in every sliding-window position each model's softmax is
averaged, so memory does not grow with the number of models (no per-model probability maps)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from unetcli.atomic import read_written_json
from unetcli.errors import CheckpointError, ConfigError
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


FOLD_DONE = Path("oof") / ".complete"
"""Written into a fold's run folder once it finished training and predicted its held-out cases."""


def cv_fold_runs(folder: Path, folds: Sequence[int] | None = None) -> list[Path] | None:
    """The fold run folders of a ``unet cv`` folder (all, or those numbered in ``folds``), or None when
    ``folder`` is not one. Every fold used must have finished: an ensemble with a fold killed
    mid-training would silently be another model."""
    marker = folder / CV_FILE
    if not marker.is_file():
        return None
    state = read_written_json(marker, "cross-validation record", hint="rerun `unet cv` into this folder")
    count = state.get("folds")
    if isinstance(count, bool) or not isinstance(count, int) or count < 2:
        raise CheckpointError(f"{marker}: cross-validation record is damaged ('folds' is {count!r}, expected a number >= 2)",
                              hint="rerun `unet cv` into this folder")
    chosen = list(range(count)) if folds is None else list(dict.fromkeys(int(k) for k in folds))
    outside = [k for k in chosen if not 0 <= k < count]
    if outside or not chosen:
        raise ConfigError(f"--folds {','.join(map(str, folds or []))}: {folder} has folds 0..{count - 1}",
                          hint=f"e.g. --folds 0,{count - 1}")
    runs = [folder / f"fold_{k}" for k in chosen]
    missing = [r.name for r in runs if not (r / "checkpoints" / "last.pt").is_file()]
    if missing:
        raise CheckpointError(f"{folder}: fold(s) {', '.join(missing)} not trained yet",
                              hint=f"finish the cross-validation first: rerun `unet cv` with --out {folder}"
                                   + ("" if folds is not None else ", or predict with the finished ones (--folds)"))
    unfinished = [r.name for r in runs if not (r / FOLD_DONE).is_file()]
    if unfinished:
        raise CheckpointError(f"{folder}: fold(s) {', '.join(unfinished)} did not finish (stopped during training or "
                              "before predicting their held-out cases)",
                              hint=f"finish the cross-validation first: rerun the same `unet cv` command with --out {folder}")
    return runs


def read_postprocessing(folder: Path) -> dict | None:
    """``CV/postprocessing.json`` (written by ``unet cv``), checked; None when there is none."""
    path = folder / "postprocessing.json"
    if not path.exists():
        return None
    hint = f"rerun the same `unet cv` command with --out {folder} to write it again, or predict with --no-postprocessing"
    values = read_written_json(path, "postprocessing choice", hint)
    foreground, classes = values.get("foreground", False), values.get("classes", [])
    if not isinstance(foreground, bool) or not isinstance(classes, list) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in classes) or set(values) - {"foreground", "classes"}:
        raise CheckpointError(f"{path}: postprocessing choice is damaged (expected {{\"foreground\": true/false, "
                              f"\"classes\": [class indices > 0]}}, found {json.dumps(values)[:80]})", hint=hint)
    return values
