"""The residual encoder (nnU-Net's ResEnc U-Net): shapes with every skip in 2D and 3D, anisotropic
topologies, the identity shortcut, parameter counts, errors, the config path, BatchNorm folding and
export, and that it learns a toy task."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from helpers import invoke_quiet, make_blobs, with_batch_norm_statistics
from torch import nn

from unetcli.config import ModelConfig, config_from_dict
from unetcli.errors import ConfigError, ModelError
from unetcli.models import UNet, build_model, count_parameters, fold_batch_norm
from unetcli.models.blocks import ResidualBlock, ResidualDown

SKIPS = ("concat", "add", "none")
UPSAMPLES = ("transpose", "interp")
THICK_KERNELS = [[3, 3, 1], [3, 3, 3], [3, 3, 3]]
THICK_STRIDES = [[1, 1, 1], [2, 2, 1], [2, 2, 2]]


def resenc(spatial_dims: int, **kw) -> UNet:
    values = dict(features=(4, 8, 16), encoder="residual", blocks_per_level=(1, 2, 2), norm="instance")
    values.update(kw)
    return UNet(spatial_dims, 2, 3, **values)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("spatial_dims,skip,upsample", list(itertools.product((2, 3), SKIPS, UPSAMPLES)))
def test_residual_forward_shape_with_every_skip_and_upsample(spatial_dims, skip, upsample):
    torch.manual_seed(0)
    net = resenc(spatial_dims, skip=skip, upsample=upsample).eval()
    in_shape = (12, 8) if spatial_dims == 2 else (8, 4, 12)
    with torch.no_grad():
        out = net(torch.randn(1, 2, *in_shape))
    assert out.shape == (1, 3, *in_shape) and torch.isfinite(out).all()
    assert net.output_shape(in_shape) == in_shape and net.margin == (0,) * spatial_dims
    assert net.size_multiple == (4,) * spatial_dims
    assert [len(down) - 1 for down in net.downs] == [2, 2]  # pooling + blocks


@pytest.mark.parametrize("skip", SKIPS)
def test_residual_anisotropic_kernels_and_strides(skip):
    torch.manual_seed(0)
    net = resenc(3, skip=skip, kernel_sizes=THICK_KERNELS, strides=THICK_STRIDES).eval()
    plain = UNet(3, 2, 3, features=(4, 8, 16), kernel_sizes=THICK_KERNELS, strides=THICK_STRIDES)
    assert net.size_multiple == plain.size_multiple == (4, 4, 2)
    assert net.valid_input_size((9, 5, 3)) == plain.valid_input_size((9, 5, 3)) == (12, 8, 4)
    first = net.stem[0][0]
    assert first.kernel_size == (3, 3, 1) and first.padding == (1, 1, 0)
    assert net.downs[0][0].kernel_size == (2, 2, 1)
    assert net.downs[0][1].branch[0].kernel_size == (3, 3, 3)
    with torch.no_grad():
        out = net(torch.randn(2, 2, 8, 12, 6))
    assert out.shape == (2, 3, 8, 12, 6)
    with pytest.raises(ModelError, match=r"multiple of \(4, 4, 2\)"):
        net(torch.randn(1, 2, 8, 12, 5))


def test_default_blocks_are_resenc_m_and_decoder_has_one_conv():
    net = UNet(2, 1, 2, features=(4, 8, 16, 32, 64, 64, 64), encoder="residual")
    assert net.blocks_per_level == [1, 3, 4, 6, 6, 6, 6]
    assert UNet(2, 1, 2, features=(4, 8), encoder="residual").blocks_per_level == [1, 3]
    assert net.decoder_convs == 1
    assert sum(isinstance(m, nn.Conv2d) for m in net.ups[0].conv) == 1
    plain = UNet(2, 1, 2, features=(4, 8), convs_per_level=3, blocks_per_level=[9, 9])
    assert plain.decoder_convs == 3 and plain.blocks_per_level is None  # ignored by the plain encoder
    assert not any(isinstance(m, ResidualBlock) for m in plain.modules())


def test_plain_decoder_convs_keeps_valid_padding_size_contract():
    net = UNet(2, 1, 2, features=(4, 8, 16), padding="valid", norm="none", decoder_convs=1)
    size = net.valid_input_size(30)
    with torch.no_grad():
        out = net(torch.randn(1, 1, *size))
    assert out.shape[2:] == net.output_shape(size) == tuple(s - 2 * m for s, m in zip(size, net.margin))
    assert net.margin != UNet(2, 1, 2, features=(4, 8, 16), padding="valid").margin


# --------------------------------------------------------------------------- blocks and parameters


def test_residual_has_more_parameters_than_plain():
    plain = UNet(2, 1, 3, features=(8, 16, 32))
    residual = UNet(2, 1, 3, features=(8, 16, 32), encoder="residual", blocks_per_level=(1, 3, 4))
    assert count_parameters(residual) > count_parameters(plain)
    more = UNet(2, 1, 3, features=(8, 16, 32), encoder="residual", blocks_per_level=(1, 3, 5))
    assert count_parameters(more) > count_parameters(residual)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_identity_shortcut_adds_the_input(norm):
    torch.manual_seed(0)
    block = ResidualBlock(2, 6, 6, norm=norm, kernel_size=(3, 1)).eval()
    assert isinstance(block.shortcut, nn.Identity)
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        branch = block.branch(x)
        assert torch.allclose(block(x), nn.functional.leaky_relu(x + branch, 0.01), atol=1e-6)
        last_norm = block.branch[-1]
        last_norm.weight.zero_()
        last_norm.bias.zero_()
        assert torch.equal(block.branch(x), torch.zeros_like(x))
        assert torch.allclose(block(x), nn.functional.leaky_relu(x, 0.01), atol=1e-6)


def test_projection_shortcut_when_channels_change():
    block = ResidualBlock(3, 4, 8)
    assert isinstance(block.shortcut[0], nn.Conv3d) and block.shortcut[0].kernel_size == (1, 1, 1)
    assert isinstance(block.shortcut[1], nn.BatchNorm3d)
    down = ResidualDown(3, 4, 8, stride=(2, 2, 1), blocks=3)
    assert isinstance(down[0], nn.MaxPool3d) and sum(isinstance(m, ResidualBlock) for m in down) == 3
    assert down(torch.randn(1, 4, 8, 8, 3)).shape == (1, 8, 4, 4, 3)


def test_gradients_reach_every_residual_parameter():
    torch.manual_seed(0)
    net = resenc(2, skip="add", norm="batch", dropout=0.1)
    net(torch.randn(2, 2, 16, 16)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# --------------------------------------------------------------------------- errors and config


def test_residual_with_valid_padding_is_refused():
    with pytest.raises(ModelError, match="padding=same") as info:
        resenc(2, padding="valid")
    assert "padding=same" in (info.value.hint or "")


@pytest.mark.parametrize("kwargs,message", [
    (dict(blocks_per_level=[1, 2]), "blocks_per_level lists 2 levels"),
    (dict(blocks_per_level=[1, 0, 2]), "at least 1"),
    (dict(decoder_convs=0), "decoder_convs"),
    (dict(encoder="dense"), "model.encoder"),
])
def test_bad_residual_arguments(kwargs, message):
    with pytest.raises(ModelError, match=message):
        resenc(2, **kwargs)


def test_config_round_trip_builds_a_residual_net():
    cfg = config_from_dict({"model": {"encoder": "residual", "blocks_per_level": [1, 2, 2], "features": [4, 8, 16]}})
    assert cfg.model.encoder == "residual" and cfg.model.blocks_per_level == [1, 2, 2] and cfg.model.decoder_convs is None
    cfg.model.spatial_dims, cfg.model.in_channels, cfg.model.out_channels = 2, 1, 2
    net = build_model(cfg.model)
    assert isinstance(net, UNet) and net.encoder == "residual" and net.blocks_per_level == [1, 2, 2]
    plain = build_model(ModelConfig(spatial_dims=2, in_channels=1, out_channels=2, features=[4, 8], decoder_convs=3))
    assert sum(isinstance(m, nn.Conv2d) for m in plain.ups[0].conv) == 3
    assert sum(isinstance(m, nn.Conv2d) for m in plain.stem) == 2
    default = config_from_dict({"model": {"encoder": "residual"}}).model
    assert default.blocks_per_level is None


@pytest.mark.parametrize("model,message", [
    ({"blocks_per_level": [1, 0, 2, 2]}, "blocks_per_level"),
    ({"decoder_convs": 0}, "decoder_convs"),
    ({"encoder": "residual", "padding": "valid"}, "padding=same"),
    ({"encoder": "residual", "blocks_per_level": [1, 2]}, "lists 2 levels"),
    ({"encoder": "resnet"}, "encoder"),
])
def test_config_refuses_bad_residual_values(model, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"model": model})


# --------------------------------------------------------------------------- inference and training


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fold_batch_norm_and_tracing_keep_residual_outputs(spatial_dims):
    torch.manual_seed(0)
    shape = (2, 2, *(8,) * spatial_dims)
    net = with_batch_norm_statistics(resenc(spatial_dims, norm="batch", skip="add"), shape)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = net(x)
        folded = fold_batch_norm(net)
        traced = torch.jit.trace(folded, x, check_trace=False)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
        assert torch.allclose(folded(x), expected, atol=1e-4, rtol=1e-4)
        assert torch.allclose(traced(x), expected, atol=1e-4, rtol=1e-4)


def test_residual_run_trains_and_exports(tmp_path: Path):
    """The CLI path: a residual run trains, and export verifies ONNX and TorchScript against PyTorch."""
    data = make_blobs(tmp_path / "data", n=4)
    run = tmp_path / "run"
    result = invoke_quiet("train", data, "--out", run, "--epochs", "1", "--precision", "fp32",
                          "--set", "model.features=[4,8,16]", "--set", "model.encoder=residual",
                          "--set", "train.iterations_per_epoch=2", "--set", "train.warmup_iterations=1", "--set", "train.num_workers=0")
    assert result.exit_code == 0, result.output
    pytest.importorskip("onnx")
    for name in ("model.onnx", "model.pt"):
        result = invoke_quiet("export", run, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        assert (tmp_path / name).is_file()


def test_residual_net_learns_a_bright_square():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 16, 16) * 0.1
    y = torch.zeros(4, 16, 16, dtype=torch.long)
    for i, (r, c) in enumerate([(2, 3), (6, 8), (9, 1), (4, 10)]):
        x[i, 0, r:r + 5, c:c + 5] += 1.0
        y[i, r:r + 5, c:c + 5] = 1
    net = UNet(2, 1, 2, features=(8, 16, 32), encoder="residual", blocks_per_level=(1, 2, 2), norm="instance")
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
