"""Segmentation losses."""

from __future__ import annotations

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
    ) -> None:
        super().__init__()
        self.include_background = include_background
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.smooth_nr = smooth_nr
        self.smooth_dr = smooth_dr
        self.batch_dice = batch_dice
        self.register_buffer("class_weights", class_weights, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim:
            target = target[:, 0]
        if target.shape[1:] != logits.shape[2:]:
            target = center_crop(target[:, None], logits.shape[2:])[:, 0]
        target = target.long()
        # One log-softmax feeds both terms: CE is its NLL, Dice uses its exp.
        log_probs = F.log_softmax(logits.float(), dim=1)
        ce = F.nll_loss(log_probs, target, weight=self.class_weights)
        probs = log_probs.exp()
        onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(probs.dtype)
        if not self.include_background:
            probs, onehot = probs[:, 1:], onehot[:, 1:]
        dims = tuple(range(2, probs.ndim))
        if self.batch_dice:
            dims = (0,) + dims
        intersection = (probs * onehot).sum(dims)
        denominator = probs.sum(dims) + onehot.sum(dims)
        dice = (2.0 * intersection + self.smooth_nr) / (denominator + self.smooth_dr)
        return self.ce_weight * ce + self.dice_weight * (1.0 - dice.mean())
