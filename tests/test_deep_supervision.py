"""Deep supervision (train.deep_supervision): training-only heads on the decoder levels, nnU-Net's
weights, labels down-sampled per level (per-axis strides, ignore kept, valid padding cropped), and
prediction that uses the full-resolution output only, from new and old checkpoints alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import invoke_quiet, make_blobs
from PIL import Image

from unetcli.models import UNet
from unetcli.training.losses import (DeepSupervisionLoss, DiceCELoss, RegionDiceBCELoss, deep_supervision_weights,
                                     downsample_target)

THICK_STRIDES = [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


def test_weights_are_nnunets_halving_per_level_normalised() -> None:
    # nnU-Net, 4 decoder levels: 1, 1/2, 1/4 and 0 for the lowest, normalised.
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]


def test_training_returns_one_output_per_supervised_level_with_per_axis_strides() -> None:
    torch.manual_seed(0)
    # 4 decoder levels: heads on levels 1 and 2 (level 3, the lowest, has nnU-Net weight 0)
    net = UNet(3, 1, 3, features=(4, 8, 8, 8, 8), strides=THICK_STRIDES, norm="instance", deep_supervision=True)
    x = torch.randn(2, 1, 32, 32, 16)
    outputs = net.train()(x)
    assert net.level_strides() == [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 32, 16), (2, 3, 16, 16, 16), (2, 3, 8, 8, 8)]
    full = net.eval()(x)
    assert isinstance(full, torch.Tensor) and full.shape == (2, 3, 32, 32, 16)


def test_heads_change_nothing_at_prediction_and_a_network_without_them_loads_their_checkpoint() -> None:
    torch.manual_seed(0)
    supervised = UNet(2, 1, 3, features=(4, 8, 16, 16), deep_supervision=True).eval()
    assert any(k.startswith("ds_heads.") for k in supervised.state_dict())
    plain = UNet(2, 1, 3, features=(4, 8, 16, 16)).eval()
    plain.load_state_dict(supervised.state_dict())  # strict: the heads are left out, nothing else is
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(plain(x), supervised(x))
    old = UNet(2, 1, 3, features=(4, 8, 16, 16)).state_dict()  # an old checkpoint: no heads
    assert not any(k.startswith("ds_heads.") for k in old)


def test_targets_are_sampled_per_axis_never_mixing_labels_and_keeping_ignore() -> None:
    target = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    target[0, :, :, 2:] = 1
    target[0, ::2, :, :] = 5  # an ignore label on every other row: never averaged away or into a class
    small = downsample_target(target, (4, 4, 4), (2, 2, 1))
    assert small.shape == (1, 4, 4, 4)
    assert set(small.unique().tolist()) <= {0, 1, 5}
    assert torch.equal(small, target[:, 1::2, 1::2, :])
    # valid padding: a 4 x 4 output pooled by 2 covers the central 8 x 8 of a 10 x 10 patch
    patch = torch.arange(100).view(1, 10, 10)
    assert torch.equal(downsample_target(patch, (4, 4), (2, 2)), patch[:, 1:9, 1:9][:, 1::2, 1::2])


@pytest.mark.parametrize("loss", [DiceCELoss(ignore_index=3), RegionDiceBCELoss([[1, 2], [2]], ignore_index=3)])
def test_the_loss_is_the_weighted_sum_over_levels_and_a_plain_tensor_gets_the_plain_loss(loss) -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 8, 8))
    outputs = [torch.randn(2, 3 if isinstance(loss, DiceCELoss) else 2, 8 // s, 8 // s, requires_grad=True) for s in (1, 2, 4)]
    ds = DeepSupervisionLoss(loss, [(1, 1), (2, 2), (4, 4)])
    expected = sum(w * loss(o, target[:, s // 2::s, s // 2::s]) for w, o, s in zip(deep_supervision_weights(3), outputs, (1, 2, 4)))
    value = ds(outputs, target)
    assert torch.allclose(value, expected) and torch.isfinite(value)
    value.backward()
    assert all(o.grad is not None and o.grad.abs().sum() > 0 for o in outputs)
    assert torch.equal(ds(outputs[0], target), loss(outputs[0], target))


@pytest.mark.parametrize("kind", [dict(padding="valid"), dict(encoder="residual", blocks_per_level=(1, 1, 1, 1))])
def test_valid_padding_and_residual_networks_train_with_deep_supervision(kind) -> None:
    torch.manual_seed(0)
    net = UNet(2, 1, 2, features=(4, 8, 8, 8), deep_supervision=True, **kind)
    size = net.valid_input_size(44)
    x, target = torch.randn(2, 1, *size), torch.randint(0, 2, (2, *size))
    outputs = net.train()(x)
    loss = DeepSupervisionLoss(DiceCELoss(), net.level_strides())(outputs, target)
    loss.backward()
    assert torch.isfinite(loss) and net.ds_heads[0].weight.grad is not None


def test_a_deep_supervised_run_trains_and_predicts_full_resolution_masks(tmp_path: Path) -> None:
    """The CLI path end to end (the one slow test here, ~5 s): train, checkpoint with heads, predict."""
    data = make_blobs(tmp_path / "data", n=3)
    run = tmp_path / "run"
    result = invoke_quiet("train", data, "--out", run, "--epochs", "1", "--precision", "fp32",
                          "--set", "model.features=[4,8,8,8]", "--set", "train.deep_supervision=true",
                          "--set", "train.iterations_per_epoch=1", "--set", "train.warmup_iterations=1",
                          "--set", "train.num_workers=0", "--set", "train.batch_size=2")
    assert result.exit_code == 0, result.output
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert any(k.startswith("ds_heads.") for k in state["model"]) and state["config"]["train"]["deep_supervision"]
    result = invoke_quiet("predict", run, data / "images", tmp_path / "pred", "--device", "cpu")
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(tmp_path / "pred" / "case00.png"))
    assert mask.shape == (32, 32)
