"""Training batches: random patches with augmentation, drawn from (memory-mapped) cases.

Batch ``i`` is a pure function of ``(seed, i)``: its random numbers come from
``numpy.random.default_rng([seed, i])``. So worker processes can build batches in any order,
and a resumed run only needs the batch position to draw exactly the batches an uninterrupted
run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unetcli.data.augment import IntensityAugmentation
from unetcli.data.spatial import (SCALE_RANGE, Warp, extract_window, moving_axes, random_displacement,
                                  random_rotation_scale, rotation_range, square_planes, warp_patch)
from unetcli.data.types import Case


def pad_to_cover(array: np.ndarray, spatial_shape: Sequence[int], margin: int | Sequence[int],
                 mode: str = "reflect") -> np.ndarray:
    """Pad the trailing spatial axes by ``margin`` per side (an int, or one per axis) and up to
    ``spatial_shape`` (mirror padding)."""
    spatial = array.shape[-len(spatial_shape):]
    margins = [margin] * len(spatial_shape) if isinstance(margin, int) else list(margin)
    pads = []
    for size, target, m in zip(spatial, spatial_shape, margins):
        extra = max(0, target - (size + 2 * m))
        pads.append((m + extra // 2, m + extra - extra // 2))
    if not any(lo or hi for lo, hi in pads):
        return array
    lead = [(0, 0)] * (array.ndim - len(spatial_shape))
    return np.pad(array, lead + pads, mode=mode)


def _foreground_index(label: np.ndarray, targets: Sequence[Sequence[int]], per_class: int,
                      rng: np.random.Generator) -> list[np.ndarray]:
    """Up to ``per_class`` voxel coordinates of each foreground target (a set of class indices:
    one class, or a region); empty arrays for absent ones."""
    index = []
    for members in targets:
        coords = np.argwhere(label == members[0] if len(members) == 1 else np.isin(label, members))
        if len(coords) > per_class:
            coords = coords[rng.choice(len(coords), per_class, replace=False)]
        index.append(coords.astype(np.int32))
    return index


class PatchSampler:
    """Builds (image, label) batches of a fixed patch size.

    Args:
        cases: loaded cases (image (C, *S), label (*S)); arrays may be memory-mapped.
        patch_size: network input size per spatial axis.
        batch_size: patches per batch.
        num_classes: classes incl. background (for foreground oversampling).
        foreground: what foreground oversampling centres patches on: sets of class indices (one
            per region of a region model); default one set per class 1..num_classes-1, which
            leaves an ``ignore`` label (index num_classes) out.
        ignore_index: the ``ignore`` label, if any: where training voxels carry it, crops may hang
            over the image edges by half a patch, filled with ignore (and intensity 0), so that
            sparse labels do not sit at fixed patch positions. Rotated patches are padded with it
            beyond the image's edge (else with background).
        margin: voxels a valid-padding network loses per side (per axis); images are mirror-padded by it.
        foreground_fraction: share of patches centred on a voxel of a random foreground class
            present in the case (nnU-Net uses 1/3); the rest are uniformly random crops.
        flips, rotate90: mirror every spatial axis / turn by multiples of 90 degrees in a plane of equal
            spacing and equal patch size (:func:`~unetcli.data.spatial.square_planes`).
        rotate_scale_prob: probability of a random rotation (nnU-Net's ranges,
            :func:`~unetcli.data.spatial.rotation_range`: +-30 deg about each axis, +-180 deg in-plane
            only for thick slices) and scaling (``scale_range``) per patch, in mm about its centre
            (:mod:`unetcli.data.spatial`).
        elastic_prob: probability of a smooth random (elastic) deformation per patch.
        spacing: voxel spacing (mm) per spatial axis of the cases' grid; ``None`` = 1 on every axis.
        scale_range: the range of the scaling factor (1, 1: rotation only).
        intensity_jitter: random scale and shift of intensities, each from U(-j, j).
        intensity: nnU-Net's intensity changes (noise, blur, brightness, contrast, low resolution,
            gamma), applied to the batch tensor after the spatial transforms.
        seed: base seed; batch ``i`` uses ``default_rng([seed, i])``.

    :meth:`batch` returns image (B, C, *patch) float32 and label (B, *patch) int64.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        batch_size: int,
        num_classes: int = 2,
        margin: int | Sequence[int] = 0,
        foreground_fraction: float = 0.33,
        flips: bool = True,
        rotate90: bool = True,
        rotate_scale_prob: float = 0.0,
        intensity_jitter: float = 0.0,
        intensity: IntensityAugmentation | None = None,
        seed: int = 0,
        foreground: Sequence[Sequence[int]] | None = None,
        ignore_index: int | None = None,
        elastic_prob: float = 0.0,
        spacing: Sequence[float] | None = None,
        scale_range: Sequence[float] = SCALE_RANGE,
    ) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.foreground_fraction = foreground_fraction
        self.flips = flips
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(self.patch_size)
        # 90-degree turns are exact only where both axes have the same spacing and patch size.
        self.turn_planes = square_planes(self.spacing, self.patch_size) if rotate90 else []
        # Thick slices are made coarser in-plane only, as they are rotated (nnU-Net's dummy-2D rule).
        self.lowres_axes = moving_axes(self.spacing)
        self.rotate_scale_prob = rotate_scale_prob
        self.rotation = rotation_range(self.spacing, self.patch_size)
        self.elastic_prob = elastic_prob
        self.scale_range = tuple(float(s) for s in scale_range)
        self.intensity_jitter = intensity_jitter
        self.intensity = intensity or IntensityAugmentation()
        self.seed = seed
        self.ignore_index = ignore_index
        self.position = 0
        self.images = [pad_to_cover(c.image, self.patch_size, margin) for c in cases]
        self.labels = [pad_to_cover(c.label, self.patch_size, margin) for c in cases]  # type: ignore[arg-type]
        index_rng = np.random.default_rng([seed, 2**31])
        targets = foreground if foreground is not None else [[k] for k in range(1, num_classes)]
        self.foreground, self.sparse = [], False
        for lab in self.labels:  # one pass over each (possibly memory-mapped) label map
            lab = np.asarray(lab)
            self.foreground.append(_foreground_index(lab, targets, 5000, index_rng))
            # Sparse labels: some training voxel is unlabelled (a dense dataset that declares ignore samples as usual).
            self.sparse = self.sparse or (ignore_index is not None and bool((lab == ignore_index).any()))

    # The position is the whole state: batch i is a pure function of (seed, i).
    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def _starts(self, index: int, rng: np.random.Generator) -> list[int]:
        """Where the patch of case ``index`` starts (per axis; negative = hanging over the edge)."""
        shape = self.labels[index].shape
        # With an ignore label a crop may hang over each edge by half a patch (filled with 0 / ignore):
        # where the patch spans an axis, a crop inside the image always puts the labelled slices of a
        # sparse annotation at the same patch positions, and the network learns to be right only there.
        over = [p // 2 if self.sparse else 0 for p in self.patch_size]
        classes = [coords for coords in self.foreground[index] if len(coords)]
        if classes and rng.random() < self.foreground_fraction:
            coords = classes[int(rng.integers(len(classes)))]
            centre = coords[int(rng.integers(len(coords)))]
            return [int(np.clip(c - p // 2, -o, s - p + o)) for c, p, s, o in zip(centre, self.patch_size, shape, over)]
        return [int(rng.integers(-o, s - p + o + 1)) for s, p, o in zip(shape, self.patch_size, over)]

    @property
    def _label_fill(self) -> int:
        """What labels beyond a case's edge read as: the ignore label if the data has one, else background."""
        return self.ignore_index if self.ignore_index is not None else 0

    def _crop(self, index: int, starts: list[int], warp: Warp | None) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.images[index], self.labels[index]
        if warp is not None:
            return warp_patch(image, label, starts, self.patch_size, warp, self._label_fill)
        if any(s < 0 or s + p > n for s, p, n in zip(starts, self.patch_size, label.shape)):
            return (extract_window(image, starts, self.patch_size, 0.0, lead=1),
                    extract_window(label, starts, self.patch_size, self._label_fill))
        window = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        return np.asarray(image[(slice(None),) + window], dtype=np.float32), np.asarray(label[window])

    def _draw_warp(self, rng: np.random.Generator) -> Warp | None:
        """This patch's rotation/scaling and elastic deformation, or None (a plain crop)."""
        rotate = rng.random() < self.rotate_scale_prob  # drawn for every patch: batches without rotation stay as they were
        elastic = self.elastic_prob > 0 and rng.random() < self.elastic_prob
        if not (rotate or elastic):
            return None
        nd = len(self.patch_size)
        matrix = random_rotation_scale(self.spacing, rng, self.rotation, self.scale_range) if rotate else np.eye(nd)
        displacement = random_displacement(self.patch_size, self.spacing, rng) if elastic else None
        return Warp(matrix, displacement)

    def _draw_augment(self, rng: np.random.Generator, channels: int) -> _Augment:
        """This patch's flips, 90-degree turn and intensity jitter (drawn in a fixed order)."""
        nd = len(self.patch_size)
        flips = [axis for axis in range(nd) if rng.random() < 0.5] if self.flips else []
        turn = None
        if self.turn_planes:
            k = int(rng.integers(0, 4))
            plane = self.turn_planes[int(rng.integers(len(self.turn_planes)))] if len(self.turn_planes) > 1 else self.turn_planes[0]
            turn = (k, plane) if k else None
        jitter = None
        if self.intensity_jitter > 0:
            j, shape = self.intensity_jitter, (channels,) + (1,) * nd
            scale = 1.0 + rng.uniform(-j, j, size=shape)
            jitter = (scale.astype(np.float32), rng.uniform(-j, j, size=shape).astype(np.float32))
        return _Augment(flips, turn, jitter)

    def batch(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at ``position`` (deterministic)."""
        rng = np.random.default_rng([self.seed, position])
        images, labels = [], []
        for _ in range(self.batch_size):
            index = int(rng.integers(0, len(self.images)))
            starts = self._starts(index, rng)
            augment = self._draw_augment(rng, self.images[index].shape[0])
            # Rotation/scaling come first, resampled from the case around the patch (not from the cropped patch).
            image, label = augment.apply(*self._crop(index, starts, self._draw_warp(rng)))
            images.append(np.ascontiguousarray(image))
            labels.append(np.ascontiguousarray(label))
        image_t = torch.from_numpy(np.stack(images))
        label_t = torch.from_numpy(np.stack(labels).astype(np.int64, copy=False))
        return self.intensity(image_t, rng, lowres_axes=self.lowres_axes), label_t


@dataclass(frozen=True)
class _Augment:
    """Drawn flips (axes), 90-degree turn (k, plane) and intensity jitter (scale, shift) of one patch."""

    flips: list[int]
    turn: tuple[int, tuple[int, int]] | None
    jitter: tuple[np.ndarray, np.ndarray] | None

    def apply(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image (C, *S) and label (*S) flipped, turned and jittered."""
        for axis in self.flips:
            image, label = np.flip(image, axis + 1), np.flip(label, axis)
        if self.turn is not None:
            k, (a, b) = self.turn
            image, label = np.rot90(image, k, axes=(a + 1, b + 1)), np.rot90(label, k, axes=(a, b))
        if self.jitter is not None:
            image = image * self.jitter[0] + self.jitter[1]
        return image, label


class _BatchDataset(torch.utils.data.Dataset):
    """Map-style view of a sampler: item ``i`` is batch ``i`` (so workers may build them in any order)."""

    def __init__(self, sampler: PatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sampler.batch(position)


def iterate_batches(sampler: PatchSampler, start: int, stop: int, num_workers: int = 0,
                    pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches ``start..stop-1`` in order, built in ``num_workers`` processes (0 = in this process).

    Workers read the memory-mapped cases themselves, so the training step never waits on I/O
    once the prefetch queue is full; the batches are identical whatever the worker count.
    """
    if num_workers <= 0:
        return (sampler.batch(i) for i in range(start, stop))
    loader = torch.utils.data.DataLoader(
        _BatchDataset(sampler), sampler=range(start, stop), batch_size=None, num_workers=num_workers,
        prefetch_factor=4, pin_memory=pin_memory, persistent_workers=False,
    )
    return iter(loader)
