"""How sure the network was of one prediction, summed from the probabilities the sliding window
already computes (no second pass of the network).

Per class, over the voxels predicted as that class: how many, the sum of the class's probability,
of the margin (top probability minus the runner-up) and of the normalised entropy; over all
voxels: the sum of the class's probability. From these, :meth:`ConfidenceSums.expected_dice` is
the Dice the prediction would have if the probabilities were calibrated
(``2 * sum_{predicted k} p_k / (|predicted k| + sum_all p_k)``). With mirror test-time
augmentation, the share of predicted-foreground window voxels whose class changes under a flip.
"""

from __future__ import annotations

import math

import numpy as np
import torch

CHUNK_ROWS = 8
"""Rows (first spatial axis) per step: temporaries stay a few rows of the volume, whatever its size."""


class ConfidenceSums:
    """Running sums over the voxels of one case (softmax classes or sigmoid regions)."""

    def __init__(self, num_classes: int, regions: bool = False) -> None:
        self.num_classes, self.regions = num_classes, regions
        self.voxels = np.zeros(num_classes)
        self.prob_in = np.zeros(num_classes)
        self.prob_all = np.zeros(num_classes)
        self.margin_in = np.zeros(num_classes)
        self.entropy_in = np.zeros(num_classes)
        self.flip_voxels = 0
        self.flip_changed = 0

    # ------------------------------------------------------------------ accumulating

    @torch.no_grad()
    def add(self, probabilities: torch.Tensor) -> None:
        """Count a block of probabilities (K, *S) of image voxels (no padding)."""
        for lo in range(0, probabilities.shape[1], CHUNK_ROWS):
            block = probabilities[:, lo : lo + CHUNK_ROWS].reshape(probabilities.shape[0], -1).float()
            if self.regions:
                self._add_regions(block)
            else:
                self._add_classes(block)

    def _add_classes(self, p: torch.Tensor) -> None:
        k = p.shape[0]  # a softmax has at least two classes
        values, indices = p.topk(2, dim=0)
        labels, margin = indices[0], values[0] - values[1]
        entropy = -(p * p.clamp_min(1e-12).log()).sum(0) / math.log(max(k, 2))
        self.voxels += torch.bincount(labels, minlength=k).double().numpy()
        self.prob_in += torch.bincount(labels, weights=values[0].double(), minlength=k).numpy()
        self.margin_in += torch.bincount(labels, weights=margin.double(), minlength=k).numpy()
        self.entropy_in += torch.bincount(labels, weights=entropy.double(), minlength=k).numpy()
        self.prob_all += p.double().sum(1).numpy()

    def _add_regions(self, p: torch.Tensor) -> None:
        inside = p > 0.5
        q = p.clamp(1e-12, 1 - 1e-12)
        entropy = -(q * q.log() + (1 - q) * (1 - q).log()) / math.log(2)
        self.voxels += inside.sum(1).double().numpy()
        self.prob_in += (p * inside).double().sum(1).numpy()
        self.margin_in += ((2 * p - 1).abs() * inside).double().sum(1).numpy()
        self.entropy_in += (entropy * inside).double().sum(1).numpy()
        self.prob_all += p.double().sum(1).numpy()

    def choice(self, probabilities: torch.Tensor) -> torch.Tensor:
        """What a window batch (B, K, *S) predicts: classes (B, *S) as uint8, or region masks (B, K, *S);
        kept per mirror pass (a byte per voxel, not K floats)."""
        if self.regions:
            return probabilities > 0.5
        return probabilities.argmax(1).to(torch.uint8 if self.num_classes <= 256 else torch.int64)

    @torch.no_grad()
    def add_flips(self, mean: torch.Tensor, passes: list[torch.Tensor]) -> None:
        """Mirror TTA: window probabilities (B, K, *S) averaged over flips, and each flip's :meth:`choice`."""
        chosen = self.choice(mean)
        foreground = chosen.any(1) if self.regions else chosen > 0
        changed = torch.zeros_like(foreground)
        for other in passes:
            changed |= (other != chosen).any(1) if self.regions else other != chosen
        self.flip_voxels += int(foreground.sum())
        self.flip_changed += int((changed & foreground).sum())

    # ------------------------------------------------------------------ per-case figures

    def foreground_classes(self) -> range:
        """Indices of the foreground outputs: every region, or the classes but the background."""
        return range(0 if self.regions else 1, self.num_classes)

    def expected_dice(self) -> np.ndarray:
        """Per output: the Dice of the prediction against its own probabilities (1 where both are empty)."""
        denominator = self.voxels + self.prob_all
        safe = np.where(denominator > 0, denominator, 1.0)
        return np.where(denominator > 1e-6, 2 * self.prob_in / safe, 1.0)

    def mean_in_foreground(self, sums: np.ndarray) -> float:
        """A per-voxel sum (margin, entropy) averaged over every predicted-foreground voxel; NaN if none."""
        fg = list(self.foreground_classes())
        count = float(self.voxels[fg].sum())
        return float(sums[fg].sum() / count) if count > 0 else math.nan

    def summary(self) -> dict[str, float]:
        """The case's confidence signals: expected Dice (mean over foreground outputs), margin and
        entropy over the predicted foreground, and the mirror disagreement (NaN without mirroring)."""
        fg = list(self.foreground_classes())
        return {
            "softmax_dice": float(np.mean(self.expected_dice()[fg])) if fg else math.nan,
            "margin": self.mean_in_foreground(self.margin_in),
            "entropy": self.mean_in_foreground(self.entropy_in),
            "mirror_disagreement": self.flip_changed / self.flip_voxels if self.flip_voxels else math.nan,
        }
