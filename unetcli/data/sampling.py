"""Training batches: random patches with augmentation, drawn from (memory-mapped) cases.

Batch ``i`` is a pure function of ``(seed, i)``: its random numbers come from
``numpy.random.default_rng([seed, i])``. So worker processes can build batches in any order,
and a resumed run only needs the batch position to draw exactly the batches an uninterrupted
run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from unetcli.data.augment import IntensityAugmentation
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
            sparse labels do not sit at fixed patch positions.
        margin: voxels a valid-padding network loses per side (per axis); images are mirror-padded by it.
        foreground_fraction: share of patches centred on a voxel of a random foreground class
            present in the case (nnU-Net uses 1/3); the rest are uniformly random crops.
        flips, rotate90: mirror every spatial axis / turn in the last two axes (square patches only).
        rotate_scale_prob: probability of a random rotation (+-30 deg) and scaling (0.7..1.4) per patch.
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
    ) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.foreground_fraction = foreground_fraction
        self.flips = flips
        # 90-degree turns keep the patch shape only when the last two axes are equal.
        self.rotate90 = rotate90 and self.patch_size[-1] == self.patch_size[-2]
        self.rotate_scale_prob = rotate_scale_prob
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

    def _crop(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.images[index], self.labels[index]
        shape = label.shape
        # With an ignore label a crop may hang over each edge by half a patch (filled with 0 / ignore):
        # where the patch spans an axis, a crop inside the image always puts the labelled slices of a
        # sparse annotation at the same patch positions, and the network learns to be right only there.
        over = [p // 2 if self.sparse else 0 for p in self.patch_size]
        classes = [coords for coords in self.foreground[index] if len(coords)]
        if classes and rng.random() < self.foreground_fraction:
            coords = classes[int(rng.integers(len(classes)))]
            centre = coords[int(rng.integers(len(coords)))]
            starts = [int(np.clip(c - p // 2, -o, s - p + o)) for c, p, s, o in zip(centre, self.patch_size, shape, over)]
        else:
            starts = [int(rng.integers(-o, s - p + o + 1)) for s, p, o in zip(shape, self.patch_size, over)]
        if any(over):
            return _extract(image, starts, self.patch_size, 0.0, lead=1), _extract(label, starts, self.patch_size,
                                                                                   self.ignore_index)  # type: ignore[arg-type]
        window = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        return np.asarray(image[(slice(None),) + window], dtype=np.float32), np.asarray(label[window])

    def _augment(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        nd = label.ndim
        if self.flips:
            for axis in range(nd):
                if rng.random() < 0.5:
                    image, label = np.flip(image, axis + 1), np.flip(label, axis)
        if self.rotate90:
            k = int(rng.integers(0, 4))
            if k:
                image, label = np.rot90(image, k, axes=(-2, -1)), np.rot90(label, k, axes=(-2, -1))
        if self.intensity_jitter > 0:
            j = self.intensity_jitter
            scale = 1.0 + rng.uniform(-j, j, size=(image.shape[0],) + (1,) * nd)
            shift = rng.uniform(-j, j, size=(image.shape[0],) + (1,) * nd)
            image = image * scale.astype(np.float32) + shift.astype(np.float32)
        return image, label

    def batch(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch at ``position`` (deterministic)."""
        rng = np.random.default_rng([self.seed, position])
        images, labels, transforms = [], [], []
        for _ in range(self.batch_size):
            index = int(rng.integers(0, len(self.images)))
            image, label = self._augment(*self._crop(index, rng), rng)
            images.append(np.ascontiguousarray(image))
            labels.append(np.ascontiguousarray(label))
            transforms.append(_random_affine(len(self.patch_size), rng) if rng.random() < self.rotate_scale_prob else None)
        image_t = torch.from_numpy(np.stack(images))
        label_t = torch.from_numpy(np.stack(labels).astype(np.int64, copy=False))
        if any(t is not None for t in transforms):
            image_t, label_t = _apply_affines(image_t, label_t, transforms)
        return self.intensity(image_t, rng), label_t


def _extract(array: np.ndarray, starts: Sequence[int], size: Sequence[int], fill: float, lead: int = 0) -> np.ndarray:
    """The window ``[starts, starts + size)`` of the trailing axes of ``array``, ``fill`` outside it
    (float32 with ``lead`` leading axes kept, else the array's own dtype)."""
    spatial = array.shape[lead:]
    out = np.full(array.shape[:lead] + tuple(size), fill, dtype=np.float32 if lead else array.dtype)
    src = tuple(slice(max(a, 0), min(a + n, s)) for a, n, s in zip(starts, size, spatial))
    dst = tuple(slice(r.start - a, r.stop - a) for r, a in zip(src, starts))
    lead_all = (slice(None),) * lead
    out[lead_all + dst] = array[lead_all + src]
    return out


def _random_affine(nd: int, rng: np.random.Generator) -> np.ndarray:
    """An (nd, nd) rotation (+-30 deg about each axis, in-plane only for 2D) times an isotropic scale."""
    scale = float(rng.uniform(0.7, 1.4))
    if nd == 2:
        a = float(rng.uniform(-np.pi / 6, np.pi / 6))
        rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    else:
        rot = np.eye(3)
        for axes in ((1, 2), (0, 2), (0, 1)):
            a = float(rng.uniform(-np.pi / 6, np.pi / 6))
            r = np.eye(3)
            r[np.ix_(axes, axes)] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
            rot = rot @ r
    return rot / scale


def _apply_affines(images: torch.Tensor, labels: torch.Tensor, transforms: list[np.ndarray | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate/scale the patches that have a transform about their centre (bilinear image, nearest label)."""
    nd = labels.ndim - 1
    theta = torch.zeros(len(transforms), nd, nd + 1)
    for i, t in enumerate(transforms):
        # affine_grid's coordinate order is reversed (x = last axis): flip the matrix to match.
        theta[i, :, :nd] = torch.from_numpy(np.flip(t if t is not None else np.eye(nd), (0, 1)).copy())
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Zero padding outside would be a fake intensity; border replication is the lesser evil.
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    labels = F.grid_sample(labels[:, None].float(), grid, mode="nearest", padding_mode="border", align_corners=False)
    return images, labels[:, 0].long()


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
