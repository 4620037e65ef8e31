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


def validate(model: SegmentationNetwork, dataset: Dataset, names: list[str], cfg: RunConfig, patch: list[int],
             device: torch.device, precision: str) -> dict[str, float]:
    """Mean Dice per foreground class over the validation cases, as ``dice_{class name}`` plus
    ``dice_mean`` (NaN where no case holds the class). Leaves the model in training mode."""
    model.eval()
    by_name = {c.name: c for c in dataset.cases}
    rows = []
    for name in my_share(names):  # under torchrun each rank predicts its share, then all rows are gathered
        case = by_name[name]
        pred = sliding_window_predict(
            model, case.image, patch, dataset.num_classes, overlap=cfg.infer.overlap,
            window_batch_size=cfg.infer.windows_per_batch(dataset.spatial_dims), gaussian=cfg.infer.gaussian,
            margin=model.margin, device=device, precision=precision, output="labels",
        ).numpy()
        rows.append([dice(pred == k, case.label == k) for k in range(1, dataset.num_classes)])
    model.train()
    scores = np.asarray(gather_rows(rows), dtype=np.float64).reshape(-1, dataset.num_classes - 1)
    with np.errstate(all="ignore"):
        per_class = np.nanmean(scores, axis=0) if len(scores) else np.full(dataset.num_classes - 1, np.nan)
    result = {f"dice_{dataset.label_names[k]}": float(per_class[k - 1]) for k in range(1, dataset.num_classes)}
    result["dice_mean"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return result
