"""Tests for unetcli.training.losses.DiceCELoss: hand-computed values, MONAI agreement, cropping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from unetcli.training.losses import DiceCELoss

SMOOTH = 1e-5
LOG3 = math.log(3.0)

# 2 classes, one 2x2 image. Class-1 logit minus class-0 logit is log 3, 0, -log 3, log 3, so
# p1 = [[3/4, 1/2], [1/4, 3/4]] and p0 = 1 - p1 exactly.
HAND_LOGITS = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[LOG3, 0.0], [-LOG3, LOG3]]]], dtype=torch.float64)
HAND_TARGET = torch.tensor([[[1, 1], [0, 0]]])

# CE: -log p_target per pixel: -log(3/4), -log(1/2), -log(3/4), -log(1/4)
HAND_CE = (-math.log(0.75) - math.log(0.5) - math.log(0.75) - math.log(0.25)) / 4
# class 0: p0 = [[1/4, 1/2], [3/4, 1/4]], y0 = [[0, 0], [1, 1]] -> I = 1, sum p = 1.75, sum y = 2
HAND_DICE0 = (2 * 1.0 + SMOOTH) / (1.75 + 2 + SMOOTH)
# class 1: p1 = [[3/4, 1/2], [1/4, 3/4]], y1 = [[1, 1], [0, 0]] -> I = 1.25, sum p = 2.25, sum y = 2
HAND_DICE1 = (2 * 1.25 + SMOOTH) / (2.25 + 2 + SMOOTH)


def test_hand_computed_with_background():
    loss = DiceCELoss(include_background=True)(HAND_LOGITS, HAND_TARGET)
    expected = HAND_CE + 1 - (HAND_DICE0 + HAND_DICE1) / 2
    assert HAND_CE == pytest.approx(0.6637014, abs=1e-6)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_without_background_and_weights():
    loss = DiceCELoss(include_background=False, dice_weight=0.5, ce_weight=2.0)(HAND_LOGITS, HAND_TARGET)
    expected = 2.0 * HAND_CE + 0.5 * (1 - HAND_DICE1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hand_computed_ce_only_and_dice_only():
    ce = DiceCELoss(dice_weight=0.0)(HAND_LOGITS, HAND_TARGET)
    assert ce.item() == pytest.approx(HAND_CE, abs=1e-6)
    dice = DiceCELoss(ce_weight=0.0)(HAND_LOGITS, HAND_TARGET)
    assert dice.item() == pytest.approx(1 - (HAND_DICE0 + HAND_DICE1) / 2, abs=1e-6)


def test_target_with_channel_axis_is_accepted():
    a = DiceCELoss()(HAND_LOGITS, HAND_TARGET)
    b = DiceCELoss()(HAND_LOGITS, HAND_TARGET[:, None])
    assert a.item() == pytest.approx(b.item(), abs=1e-7)


@pytest.mark.parametrize(
    "shape,include_background,batch_dice",
    [(s, ib, bd) for s, ib, bd in itertools.product([(2, 3, 5, 6), (2, 3, 4, 5, 3)], [True, False], [True, False])],
    ids=lambda v: str(v),
)
def test_matches_monai(shape, include_background, batch_dice):
    monai_losses = pytest.importorskip("monai.losses")
    gen = torch.Generator().manual_seed(len(shape) * 10 + include_background * 2 + batch_dice)
    logits = torch.randn(shape, generator=gen) * 2
    target = torch.randint(0, shape[1], (shape[0], 1) + shape[2:], generator=gen)
    # sample 1 has no class 2, which exercises the smoothing terms of an empty class
    target[1] = torch.where(target[1] == 2, torch.zeros_like(target[1]), target[1])
    ours = DiceCELoss(include_background=include_background, batch_dice=batch_dice, dice_weight=0.7, ce_weight=1.3)
    ref = monai_losses.DiceCELoss(
        to_onehot_y=True,
        softmax=True,
        include_background=include_background,
        batch=batch_dice,
        lambda_dice=0.7,
        lambda_ce=1.3,
    )
    assert ours(logits, target).item() == pytest.approx(ref(logits, target).item(), abs=1e-5)
    assert ours(logits, target[:, 0]).item() == pytest.approx(ref(logits, target).item(), abs=1e-5)


@pytest.mark.parametrize("target_size,start", [(8, 2), (7, 1)])
def test_target_is_centre_cropped_to_smaller_logits(target_size, start):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=gen)
    target = torch.randint(0, 3, (2, target_size, target_size), generator=gen)
    cropped = target[:, start : start + 4, start : start + 4]
    loss = DiceCELoss()
    assert loss(logits, target).item() == pytest.approx(loss(logits, cropped).item(), abs=1e-7)
    assert loss(logits, target[:, None]).item() == pytest.approx(loss(logits, cropped).item(), abs=1e-7)
    # a wrongly placed crop gives a different value, so the comparison is meaningful
    corner = target[:, :4, :4]
    assert loss(logits, corner).item() != pytest.approx(loss(logits, cropped).item(), abs=1e-4)


def test_centre_crop_3d():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 2, 2, 3, 4, generator=gen)
    target = torch.randint(0, 2, (1, 6, 5, 8), generator=gen)
    cropped = target[:, 2:4, 1:4, 2:6]
    assert DiceCELoss()(logits, target).item() == pytest.approx(DiceCELoss()(logits, cropped).item(), abs=1e-7)


def test_loss_decreases_towards_target():
    gen = torch.Generator().manual_seed(3)
    target = torch.randint(0, 3, (2, 6, 6), generator=gen)
    onehot = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    noise = torch.randn(2, 3, 6, 6, generator=gen)
    loss = DiceCELoss(include_background=False)
    values = [loss(noise + a * onehot, target).item() for a in (0.0, 1.0, 2.0, 4.0, 8.0)]
    assert all(b < a for a, b in zip(values, values[1:])), values
    perfect = loss(20.0 * onehot, target).item()
    assert perfect < 1e-3 < values[0]


def test_loss_has_gradient_and_class_weights_change_ce():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 3, 4, 4, generator=gen, requires_grad=True)
    target = torch.randint(0, 3, (1, 4, 4), generator=gen)
    DiceCELoss()(logits, target).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    plain = DiceCELoss(dice_weight=0)(logits.detach(), target).item()
    weighted = DiceCELoss(dice_weight=0, class_weights=torch.tensor([1.0, 5.0, 0.1]))(logits.detach(), target).item()
    expected = torch.nn.functional.cross_entropy(logits.detach(), target, weight=torch.tensor([1.0, 5.0, 0.1])).item()
    assert weighted == pytest.approx(expected, abs=1e-6)
    assert weighted != pytest.approx(plain, abs=1e-4)
