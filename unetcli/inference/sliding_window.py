"""Sliding-window prediction with Gaussian importance weighting, for 2D and 3D."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from unetcli.data.sampling import pad_to_cover
from unetcli.runtime import autocast


def gaussian_importance(roi_size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Separable Gaussian weight map peaked at the window centre (sigma = ``sigma_scale`` * size).

    Windows overlap, and predictions near a window's border see less context; weighting by
    this map lets each voxel's prediction come mostly from windows centred near it.
    """
    weight = torch.ones(())
    for i, size in enumerate(roi_size):
        x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
        g = torch.exp(-(x**2) / (2 * (sigma_scale * size) ** 2))
        weight = weight.unsqueeze(-1) * g if i else g
    weight = weight / weight.max()
    return weight.clamp_min(1e-3).float()


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start offsets along one axis so that windows of ``roi`` cover ``size`` with ``overlap``."""
    if roi >= size:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    count = math.ceil((size - roi) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(count)})


@torch.no_grad()
def sliding_window_predict(
    model: nn.Module,
    image: np.ndarray,
    roi_size: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    window_batch_size: int = 4,
    gaussian: bool = True,
    mirror: bool = False,
    margin: int = 0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> torch.Tensor:
    """Class probabilities for a whole image, predicted window by window.

    Args:
        model: network in eval mode; input (B, C, *roi_size) -> logits (B, K, *out) with
            ``out = roi_size - 2 * margin`` (``margin`` > 0 for valid-padding networks).
        image: (C, *S) float32, already normalised. Images smaller than a window are
            mirror-padded; valid-padding networks get ``margin`` voxels of mirrored context.
        roi_size: network input size per spatial axis.
        num_classes: K.
        overlap: fraction of a window shared with its neighbour along each axis.
        window_batch_size: windows per forward pass.
        gaussian: weight each window by :func:`gaussian_importance` (else uniform).
        mirror: average over flips of every combination of spatial axes (test-time augmentation).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the forward pass.

    Returns:
        (K, *S) float32 probabilities on the CPU.
    """
    device = torch.device(device)
    spatial = image.shape[1:]
    out_roi = tuple(r - 2 * margin for r in roi_size)
    grid = tuple(max(s, r) for s, r in zip(spatial, out_roi))
    padded = torch.from_numpy(np.ascontiguousarray(pad_to_cover(image, [g + 2 * margin for g in grid], margin)))
    # pad_to_cover centres the extra padding; the output grid starts where the image starts.
    offset = [(p - 2 * margin - s) // 2 for p, s in zip(padded.shape[1:], spatial)]
    grid = tuple(padded.shape[1:][i] - 2 * margin for i in range(len(spatial)))

    weight = gaussian_importance(out_roi) if gaussian else torch.ones(out_roi)
    probs = torch.zeros((num_classes,) + grid, dtype=torch.float32)
    counts = torch.zeros(grid, dtype=torch.float32)
    starts = list(itertools.product(*(window_starts(g, r, overlap) for g, r in zip(grid, out_roi))))
    flip_sets = [()]
    if mirror:
        axes = range(2, 2 + len(spatial))
        flip_sets = [c for n in range(len(spatial) + 1) for c in itertools.combinations(axes, n)]

    for i in range(0, len(starts), window_batch_size):
        chunk = starts[i : i + window_batch_size]
        batch = torch.stack(
            [padded[(slice(None),) + tuple(slice(s, s + r) for s, r in zip(start, roi_size))] for start in chunk]
        ).to(device, non_blocking=True)
        pred = torch.zeros((len(chunk), num_classes) + out_roi, device=device)
        for flips in flip_sets:
            x = batch.flip(flips) if flips else batch
            with autocast(device, precision):
                logits = model(x)
            p = torch.softmax(logits.float(), dim=1)
            pred += p.flip(flips) if flips else p
        pred = (pred / len(flip_sets)).cpu() * weight
        for start, p in zip(chunk, pred):
            window = tuple(slice(s, s + r) for s, r in zip(start, out_roi))
            probs[(slice(None),) + window] += p
            counts[window] += weight
    probs /= counts
    crop = tuple(slice(o, o + s) for o, s in zip(offset, spatial))
    return probs[(slice(None),) + crop].contiguous()
