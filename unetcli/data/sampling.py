"""Training batches: random patches with augmentation, drawn from in-memory cases by a seeded RNG.

All randomness comes from one ``numpy.random.Generator`` whose state is saved in checkpoints,
so a resumed run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from unetcli.data.dataset import Case


def pad_to_cover(array: np.ndarray, spatial_shape: Sequence[int], margin: int, mode: str = "reflect") -> np.ndarray:
    """Pad the trailing spatial axes by ``margin`` per side and up to ``spatial_shape`` (mirror padding)."""
    spatial = array.shape[-len(spatial_shape):]
    pads = []
    for size, target in zip(spatial, spatial_shape):
        extra = max(0, target - (size + 2 * margin))
        pads.append((margin + extra // 2, margin + extra - extra // 2))
    if not any(lo or hi for lo, hi in pads):
        return array
    lead = [(0, 0)] * (array.ndim - len(spatial_shape))
    return np.pad(array, lead + pads, mode=mode)


class PatchSampler:
    """Draws (image, label) batches of fixed patch size with flips, 90-degree rotations and
    intensity jitter.

    Args:
        cases: loaded cases (image (C, *S), label (*S)).
        patch_size: network input size per spatial axis.
        batch_size: patches per batch.
        margin: voxels a valid-padding network loses per side; images are mirror-padded by
            it so that the network's (smaller) output still covers the whole image.
        flips, rotate90, intensity_jitter: augmentation switches (see ``TrainConfig``).
        seed: seeds the sampler's own generator.

    Returns from :meth:`next_batch`: image (B, C, *patch) float32, label (B, *patch) int64.
    """

    def __init__(
        self,
        cases: Sequence[Case],
        patch_size: Sequence[int],
        batch_size: int,
        margin: int = 0,
        flips: bool = True,
        rotate90: bool = True,
        intensity_jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.patch_size = tuple(int(p) for p in patch_size)
        self.batch_size = batch_size
        self.flips = flips
        # 90-degree turns keep the patch shape only when the last two axes are equal.
        self.rotate90 = rotate90 and self.patch_size[-1] == self.patch_size[-2]
        self.intensity_jitter = intensity_jitter
        self.images = [pad_to_cover(c.image, self.patch_size, margin) for c in cases]
        self.labels = [pad_to_cover(c.label, self.patch_size, margin) for c in cases]  # type: ignore[arg-type]
        self.rng = np.random.default_rng(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["bit_generator"]

    def _crop(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image, label = self.images[index], self.labels[index]
        starts = [int(self.rng.integers(0, s - p + 1)) for s, p in zip(label.shape, self.patch_size)]
        window = tuple(slice(s, s + p) for s, p in zip(starts, self.patch_size))
        return image[(slice(None),) + window], label[window]

    def _augment(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        nd = label.ndim
        if self.flips:
            for axis in range(nd):
                if self.rng.random() < 0.5:
                    image, label = np.flip(image, axis + 1), np.flip(label, axis)
        if self.rotate90:
            k = int(self.rng.integers(0, 4))
            if k:
                image, label = np.rot90(image, k, axes=(-2, -1)), np.rot90(label, k, axes=(-2, -1))
        if self.intensity_jitter > 0:
            j = self.intensity_jitter
            scale = 1.0 + self.rng.uniform(-j, j, size=(image.shape[0],) + (1,) * nd)
            shift = self.rng.uniform(-j, j, size=(image.shape[0],) + (1,) * nd)
            image = image * scale.astype(np.float32) + shift.astype(np.float32)
        return image, label

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for _ in range(self.batch_size):
            index = int(self.rng.integers(0, len(self.images)))
            image, label = self._augment(*self._crop(index))
            images.append(image)
            labels.append(label)
        return torch.from_numpy(np.stack(images).astype(np.float32, copy=False)), torch.from_numpy(np.stack(labels))
