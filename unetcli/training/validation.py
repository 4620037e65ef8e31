"""Validation Dice during training: whole validation cases through the sliding window."""

from __future__ import annotations

import numpy as np
import torch

from unetcli.config import RunConfig
from unetcli.data.types import Dataset
from unetcli.evaluation.metrics import dice
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.models import SegmentationNetwork
from unetcli.training.distributed import gather_rows, my_share


def target_masks(dataset: Dataset) -> list[list[int]]:
    """The class indices of the reference that each scored output stands for: one class each,
    or a region's classes."""
    return dataset.regions if dataset.regions is not None else [[k] for k in range(1, dataset.num_classes)]


def predicted_masks(dataset: Dataset) -> list[list[int]]:
    """The predicted indices that make up each scored output. A region model paints region k as
    index k + 1 (label value ``label_values[k + 1]``), so region j is predicted wherever the
    painted value belongs to region j, as nnU-Net scores regions from label maps. (Region label
    maps hold class indices 0..K-1, so a stored value is its class index.)"""
    if dataset.regions is None:
        return target_masks(dataset)
    painted = dataset.label_values[1:]
    return [[k + 1 for k, value in enumerate(painted) if value in members] for members in dataset.regions]


def validate(model: SegmentationNetwork, dataset: Dataset, names: list[str], cfg: RunConfig, patch: list[int],
             device: torch.device, precision: str) -> dict[str, float]:
    """Mean Dice per foreground class (or region) over the validation cases, as ``dice_{name}``
    plus ``dice_mean`` (NaN where no case holds it). Voxels of the ``ignore`` label are not
    scored. Leaves the model in training mode."""
    model.eval()
    by_name = {c.name: c for c in dataset.cases}
    truth_sets, pred_sets = target_masks(dataset), predicted_masks(dataset)
    rows = []
    for name in my_share(names):  # under torchrun each rank predicts its share, then all rows are gathered
        case = by_name[name]
        pred = sliding_window_predict(
            model, case.image, patch, dataset.num_classes, overlap=cfg.infer.overlap,
            window_batch_size=cfg.infer.windows_per_batch(dataset.spatial_dims), gaussian=cfg.infer.gaussian,
            margin=model.margin, device=device, precision=precision, output="labels",
            activation="sigmoid" if dataset.regions is not None else "softmax",
        ).numpy()
        label = np.asarray(case.label)
        labelled = None if dataset.ignore_index is None else label != dataset.ignore_index
        row = []
        for truth_set, pred_set in zip(truth_sets, pred_sets):
            p, t = np.isin(pred, pred_set), np.isin(label, truth_set)
            row.append(dice(p if labelled is None else p & labelled, t))
        rows.append(row)
    model.train()
    n = len(truth_sets)
    scores = np.asarray(gather_rows(rows), dtype=np.float64).reshape(-1, n)
    with np.errstate(all="ignore"):
        per_target = np.nanmean(scores, axis=0) if len(scores) else np.full(n, np.nan)
    result = {f"dice_{dataset.label_names[k + 1]}": float(per_target[k]) for k in range(n)}
    result["dice_mean"] = float(np.nanmean(per_target)) if np.isfinite(per_target).any() else float("nan")
    return result
