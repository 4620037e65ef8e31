"""Segmentation losses."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unetcli.models.blocks import center_crop


class DiceCELoss(nn.Module):
    """Cross-entropy plus softmax soft Dice, computed from one log-softmax.

    ``loss = ce_weight * CE + dice_weight * (1 - mean_c Dice_c)`` with, per sample and class,
    ``Dice_c = (2 * sum(p * y) + smooth_nr) / (sum(p) + sum(y) + smooth_dr)`` (``batch_dice``
    sums over the batch too, as nnU-Net does for 3D). Matches MONAI's
    ``DiceCELoss(softmax=True, to_onehot_y=True)`` with the same options.

    Args:
        include_background: count class 0 in the Dice term (the CE term always sees all classes).
        dice_weight, ce_weight: weights of the two terms.
        smooth_nr, smooth_dr: added to the Dice numerator and denominator (empty-class behaviour).
        batch_dice: pool Dice statistics over the batch instead of averaging per sample.
        class_weights: optional CE weight per class.
        ignore_index: target value of unlabelled voxels (the ``ignore`` label): they add nothing
            to either term, nor to the gradient; a batch with no labelled voxel has loss 0.

    Shape:
        logits (N, C, *S) float; target (N, *S) or (N, 1, *S) integer class indices.
        If the logits are spatially smaller than the target (valid-padding U-Net), the target is
        centre-cropped to them.
    """

    def __init__(
        self,
        include_background: bool = True,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        batch_dice: bool = False,
        class_weights: torch.Tensor | None = None,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.include_background = include_background
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.batch_dice = batch_dice
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _match_target(logits, target)
        valid = None if self.ignore_index is None else target != self.ignore_index
        if valid is not None:
            target = target.masked_fill(~valid, 0)
        # One log-softmax feeds both terms: CE is its NLL, Dice uses its exp.
        log_probs = F.log_softmax(logits.float(), dim=1)
        if valid is None:
            ce = F.nll_loss(log_probs, target, weight=self.class_weights)
        else:  # nll_loss's weighted mean, over the labelled voxels only
            voxel_weight = valid.to(log_probs.dtype)
            if self.class_weights is not None:
                voxel_weight = voxel_weight * self.class_weights[target]
            nll = F.nll_loss(log_probs, target, weight=self.class_weights, reduction="none")
            ce = (nll * valid).sum() / voxel_weight.sum().clamp_min(1e-8)
        probs = log_probs.exp()
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
        if valid is not None:
            mask = valid[:, None].to(probs.dtype)
            probs, onehot = probs * mask, onehot * mask
        if not self.include_background:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        dice = _soft_dice(probs, onehot, self.batch_dice, self.smooth_nr, self.smooth_dr)
        return self.ce_weight * ce + self.dice_weight * (1.0 - dice.mean())


class RegionDiceBCELoss(nn.Module):
    """Binary cross-entropy plus sigmoid soft Dice, one output per (possibly overlapping) region.

    The target is the stored label map; region ``r`` is the set of its class indices
    ``regions[r]`` (e.g. whole tumour = {1, 2, 3} contains core = {2, 3}). ``loss = bce_weight *
    mean BCE + dice_weight * (1 - mean_r Dice_r)`` with ``Dice_r = (2 sum(p y) + smooth_nr) /
    (sum(p) + sum(y) + smooth_dr)``, ``p = sigmoid(logit_r)``, per sample or pooled over the batch
    (``batch_dice``), as nnU-Net trains BraTS-style regions.

    Args:
        regions: class indices of each region.
        ignore_index: target value of unlabelled voxels, left out of both terms and the gradient.

    Shape:
        logits (N, R, *S); target (N, *S) or (N, 1, *S) integer class indices (centre-cropped to the
        logits for valid-padding networks).
    """

    def __init__(self, regions: list[list[int]], dice_weight: float = 1.0, bce_weight: float = 1.0,
                 smooth_nr: float = 1e-5, smooth_dr: float = 1e-5, batch_dice: bool = False,
                 ignore_index: int | None = None) -> None:
        super().__init__()
        classes = 1 + max([c for r in regions for c in r] + [ignore_index or 0])
        membership = torch.zeros(classes, len(regions))
        for r, members in enumerate(regions):
            membership[members, r] = 1.0
        self.register_buffer("membership", membership, persistent=False)
        self.dice_weight, self.bce_weight = dice_weight, bce_weight
        self.smooth_nr, self.smooth_dr = smooth_nr, smooth_dr
        self.batch_dice = batch_dice
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = _match_target(logits, target)
        valid = None if self.ignore_index is None else target != self.ignore_index
        logits = logits.float()
        targets = region_targets(target, self.membership)
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        probs = torch.sigmoid(logits)
        if valid is None:
            bce = bce.mean()
        else:
            mask = valid[:, None].to(logits.dtype)
            bce = (bce * mask).sum() / (mask.sum() * logits.shape[1]).clamp_min(1e-8)
            probs, targets = probs * mask, targets * mask
        dice = _soft_dice(probs, targets, self.batch_dice, self.smooth_nr, self.smooth_dr)
        return self.bce_weight * bce + self.dice_weight * (1.0 - dice.mean())


def region_targets(target: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """Label map (N, *S) -> region masks (N, R, *S) float, by a (classes, R) membership table."""
    table = membership.to(target.device)
    return table[target.clamp(0, table.shape[0] - 1)].movedim(-1, 1)


def _match_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Integer labels (N, *S') matching the logits' spatial size (centre crop for valid padding)."""
    if target.ndim == logits.ndim:
        target = target[:, 0]
    if target.shape[1:] != logits.shape[2:]:
        target = center_crop(target[:, None], logits.shape[2:])[:, 0]
    return target.long()


def _soft_dice(probs: torch.Tensor, onehot: torch.Tensor, batch_dice: bool, smooth_nr: float,
               smooth_dr: float) -> torch.Tensor:
    """Soft Dice per (sample,) channel of (N, K, *S) probabilities against (N, K, *S) targets."""
    dims = tuple(range(2, probs.ndim))
    if batch_dice:
        dims = (0,) + dims
    intersection = (probs * onehot).sum(dims)
    denominator = probs.sum(dims) + onehot.sum(dims)
    return (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)


def deep_supervision_weights(levels: int) -> list[float]:
    """nnU-Net's weights for outputs at decoder levels 0 (full resolution) .. ``levels - 1``:
    1 / 2^i, normalised to sum 1. (nnU-Net also lists the lowest decoder level, with weight 0: the
    network has no head there.)"""
    raw = [0.5**i for i in range(levels)]
    return [w / sum(raw) for w in raw]


def downsample_target(target: torch.Tensor, shape: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Integer labels (N, *S) for an output of spatial ``shape`` pooled by ``stride`` per axis.

    The labels under the output (the patch's labels centre-cropped to ``shape * stride``: valid
    padding loses a border)
    are sampled at each output voxel's centre (nearest neighbour, as nnU-Net's
    ``DownsampleSegForDSTransform``): label values, the ignore label included, are never mixed.
    """
    cover = [n * s for n, s in zip(shape, stride)]
    if list(target.shape[1:]) != cover:
        target = center_crop(target[:, None], cover)[:, 0]
    picks = (slice(None),) + tuple(slice(s // 2, None, s) for s in stride)
    return target[picks]


class DeepSupervisionLoss(nn.Module):
    """A loss over the outputs of a deep-supervised network: ``sum_i w_i * loss(output_i, target_i)``
    with nnU-Net's weights (:func:`deep_supervision_weights`) and the target down-sampled to each
    output (:func:`downsample_target`). A single tensor (eval-mode output) gets the plain loss.

    Args:
        loss: the per-output loss (:class:`DiceCELoss`, :class:`RegionDiceBCELoss`), which takes labels.
        strides: per output, its pooling per axis relative to the full-resolution output.

    Shape:
        outputs: a list of (N, K, *S_i), full resolution first (or one tensor); target (N, *S).
    """

    def __init__(self, loss: nn.Module, strides: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.loss = loss
        self.strides = [tuple(int(v) for v in s) for s in strides]
        self.weights = deep_supervision_weights(len(self.strides))

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        if target.ndim == outputs[0].ndim:
            target = target[:, 0]
        total = self.weights[0] * self.loss(outputs[0], target)
        for weight, output, stride in zip(self.weights[1:], outputs[1:], self.strides[1:]):
            # With valid padding a coarser output sees more of the patch than the full-resolution one:
            # its target is cut from the whole patch's labels.
            total = total + weight * self.loss(output, downsample_target(target.long(), output.shape[2:], stride))
        return total
