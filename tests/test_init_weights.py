"""Fine-tuning (`unet train --init`, `--freeze-encoder`): which weights are loaded, adapted and
re-initialised, and the errors for weights that cannot start this network."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import error_lines, invoke_quiet, make_blobs

from unetcli.config import RunConfig, config_to_dict
from unetcli.models import UNet
from unetcli.checkpoint import save_checkpoint
from unetcli.training.init_weights import adapt_input_channels, set_encoder_trainable, transfer_weights

FEATURES = [4, 8, 16]


def _unet(dims: int = 2, in_channels: int = 1, classes: int = 3, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(dims, in_channels, classes, features=FEATURES)


def _pretrained_checkpoint(path: Path, dims: int, classes: int = 3) -> Path:
    """A checkpoint as `unet train` writes it, of a network whose weights are all non-zero and known."""
    cfg = RunConfig()
    cfg.model.features, cfg.model.spatial_dims, cfg.model.in_channels, cfg.model.out_channels = FEATURES, dims, 1, classes
    model = _unet(dims, classes=classes, seed=1)
    save_checkpoint(path, {"config": config_to_dict(cfg), "metadata": {"spatial_dims": dims}, "model": model.state_dict()})
    return path


@pytest.mark.parametrize("old, new", [(1, 3), (3, 1), (2, 4)])
def test_adapted_first_convolution_keeps_the_response_to_equal_channels(old: int, new: int) -> None:
    conv = torch.nn.Conv2d(old, 5, 3, padding=1)
    adapted = torch.nn.Conv2d(new, 5, 3, padding=1)
    adapted.weight.data = adapt_input_channels(conv.weight.data, new)
    adapted.bias.data = conv.bias.data
    x = torch.randn(2, 1, 8, 8)
    assert adapted.weight.shape == (5, new, 3, 3)
    torch.testing.assert_close(adapted(x.expand(-1, new, -1, -1)), conv(x.expand(-1, old, -1, -1)), atol=1e-5, rtol=1e-5)


def test_transfer_loads_matching_tensors_adapts_the_stem_and_reinitialises_the_head() -> None:
    pretrained = _unet(in_channels=1, classes=3, seed=1)
    model = _unet(in_channels=2, classes=2, seed=2)
    fresh_head = model.head.weight.detach().clone()
    result = transfer_weights(model, {f"module.{k}": v for k, v in pretrained.state_dict().items()})  # as saved from DDP
    assert result.adapted == ["stem.0.weight"]
    assert result.reinitialised == ["head.weight", "head.bias"]
    assert not result.unused
    own, theirs = model.state_dict(), pretrained.state_dict()
    assert len(result.loaded) == len(own) - 3
    assert all(torch.equal(own[name], theirs[name]) for name in result.loaded)
    assert torch.equal(model.head.weight, fresh_head)
    torch.testing.assert_close(own["stem.0.weight"], theirs["stem.0.weight"].expand(-1, 2, -1, -1) / 2)


def test_frozen_encoder_does_not_change_while_the_decoder_learns() -> None:
    model = _unet()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    encoder = [model.stem, *model.downs]

    def snapshot() -> list[torch.Tensor]:
        return [t.detach().clone() for m in encoder for t in m.state_dict().values()]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(torch.randn(2, 1, 16, 16)).square().mean().backward()
        optimizer.step()

    before, head = snapshot(), model.head.weight.detach().clone()
    set_encoder_trainable(model, False)
    step()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))  # weights and BatchNorm statistics
    assert not torch.equal(head, model.head.weight)
    set_encoder_trainable(model, True)
    step()
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot()))


def test_fine_tuning_from_a_run_with_other_classes(tmp_path: Path) -> None:
    pretrained = _pretrained_checkpoint(tmp_path / "pretrained.pt", dims=2, classes=3)
    data = make_blobs(tmp_path / "binary", n=4, binary_255=True)
    run = tmp_path / "run"
    result = invoke_quiet("train", data, "--init", pretrained, "--out", run, "--epochs", "1", "--set", "train.iterations_per_epoch=1",
                          "--set", f"model.features={FEATURES}", "--precision", "fp32", "--set", "train.num_workers=0")
    assert result.exit_code == 0, result.output
    log = (run / "log.txt").read_text()
    assert f"initialised from {pretrained}: loaded 64 of 66 tensors; adapted: none; re-initialised: head.weight, head.bias" in log


def test_init_from_another_dimensionality_is_one_clear_error(tmp_path: Path) -> None:
    pretrained = _pretrained_checkpoint(tmp_path / "volumes.pt", dims=3)
    data = make_blobs(tmp_path / "blobs", n=4)
    result = invoke_quiet("train", data, "--init", pretrained, "--out", tmp_path / "run", "--set", f"model.features={FEATURES}",
                          "--epochs", "1", "--set", "train.iterations_per_epoch=1")
    assert result.exit_code == 2
    assert error_lines(result.output) == [
        f"error: {pretrained}: --init holds a 3D network's weights, but this run trains a 2D network"]


def test_init_that_fits_nothing_names_the_setting_to_change(tmp_path: Path) -> None:
    pretrained = _pretrained_checkpoint(tmp_path / "small.pt", dims=2)
    data = make_blobs(tmp_path / "blobs", n=4)
    result = invoke_quiet("train", data, "--init", pretrained, "--out", tmp_path / "run", "--set", "model.features=[8,16,32]",
                          "--epochs", "1", "--set", "train.iterations_per_epoch=1")
    assert result.exit_code == 2
    lines = error_lines(result.output)
    assert lines == [f"error: {pretrained}: none of its weights fits this network (model.features: [4, 8, 16] there, [8, 16, 32] here)"]
    assert "--set 'model.features=[4, 8, 16]'" in result.output


def test_freeze_encoder_needs_init(data: Path, tmp_path: Path) -> None:
    result = invoke_quiet("train", data, "--freeze-encoder", "2", "--out", tmp_path / "run", "--epochs", "1")
    assert result.exit_code == 2
    assert error_lines(result.output)[0].startswith("error: train.freeze_encoder_epochs needs train.init")


def test_freeze_encoder_in_training_keeps_the_pretrained_encoder_for_those_epochs(tmp_path: Path) -> None:
    pretrained = _pretrained_checkpoint(tmp_path / "pretrained.pt", dims=2, classes=3)
    data = make_blobs(tmp_path / "blobs", n=4)
    run = tmp_path / "run"
    result = invoke_quiet("train", data, "--init", pretrained, "--freeze-encoder", "1", "--out", run, "--epochs", "1",
                          "--set", "train.iterations_per_epoch=3", "--set", f"model.features={FEATURES}", "--precision", "fp32",
                          "--set", "train.num_workers=0", "--set", "train.warmup_iterations=0")
    assert result.exit_code == 0, result.output
    from unetcli.checkpoint import load_checkpoint

    before, after = load_checkpoint(pretrained)["model"], load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    encoder = [k for k in after if k.startswith(("stem.", "downs.")) and after[k].is_floating_point()]  # BN statistics too
    decoder = [k for k in after if k.startswith("ups.") and k.endswith("weight")]
    assert encoder and all(torch.equal(after[k], before[k]) for k in encoder)
    assert any(not torch.equal(after[k], before[k]) for k in decoder)
    resumed = invoke_quiet("train", "--resume", run, "--epochs", "2", "--init", pretrained)
    assert resumed.exit_code == 2 and "--init cannot be used with --resume" in resumed.output
