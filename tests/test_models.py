"""Tests for unetcli.models: the U-Net's shape contract, skip/upsample variants, size errors, gradients."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
from helpers import with_batch_norm_statistics
from torch import nn

from unetcli.config import ModelConfig
from unetcli.errors import ConfigError, ModelError
from unetcli.models import UNet, build_model, count_parameters, fold_batch_norm
from unetcli.models.blocks import InstanceNorm

FEATURES = (4, 8, 16)  # depth 2: same-padded sizes must be multiples of 4
SKIPS = ("concat", "add", "none")
PADDINGS = ("same", "valid")
UPSAMPLES = ("transpose", "interp")


def tiny_cfg(spatial_dims: int, **kw) -> ModelConfig:
    values = dict(spatial_dims=spatial_dims, in_channels=2, out_channels=3, features=list(FEATURES), norm="instance")
    values.update(kw)
    return ModelConfig(**values)


def _hint_shape(err: ModelError) -> tuple[int, ...]:
    """The shape suggested after 'e.g.' in an error's hint."""
    match = re.search(r"e\.g\. \(([\d, ]+)\)", err.hint or "")
    assert match, f"no suggested size in hint {err.hint!r}"
    return tuple(int(v) for v in match.group(1).split(",") if v.strip())


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(
    "spatial_dims,skip,padding,upsample", list(itertools.product((2, 3), SKIPS, PADDINGS, UPSAMPLES))
)
def test_forward_shape_matches_documented_contract(spatial_dims, skip, padding, upsample):
    torch.manual_seed(0)
    net = build_model(tiny_cfg(spatial_dims, skip=skip, padding=padding, upsample=upsample)).eval()
    if padding == "same":
        in_shape = (12, 8) if spatial_dims == 2 else (8, 4, 12)
    else:
        base = net.valid_input_size(1)[0]
        step = net.size_multiple[0]
        in_shape = (base, base + step) if spatial_dims == 2 else (base, base, base + step)
    with torch.no_grad():
        out = net(torch.randn(1, 2, *in_shape))
    if padding == "same":
        expected = in_shape
        assert net.margin == (0,) * spatial_dims
    else:
        assert all(m > 0 for m in net.margin) and len(net.margin) == spatial_dims
        expected = tuple(s - 2 * m for s, m in zip(in_shape, net.margin))
    assert out.shape == (1, 3) + expected
    assert net.output_shape(in_shape) == expected
    assert torch.isfinite(out).all()


def test_paper_configuration_572_gives_388_without_forward():
    net = UNet(2, 1, 2, features=(64, 128, 256, 512, 1024), padding="valid")
    assert net.output_shape((572, 572)) == (388, 388)
    assert net.margin == (92, 92)  # (572 - 388) / 2
    assert net.input_size_for_output(388) == (572, 572)
    assert net.input_size_for_output((388, 100)) == (572, 284)


def test_valid_margin_is_constant_over_valid_sizes():
    net = UNet(2, 1, 2, features=FEATURES, padding="valid", norm="none")
    base, step = net.valid_input_size(1)[0], net.size_multiple[0]
    for k in range(4):
        size = base + k * step
        assert net.output_shape((size, size)) == (size - 2 * net.margin[0],) * 2


# --------------------------------------------------------------------------- skip / projection / params


def _projections(net: UNet) -> list[nn.Module]:
    return [up.project for up in net.ups]


def test_add_skip_projects_only_when_channels_differ():
    interp = UNet(2, 1, 2, features=FEATURES, skip="add", upsample="interp")
    # interp keeps the deep channel count (8, 16) which differs from the skip's (4, 8): 1x1 projection
    for up, skip_ch, deep_ch in zip(interp.ups, reversed(FEATURES[:-1]), reversed(FEATURES[1:])):
        assert isinstance(up.project, nn.Conv2d)
        assert up.project.kernel_size == (1, 1)
        assert (up.project.in_channels, up.project.out_channels) == (skip_ch, deep_ch)

    transpose = UNet(2, 1, 2, features=FEATURES, skip="add", upsample="transpose")
    # transpose conv already outputs the skip's channel count: no projection
    assert all(isinstance(p, nn.Identity) for p in _projections(transpose))

    for skip in ("concat", "none"):
        net = UNet(2, 1, 2, features=FEATURES, skip=skip, upsample="interp")
        assert all(isinstance(p, nn.Identity) for p in _projections(net))


def test_add_projection_3d_is_conv3d():
    net = UNet(3, 1, 2, features=FEATURES, skip="add", upsample="interp")
    assert all(isinstance(p, nn.Conv3d) and p.kernel_size == (1, 1, 1) for p in _projections(net))


@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_no_skip_has_fewer_parameters_than_concat(upsample):
    none = count_parameters(UNet(2, 1, 2, features=FEATURES, skip="none", upsample=upsample))
    concat = count_parameters(UNet(2, 1, 2, features=FEATURES, skip="concat", upsample=upsample))
    add = count_parameters(UNet(2, 1, 2, features=FEATURES, skip="add", upsample=upsample))
    assert none < concat
    assert none <= add < concat


# --------------------------------------------------------------------------- size errors


def test_wrong_input_size_names_the_multiple():
    net = UNet(2, 1, 2, features=(4, 8, 16, 32))  # depth 3 -> multiple of 8
    with pytest.raises(ModelError, match="multiple of 8") as info:
        net(torch.zeros(1, 1, 30, 32))
    suggested = _hint_shape(info.value)
    assert suggested == (32, 32)
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, *suggested)).shape == (1, 2, 32, 32)


def test_wrong_input_size_3d_suggestion_works():
    net = UNet(3, 1, 2, features=FEATURES, norm="none")
    with pytest.raises(ModelError, match="multiple of 4") as info:
        net.output_shape((5, 8, 10))
    suggested = _hint_shape(info.value)
    assert suggested == (8, 8, 12)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, *suggested)).shape == (1, 2, *suggested)


def test_valid_padding_bad_size_suggestion_works():
    net = UNet(2, 1, 2, features=FEATURES, padding="valid", norm="none")
    bad = net.valid_input_size(1)[0] + 1
    with pytest.raises(ModelError) as info:
        net(torch.zeros(1, 1, bad, bad))
    assert str(net.valid_input_size(1)[0]) in info.value.hint
    suggested = _hint_shape(info.value)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *suggested))
    assert out.shape[2:] == tuple(s - 2 * m for s, m in zip(suggested, net.margin))


@pytest.mark.parametrize("padding", PADDINGS)
def test_valid_input_size_is_accepted_and_minimal(padding):
    net = UNet(2, 1, 2, features=FEATURES, padding=padding, norm="none")
    for min_size in (1, 5, 17, 50):
        size, other = net.valid_input_size((min_size, 1))
        assert size >= min_size and net.valid_input_size(min_size) == (size, size)
        net.output_shape((size, size))  # does not raise
        for smaller in range(min_size, size):
            with pytest.raises(ModelError):
                net.output_shape((smaller, size))


def test_wrong_number_of_spatial_axes():
    net2 = UNet(2, 1, 2, features=FEATURES)
    with pytest.raises(ModelError, match="spatial axes"):
        net2(torch.zeros(1, 1, 8, 8, 8))
    net3 = UNet(3, 1, 2, features=FEATURES)
    with pytest.raises(ModelError, match="spatial axes"):
        net3(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ModelError):
        net3.output_shape((8, 8))


def test_bad_constructor_arguments():
    with pytest.raises(ModelError, match="spatial_dims"):
        UNet(4, 1, 2, features=FEATURES)
    with pytest.raises(ModelError, match="at least 2"):
        UNet(2, 1, 2, features=(8,))


# --------------------------------------------------------------------------- gradients / factory


@pytest.mark.parametrize("skip,upsample", list(itertools.product(SKIPS, UPSAMPLES)))
def test_gradients_reach_every_parameter(skip, upsample):
    torch.manual_seed(0)
    net = UNet(2, 1, 3, features=FEATURES, skip=skip, upsample=upsample, norm="batch")
    x = torch.randn(2, 1, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    loss = nn.functional.cross_entropy(net(x), target)
    loss.backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    zero = [name for name, p in net.named_parameters() if not p.grad.abs().sum() > 0]
    assert not zero, f"all-zero gradient for {zero}"
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_build_model_unknown_name_is_config_error():
    with pytest.raises(ConfigError, match="unknown model 'resnet'") as info:
        build_model(tiny_cfg(2, name="resnet"))
    assert "unet" in info.value.hint


def test_build_model_needs_resolved_dims():
    with pytest.raises(ConfigError, match="model.spatial_dims"):
        build_model(ModelConfig(in_channels=1, out_channels=2))


def test_build_model_passes_config_through():
    net = build_model(tiny_cfg(3, features=[4, 8], convs_per_level=1, skip="add", padding="valid"))
    assert isinstance(net, UNet)
    assert net.spatial_dims == 3 and net.depth == 1 and net.convs_per_level == 1
    assert net.head.out_channels == 3 and net.stem[0].in_channels == 2


# --------------------------------------------------------------------------- inference folding


@pytest.mark.parametrize("spatial_dims,shape", [(2, (2, 1, 32, 32)), (3, (1, 1, 16, 16, 16))])
def test_fold_batch_norm_keeps_outputs_and_removes_batch_norm(spatial_dims, shape):
    torch.manual_seed(0)
    net = with_batch_norm_statistics(UNet(spatial_dims, 1, 3, features=(8, 16, 32)), shape)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = net(x)
        folded = fold_batch_norm(net)
        got = folded(x)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())  # original untouched
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert not torch.equal(folded.stem[0].weight, net.stem[0].weight)


def test_fold_batch_norm_leaves_instance_norm_and_refuses_training_mode():
    net = UNet(2, 1, 2, features=(4, 8), norm="instance").eval()
    folded = fold_batch_norm(net)
    assert sum(isinstance(m, InstanceNorm) for m in folded.modules()) == sum(
        isinstance(m, InstanceNorm) for m in net.modules()) > 0
    with pytest.raises(ValueError, match="eval mode"):
        fold_batch_norm(net.train())


# --------------------------------------------------------------------------- per-axis kernels and strides (thick slices)

THICK_KERNELS = [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
THICK_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]


def thick_net(padding: str = "same", **kw) -> UNet:
    return UNet(3, 1, 2, features=(4, 8, 16, 32), padding=padding, norm="instance",
                kernel_sizes=THICK_KERNELS, strides=THICK_STRIDES, **kw)


def test_anisotropic_topology_builds_per_axis_layers_and_size_rules():
    net = thick_net()
    assert net.stem[0].kernel_size == (1, 3, 3) and net.stem[0].padding == (0, 1, 1)
    assert net.downs[0][0].kernel_size == (1, 2, 2) and net.downs[0][1][0].kernel_size == (1, 3, 3)
    assert net.downs[1][0].kernel_size == (2, 2, 2) and net.downs[1][1][0].kernel_size == (3, 3, 3)
    # the decoder undoes each level's stride and uses that level's kernel
    assert [up.up.stride for up in net.ups] == [(2, 2, 2), (2, 2, 2), (1, 2, 2)]
    assert [up.conv[0].kernel_size for up in net.ups] == [(3, 3, 3), (1, 3, 3), (1, 3, 3)]
    assert net.size_multiple == (4, 8, 8) and net.margin == (0, 0, 0)
    assert net.valid_input_size((5, 9, 8)) == (8, 16, 8)
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 4, 16, 24)).shape == (1, 2, 4, 16, 24)
    with pytest.raises(ModelError, match=r"multiple of \(4, 8, 8\)") as info:
        net.output_shape((6, 16, 16))
    assert _hint_shape(info.value) == (8, 16, 16)


@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_anisotropic_valid_padding_has_per_axis_margin_matching_forward(upsample):
    net = thick_net("valid", upsample=upsample).eval()
    mz, my, mx = net.margin
    assert mz < my == mx  # 1-wide kernels on the thick axis lose fewer voxels there
    shape = net.input_size_for_output((3, 5, 7))
    with torch.no_grad():
        out = net(torch.randn(1, 1, *shape))
    assert out.shape[2:] == net.output_shape(shape) == tuple(s - 2 * m for s, m in zip(shape, net.margin))
    assert all(o >= w for o, w in zip(out.shape[2:], (3, 5, 7)))


def test_anisotropic_gradients_reach_every_parameter():
    net = thick_net()
    net(torch.randn(2, 1, 8, 16, 16)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_default_topology_equals_explicit_3_and_2_and_keeps_checkpoint_keys():
    torch.manual_seed(0)
    default = UNet(3, 1, 2, features=FEATURES)
    torch.manual_seed(0)
    explicit = UNet(3, 1, 2, features=FEATURES, kernel_sizes=[3, [3, 3, 3], 3], strides=[1, 2, [2, 2, 2]])
    a, b = default.state_dict(), explicit.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert default.size_multiple == (4, 4, 4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel_sizes=[[3, 3, 3]] * 2), "kernel_sizes lists 2 levels but model.features has 3"),
    (dict(strides=[1, 2, 2, 2]), "strides lists 4 levels"),
    (dict(kernel_sizes=[[3, 3]] * 3), "3 sizes"),
    (dict(kernel_sizes=[[3, 2, 3]] * 3), "odd and positive"),
    (dict(strides=[[1, 1, 1], [0, 2, 2], [2, 2, 2]]), "at least 1"),
    (dict(strides=[[2, 2, 2]] * 3), r"strides\[0\] must be all 1"),
])
def test_bad_topology_is_refused_with_the_key(kwargs, message):
    with pytest.raises(ModelError, match=message):
        UNet(3, 1, 2, features=FEATURES, **kwargs)


def test_topology_from_config_and_set_option():
    from unetcli.config import apply_overrides, config_from_dict, parse_set_option

    key, value = parse_set_option("model.kernel_sizes=[[1,3,3],[1,3,3],[3,3,3],[3,3,3]]")
    cfg = apply_overrides(config_from_dict({}), {key: value, "model.strides": THICK_STRIDES,
                                                 "model.features": [4, 8, 16, 32]})
    assert cfg.model.kernel_sizes == THICK_KERNELS
    cfg.model.spatial_dims, cfg.model.in_channels, cfg.model.out_channels = 3, 1, 2
    net = build_model(cfg.model)
    assert net.size_multiple == (4, 8, 8)
    with pytest.raises(ConfigError, match="model.kernel_sizes"):
        apply_overrides(cfg, {"model.kernel_sizes": "big"})


@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_matches_pytorch_in_values_gradients_and_checkpoint_keys(dims: int) -> None:
    torch.manual_seed(0)
    reference = {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](6, affine=True)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5), reference.bias.uniform_(-0.5, 0.5)
    ours = InstanceNorm(6)
    ours.load_state_dict(reference.state_dict())  # old checkpoints (PyTorch's layer) load as they are
    fmt = torch.channels_last_3d if dims == 3 else torch.channels_last
    x = (3 * torch.randn(3, 6, *([7, 9, 5][:dims])) + 2).contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = reference(xa), ours(xb)
    assert torch.allclose(ya, yb, atol=1e-5)
    (ya * torch.arange(ya.numel()).view_as(ya)).sum().backward()
    (yb * torch.arange(yb.numel()).view_as(yb)).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-3, rtol=1e-4)
    assert torch.allclose(reference.weight.grad, ours.weight.grad, rtol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.allclose(reference(x.bfloat16()).float(), ours(x.bfloat16()).float(), atol=0.05)
    assert torch.allclose(torch.jit.script(ours)(x), ya, atol=1e-5)  # the exported path
