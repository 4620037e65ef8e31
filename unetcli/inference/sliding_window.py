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
    this map lets each voxel's prediction come mostly from windows centred near it. Built as
    MONAI's ``compute_importance_map`` builds it (float32, unnormalised, floored at 1e-3 so
    corner voxels still get a weight), so blended probabilities agree with MONAI's
    ``sliding_window_inference`` to float rounding.
    """
    weight = torch.ones(())
    for i, size in enumerate(roi_size):
        x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
        g = torch.exp(x**2 / (-2 * (sigma_scale * size) ** 2))
        weight = weight.unsqueeze(-1) * g if i else g
    return weight.clamp_min(max(float(weight.min()), 1e-3))


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start offsets along one axis so that windows of ``roi`` cover ``size`` with ``overlap``."""
    if roi >= size:
        return [0]
    step = max(1, int(roi * (1 - overlap)))
    count = math.ceil((size - roi) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(count)})


def _input_format(model: nn.Module, spatial_dims: int) -> torch.memory_format:
    """Feed windows in the memory format the network's convolutions are stored in."""
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    weight = next((p for p in model.parameters() if p.ndim == spatial_dims + 2), None)
    if weight is not None and weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous():
        return fmt
    return torch.contiguous_format


class _SlabAccumulator:
    """Weighted sums of window predictions for the rows [lo, hi) of the first spatial axis.

    Windows arrive sorted by their first-axis start, so every row below the current start is
    final: it is normalised and handed to ``emit`` (as probabilities or, to save memory, as
    labels) and dropped. Peak memory is K x (window rows) x (other axes), not K x volume.
    """

    def __init__(self, num_classes: int, grid: tuple[int, ...], emit) -> None:
        self.num_classes, self.grid, self.emit = num_classes, grid, emit
        self.lo = 0
        self.sums = torch.zeros((num_classes, 0) + grid[1:])
        self.weights = torch.zeros((0,) + grid[1:])

    def flush(self, upto: int) -> None:
        n = min(upto, self.lo + self.sums.shape[1]) - self.lo
        if n > 0:
            self.emit(self.lo, self.sums[:, :n], self.weights[:n])
            self.sums, self.weights = self.sums[:, n:], self.weights[n:]
        self.lo = max(self.lo, upto)

    def add(self, start: tuple[int, ...], pred: torch.Tensor, weight: torch.Tensor) -> None:
        self.flush(start[0])
        need = start[0] + pred.shape[1] - self.lo
        if need > self.sums.shape[1]:
            grow = need - self.sums.shape[1]
            self.sums = torch.cat([self.sums, torch.zeros((self.num_classes, grow) + self.grid[1:])], 1)
            self.weights = torch.cat([self.weights, torch.zeros((grow,) + self.grid[1:])], 0)
        rows = slice(start[0] - self.lo, start[0] - self.lo + pred.shape[1])
        window = (rows,) + tuple(slice(s, s + r) for s, r in zip(start[1:], pred.shape[2:]))
        self.sums[(slice(None),) + window] += pred * weight
        self.weights[window] += weight


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
    output: str = "probabilities",
) -> torch.Tensor:
    """Class probabilities (or labels) for a whole image, predicted window by window.

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
        output: ``probabilities`` -> (K, *S) float32; ``labels`` -> (*S) int64 argmax, computed
            slab by slab so that memory does not grow with K x volume.

    Returns:
        (K, *S) float32 probabilities or (*S) int64 labels, on the CPU.
    """
    device = torch.device(device)
    spatial = image.shape[1:]
    out_roi = tuple(r - 2 * margin for r in roi_size)
    grid = tuple(max(s, r) for s, r in zip(spatial, out_roi))
    padded = torch.from_numpy(np.ascontiguousarray(pad_to_cover(image, [g + 2 * margin for g in grid], margin)))
    # pad_to_cover centres the extra padding; the output grid starts where the image starts.
    offset = [(p - 2 * margin - s) // 2 for p, s in zip(padded.shape[1:], spatial)]
    grid = tuple(padded.shape[1:][i] - 2 * margin for i in range(len(spatial)))

    if output == "labels":
        result = torch.zeros(grid, dtype=torch.int64)

        def emit(lo: int, sums: torch.Tensor, weights: torch.Tensor) -> None:
            # A positive per-voxel weight cannot change the argmax; max().indices is much faster than argmax on CPU.
            result[lo : lo + sums.shape[1]] = sums.max(0).indices
    else:
        result = torch.zeros((num_classes,) + grid, dtype=torch.float32)

        def emit(lo: int, sums: torch.Tensor, weights: torch.Tensor) -> None:
            result[:, lo : lo + sums.shape[1]] = sums / weights

    weight = gaussian_importance(out_roi) if gaussian else torch.ones(out_roi)
    fmt = _input_format(model, len(spatial))
    accumulator = _SlabAccumulator(num_classes, grid, emit)
    starts = list(itertools.product(*(window_starts(g, r, overlap) for g, r in zip(grid, out_roi))))
    flip_sets: list[tuple[int, ...]] = [()]
    if mirror:
        axes = range(2, 2 + len(spatial))
        flip_sets = [c for n in range(len(spatial) + 1) for c in itertools.combinations(axes, n)]

    for i in range(0, len(starts), window_batch_size):
        chunk = starts[i : i + window_batch_size]
        batch = torch.stack(
            [padded[(slice(None),) + tuple(slice(s, s + r) for s, r in zip(start, roi_size))] for start in chunk]
        ).to(device, non_blocking=True).contiguous(memory_format=fmt)
        pred = None
        for flips in flip_sets:
            x = batch.flip(flips) if flips else batch
            with autocast(device, precision):
                logits = model(x)
            p = torch.softmax(logits.float(), dim=1)
            p = p.flip(flips) if flips else p
            pred = p if pred is None else pred.add_(p)
        pred = pred.cpu()
        if len(flip_sets) > 1:
            pred /= len(flip_sets)
        for start, p in zip(chunk, pred):
            accumulator.add(start, p, weight)
    accumulator.flush(grid[0])
    crop = tuple(slice(o, o + s) for o, s in zip(offset, spatial))
    if output == "labels":
        return result[crop].contiguous()
    return result[(slice(None),) + crop].contiguous()
