"""Sliding-window prediction with Gaussian importance weighting, for 2D and 3D."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from unetcli.data.sampling import pad_to_cover
from unetcli.inference.confidence import ConfidenceSums
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
    """Feed windows in the memory format the network's convolutions are stored in (contiguous for
    a network without parameters, such as an onnxruntime session behind a module)."""
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    parameters = model.parameters() if hasattr(model, "parameters") else ()
    weight = next((p for p in parameters if p.ndim == spatial_dims + 2), None)
    if weight is not None and weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous():
        return fmt
    return torch.contiguous_format


class _RowBand:
    """Weighted class sums of window predictions for a band of rows [lo, lo + capacity) of the
    first spatial axis.

    Windows arrive sorted by their first-axis start, so when a window does not fit in the band,
    every row above its start is final: those rows are handed to ``emit`` and the band moves on
    (its remaining rows are shifted down in place, nothing is reallocated). No weight map is
    kept: softmax probabilities sum to 1 over classes, so the class-sum of the weighted sums is
    the sum of weights. Memory: K x capacity x (other axes).
    """

    def __init__(self, sums: torch.Tensor, emit: Callable[[int, torch.Tensor], None]) -> None:
        self.sums, self.emit, self.lo = sums, emit, 0

    def add(self, start: tuple[int, ...], pred: torch.Tensor) -> None:
        capacity = self.sums.shape[1]
        if start[0] + pred.shape[1] > self.lo + capacity:
            n = min(start[0] - self.lo, capacity)
            self.emit(self.lo, self.sums[:, :n])
            keep = capacity - n
            if keep:  # clone: source and destination overlap when the windows overlap by more than half
                self.sums[:, :keep] = self.sums[:, n:].clone()
            self.sums[:, keep:] = 0
            self.lo = start[0]
        window = (slice(None), slice(start[0] - self.lo, start[0] - self.lo + pred.shape[1]))
        window += tuple(slice(s, s + r) for s, r in zip(start[1:], pred.shape[2:]))
        self.sums[window] += pred

    def finish(self, rows: int) -> None:
        n = min(rows - self.lo, self.sums.shape[1])
        if n > 0:
            self.emit(self.lo, self.sums[:, :n])


def _normalise_in_place(sums: torch.Tensor, regions: bool = False, chunk_rows: int = 8) -> None:
    """Weighted class sums -> probabilities, a few rows at a time (bounded temporary memory).
    Softmax sums add up to the weight; region sums carry the weight as their last channel."""
    for lo in range(0, sums.shape[1], chunk_rows):
        block = sums[:, lo : lo + chunk_rows]
        block /= block[-1:] if regions else block.sum(0, keepdim=True)


def paint_regions(probabilities: torch.Tensor) -> torch.Tensor:
    """(R, *S) region probabilities -> (*S) uint8 labels: region k is painted k + 1 where its
    probability is > 0.5, in order (nnU-Net's ``regions_class_order`` convention)."""
    labels = torch.zeros(probabilities.shape[1:], dtype=torch.uint8)
    for k, p in enumerate(probabilities):
        labels[p > 0.5] = k + 1
    return labels


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
    margin: int | Sequence[int] = 0,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    output: str = "probabilities",
    activation: str = "softmax",
    confidence: ConfidenceSums | None = None,
) -> torch.Tensor:
    """Class probabilities (or labels) for a whole image, predicted window by window.

    Args:
        model: network in eval mode; input (B, C, *roi_size) -> logits (B, K, *out) with
            ``out = roi_size - 2 * margin`` per axis (``margin`` > 0 for valid-padding networks).
        image: (C, *S) float32, already normalised. Images smaller than a window are
            mirror-padded; valid-padding networks get ``margin`` voxels of mirrored context
            (an int, or one per axis).
        roi_size: network input size per spatial axis.
        num_classes: K.
        overlap: fraction of a window shared with its neighbour along each axis.
        window_batch_size: windows per forward pass; gaussian: weight windows by :func:`gaussian_importance`.
        mirror: average over flips of every combination of spatial axes (test-time augmentation).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the forward pass.
        output: ``probabilities`` -> (K, *S) float32, accumulated in the output itself (no
            other volume-sized buffer); ``labels`` -> (*S) argmax (uint8, int64 beyond 256 classes),
            computed band by band of window height so that memory does not grow with K x volume.
        activation: ``softmax`` (classes) or ``sigmoid`` (regions; labels as :func:`paint_regions`).
        confidence: gets the image voxels' probabilities (with ``mirror``, the flips' disagreement) as they are final.

    Returns:
        (K, *S) float32 probabilities or (*S) uint8/int64 labels, on the CPU.
    """
    device = torch.device(device)
    spatial = image.shape[1:]
    padded, grid, offset, out_roi = _pad_for_windows(image, roi_size, margin)
    weight = gaussian_importance(out_roi) if gaussian else torch.ones(out_roi)
    crop, regions = tuple(slice(o, o + s) for o, s in zip(offset, spatial)), activation == "sigmoid"
    result, band = _accumulator(output, num_classes, out_roi, grid, regions, _observer(confidence, crop, regions, output))
    fmt = _input_format(model, len(spatial))
    starts = list(itertools.product(*(window_starts(g, r, overlap) for g, r in zip(grid, out_roi))))
    axes = range(2, 2 + len(spatial))  # every combination of flipped spatial axes, or none
    flip_sets = [c for n in range(len(spatial) + 1) for c in itertools.combinations(axes, n)] if mirror else [()]
    for i in range(0, len(starts), window_batch_size):
        chunk = starts[i : i + window_batch_size]
        batch = _window_batch(padded, chunk, roi_size).to(device, non_blocking=True).contiguous(memory_format=fmt)
        pred = _predict_windows(model, batch, flip_sets, device, precision, regions, confidence)
        for start, p in zip(chunk, pred.mul_(weight)):
            band.add(start, p)
    band.finish(grid[0])
    if output == "labels":
        return result[crop].contiguous()
    return _probabilities(result, num_classes, crop, regions, confidence)


def _window_batch(padded: torch.Tensor, starts: Sequence[tuple[int, ...]], roi_size: Sequence[int]) -> torch.Tensor:
    """The windows of ``padded`` (C, *S) starting at ``starts``, stacked (B, C, *roi_size)."""
    return torch.stack([padded[(slice(None),) + tuple(slice(s, s + r) for s, r in zip(start, roi_size))] for start in starts])


def _probabilities(sums: torch.Tensor, num_classes: int, crop: tuple[slice, ...], regions: bool,
                   confidence: ConfidenceSums | None) -> torch.Tensor:
    """Weighted sums of the whole grid -> probabilities of the image's voxels (seen by ``confidence``)."""
    _normalise_in_place(sums, regions)
    probabilities = sums[(slice(0, num_classes),) + crop].contiguous()
    if confidence is not None:
        confidence.add(probabilities)
    return probabilities


def _observer(confidence: ConfidenceSums | None, crop: tuple[slice, ...], regions: bool,
              output: str) -> Callable[[int, torch.Tensor], None] | None:
    """For labels output: hands ``confidence`` the probabilities of each finished band of rows,
    less the padding around the image (rows outside ``crop``, and the other axes' margins)."""
    if confidence is None or output != "labels":
        return None

    def observe(lo: int, sums: torch.Tensor) -> None:
        first, last = max(lo, crop[0].start), min(lo + sums.shape[1], crop[0].stop)
        if first >= last:
            return
        block = sums[(slice(None), slice(first - lo, last - lo)) + crop[1:]]
        confidence.add(block[:-1] / block[-1:] if regions else block / block.sum(0, keepdim=True))

    return observe


def _pad_for_windows(image: np.ndarray, roi_size: Sequence[int], margin: int | Sequence[int]
                     ) -> tuple[torch.Tensor, tuple[int, ...], list[int], tuple[int, ...]]:
    """The image mirror-padded to hold at least one window plus ``margin`` context per side, the
    output grid it covers, where the image starts in that grid, and the output size of a window."""
    spatial = image.shape[1:]
    margins = (margin,) * len(spatial) if isinstance(margin, int) else tuple(margin)
    out_roi = tuple(r - 2 * m for r, m in zip(roi_size, margins))
    grid = tuple(max(s, r) for s, r in zip(spatial, out_roi))
    padded_array = np.ascontiguousarray(pad_to_cover(image, [g + 2 * m for g, m in zip(grid, margins)], margins))
    with warnings.catch_warnings():
        # A memory-mapped cached volume is read-only; windows are only ever read from it, never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        padded = torch.from_numpy(padded_array)
    # pad_to_cover centres the extra padding; the output grid starts where the image starts.
    offset = [(p - 2 * m - s) // 2 for p, m, s in zip(padded.shape[1:], margins, spatial)]
    grid = tuple(p - 2 * m for p, m in zip(padded.shape[1:], margins))
    return padded, grid, offset, out_roi


def _accumulator(output: str, num_classes: int, out_roi: tuple[int, ...], grid: tuple[int, ...],
                 regions: bool = False, observe: Callable[[int, torch.Tensor], None] | None = None
                 ) -> tuple[torch.Tensor, _RowBand]:
    """The output array and the band that accumulates window predictions into it. Region
    predictions carry one more channel, the window weight (sigmoids do not sum to 1). For labels,
    ``observe`` sees each band's weighted sums before they become labels."""
    channels = num_classes + 1 if regions else num_classes
    if output == "labels":
        # uint8 holds 256 classes in an eighth of int64's memory (a 512x512x500 CT: 125 MiB, not 1 GiB).
        labels = torch.zeros(grid, dtype=torch.uint8 if num_classes <= 256 else torch.int64)

        def emit(lo: int, sums: torch.Tensor) -> None:
            if observe is not None:
                observe(lo, sums)
            if regions:
                labels[lo : lo + sums.shape[1]] = paint_regions(sums[:-1] / sums[-1:])
            else:  # a positive per-voxel normaliser cannot change the argmax; max().indices beats argmax on CPU
                labels[lo : lo + sums.shape[1]] = sums.max(0).indices

        return labels, _RowBand(torch.zeros((channels, out_roi[0]) + grid[1:]), emit)
    # The output itself is the band: the weighted sums are accumulated where the probabilities end up.
    probabilities = torch.zeros((channels,) + grid, dtype=torch.float32)
    return probabilities, _RowBand(probabilities, lambda lo, sums: None)


def _predict_windows(model: nn.Module, batch: torch.Tensor, flip_sets: list[tuple[int, ...]], device: torch.device,
                     precision: str, regions: bool = False, confidence: ConfidenceSums | None = None) -> torch.Tensor:
    """Softmax (``regions``: sigmoid, plus a channel of ones that carries the window weight)
    probabilities of a window batch, averaged over the flips in ``flip_sets``, on the CPU.
    With ``confidence`` and several flips, each flip's classes are compared with the mean's."""
    pred = None
    passes: list[torch.Tensor] = []
    for flips in flip_sets:
        x = batch.flip(flips) if flips else batch
        with autocast(device, precision):
            logits = model(x)
        if regions:
            p = torch.sigmoid(logits.float())
            p = torch.cat([p, torch.ones_like(p[:, :1])], dim=1)
        else:
            p = torch.softmax(logits.float(), dim=1)
        p = p.flip(flips) if flips else p
        if confidence is not None and len(flip_sets) > 1:
            passes.append(confidence.choice(p[:, :-1] if regions else p))
        pred = p if pred is None else pred.add_(p)
    pred = pred.cpu()  # type: ignore[union-attr]
    if len(flip_sets) > 1:
        pred /= len(flip_sets)
        if confidence is not None:
            confidence.add_flips(pred[:, :-1] if regions else pred, [c.cpu() for c in passes])
    return pred
