"""Tests for unetcli.inference.sliding_window: window placement, weighting, padding and mirroring."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from unetcli.inference.sliding_window import gaussian_importance, sliding_window_predict, window_starts
from unetcli.models import UNet

torch.set_num_threads(2)


def rand_image(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def direct_softmax(model: nn.Module, image: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(torch.from_numpy(image)[None]), dim=1)[0]


def pointwise(spatial_dims: int, in_channels: int = 1, classes: int = 3) -> nn.Module:
    """A 1x1 convolution: translation- and flip-equivariant, so window placement cannot matter."""
    torch.manual_seed(0)
    conv = {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims](in_channels, classes, 1)
    return conv.eval()


# --------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    "size,roi,overlap",
    [(10, 4, 0.5), (11, 4, 0.5), (10, 4, 0.0), (100, 16, 0.25), (17, 16, 0.5), (9, 3, 0.9), (5, 5, 0.5)],
)
def test_window_starts_cover_axis(size, roi, overlap):
    starts = window_starts(size, roi, overlap)
    assert starts[0] == 0
    assert starts[-1] == size - roi
    assert starts == sorted(set(starts))
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s : s + roi] = True
    assert covered.all()
    step = max(1, int(roi * (1 - overlap)))
    assert all(b - a <= step for a, b in zip(starts, starts[1:]))


def test_window_starts_roi_larger_than_axis():
    assert window_starts(3, 8, 0.5) == [0]


@pytest.mark.parametrize("roi", [(9,), (9, 7), (5, 7, 9)])
def test_gaussian_importance_peaks_at_centre_and_is_symmetric(roi):
    w = gaussian_importance(roi)
    assert w.shape == roi and w.dtype == torch.float32
    centre = tuple(r // 2 for r in roi)
    assert w[centre] == pytest.approx(1.0)
    assert w.max() == w[centre]
    assert (w > 0).all()
    for axis in range(len(roi)):
        assert torch.allclose(w, w.flip(axis))
    corner = (0,) * len(roi)
    assert w[corner] < 0.1


def test_gaussian_importance_even_size_has_two_equal_peaks():
    w = gaussian_importance((8,))
    assert w[3] == w[4] == w.max()
    assert torch.allclose(w, w.flip(0))


# --------------------------------------------------------------------------- predictions


@pytest.mark.parametrize("spatial_dims,shape", [(2, (16, 12)), (3, (8, 8, 12))])
def test_single_window_equals_direct_forward(spatial_dims, shape):
    torch.manual_seed(0)
    net = UNet(spatial_dims, 2, 3, features=(4, 8, 16), norm="instance").eval()
    image = rand_image(2, *shape)
    probs = sliding_window_predict(net, image, shape, 3, overlap=0.5)
    assert probs.shape == (3, *shape) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, direct_softmax(net, image), atol=1e-5, rtol=0)


@pytest.mark.parametrize("gaussian", [True, False])
@pytest.mark.parametrize("spatial_dims,shape,roi", [(2, (13, 11), (4, 4)), (3, (7, 9, 5), (4, 4, 4))])
def test_overlapping_windows_pointwise_model_is_exact(spatial_dims, shape, roi, gaussian):
    model = pointwise(spatial_dims)
    image = rand_image(1, *shape)
    probs = sliding_window_predict(model, image, roi, 3, overlap=0.5, window_batch_size=3, gaussian=gaussian)
    assert probs.shape == (3, *shape)
    torch.testing.assert_close(probs.sum(0), torch.ones(shape), atol=1e-5, rtol=0)
    torch.testing.assert_close(probs, direct_softmax(model, image), atol=1e-5, rtol=0)


def test_overlapping_windows_unet_sums_to_one():
    torch.manual_seed(0)
    net = UNet(2, 1, 3, features=(4, 8), norm="instance").eval()
    image = rand_image(1, 21, 10)
    probs = sliding_window_predict(net, image, (8, 8), 3, overlap=0.5)
    assert probs.shape == (3, 21, 10)
    torch.testing.assert_close(probs.sum(0), torch.ones(21, 10), atol=1e-5, rtol=0)
    assert (probs >= 0).all() and (probs <= 1).all()


@pytest.mark.parametrize("shape", [(3, 2), (1, 7), (5, 5)])
def test_image_smaller_than_roi_is_padded_and_cropped_back(shape):
    model = pointwise(2)
    image = rand_image(1, *shape)
    probs = sliding_window_predict(model, image, (8, 8), 3)
    assert probs.shape == (3, *shape)
    torch.testing.assert_close(probs, direct_softmax(model, image), atol=1e-5, rtol=0)


def test_mirror_with_flip_equivariant_model_is_unchanged():
    model = pointwise(3)
    image = rand_image(1, 6, 5, 7)
    plain = sliding_window_predict(model, image, (4, 4, 4), 3, mirror=False)
    mirrored = sliding_window_predict(model, image, (4, 4, 4), 3, mirror=True)
    torch.testing.assert_close(mirrored, plain, atol=1e-6, rtol=0)


def test_mirror_averages_flips():
    """A model that is not flip-equivariant: mirror=True must equal the hand-made average over the 4 flips."""

    class LeftBias(nn.Module):
        def forward(self, x):
            ramp = torch.linspace(0, 3, x.shape[-1])
            return torch.cat([x * 0 + ramp, x * 0], dim=1)

    image = rand_image(1, 4, 6)
    probs = sliding_window_predict(LeftBias(), image, (4, 6), 2, mirror=True)
    x = torch.from_numpy(image)[None]
    flips = [(), (2,), (3,), (2, 3)]
    expected = sum(
        torch.softmax(LeftBias()(x.flip(f) if f else x), 1).flip(f) if f else torch.softmax(LeftBias()(x), 1)
        for f in flips
    )[0] / 4
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0)
    # the flipped ramp cancels: class 0 probability is symmetric left/right
    torch.testing.assert_close(probs[0], probs[0].flip(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(9, 30), (50, 3)])
def test_valid_padding_unet_gives_image_shape(shape):
    torch.manual_seed(0)
    net = UNet(2, 1, 2, features=(4, 8), padding="valid", norm="instance").eval()
    assert all(m > 0 for m in net.margin)
    roi = net.input_size_for_output(4)
    image = rand_image(1, *shape)
    probs = sliding_window_predict(net, image, roi, 2, overlap=0.5, margin=net.margin)
    assert probs.shape == (2, *shape)
    torch.testing.assert_close(probs.sum(0), torch.ones(shape), atol=1e-5, rtol=0)
    assert torch.isfinite(probs).all()


def test_valid_padding_single_window_matches_direct_forward_on_padded_image():
    """With one window, the output is the net applied to the image mirror-padded by the margin."""
    torch.manual_seed(0)
    net = UNet(2, 1, 2, features=(4, 8), padding="valid", norm="instance").eval()
    m = net.margin[0]
    roi = net.input_size_for_output(4)[0]
    out = roi - 2 * m
    image = rand_image(1, out, out)
    probs = sliding_window_predict(net, image, (roi, roi), 2, margin=m)
    padded = np.pad(image, ((0, 0), (m, m), (m, m)), mode="reflect")
    torch.testing.assert_close(probs, direct_softmax(net, padded), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.8])
@pytest.mark.parametrize("shape, roi", [((37, 29), (16, 16)), ((21, 18, 13), (8, 8, 8))])
def test_labels_output_equals_argmax_of_probabilities(shape, roi, overlap) -> None:
    """The band-by-band label path must give exactly the argmax of the full probability map,
    whether the band moves past its windows (no overlap) or shifts overlapping rows (0.8)."""
    torch.manual_seed(0)
    nd = len(shape)
    from unetcli.models import UNet

    net = UNet(nd, 1, 4, features=(4, 8), norm="none").eval()
    image = np.random.default_rng(0).normal(size=(1, *shape)).astype(np.float32)
    probs = sliding_window_predict(net, image, roi, 4, overlap=overlap)
    labels = sliding_window_predict(net, image, roi, 4, overlap=overlap, output="labels")
    assert labels.shape == shape and labels.dtype == torch.uint8
    assert torch.equal(labels.long(), probs.argmax(0))


# --------------------------------------------------------------------------- MONAI cross-check


@pytest.mark.parametrize("shape,roi", [((40, 36, 28), (16, 16, 16)), ((50, 45), (32, 32))])
def test_matches_monai_sliding_window_inference(shape, roi):
    """Same network, roi, overlap and Gaussian blending as MONAI: the same probabilities."""
    monai_inferers = pytest.importorskip("monai.inferers")
    torch.manual_seed(0)
    net = UNet(len(shape), 1, 3, features=(4, 8)).eval()
    image = rand_image(1, *shape, seed=3)
    ours = sliding_window_predict(net, image, roi, 3, overlap=0.5, window_batch_size=2, gaussian=True)
    with torch.no_grad():
        ref = monai_inferers.sliding_window_inference(torch.from_numpy(image)[None], roi, 2,
                                                      lambda w: torch.softmax(net(w), 1), overlap=0.5, mode="gaussian")[0]
    assert ours.shape == ref.shape
    assert float((ours - ref).abs().max()) < 1e-5


class PositionDependent(nn.Module):
    """Logits that depend strongly on where a voxel sits inside its window: overlapping windows
    disagree, so any window contribution dropped or counted twice changes the blended result."""

    def __init__(self, roi: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.bias = torch.randn((classes,) + roi, generator=torch.Generator().manual_seed(0)) * 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias + x.mean(1, keepdim=True)


def brute_force_blend(model: nn.Module, image: np.ndarray, roi: tuple[int, ...], overlap: float) -> torch.Tensor:
    """Every window's softmax times the Gaussian, summed over the whole grid, divided by the summed weights."""
    x = torch.from_numpy(image)
    weight = gaussian_importance(roi)
    sums = torch.zeros((model.bias.shape[0],) + x.shape[1:])
    weights = torch.zeros(x.shape[1:])
    for start in itertools.product(*(window_starts(s, r, overlap) for s, r in zip(x.shape[1:], roi))):
        region = tuple(slice(s, s + r) for s, r in zip(start, roi))
        with torch.no_grad():
            p = torch.softmax(model(x[(slice(None),) + region][None]), 1)[0]
        sums[(slice(None),) + region] += p * weight
        weights[region] += weight
    return sums / weights


@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("shape, roi", [((45, 23), (16, 8)), ((19, 14, 11), (8, 6, 4))])
def test_blending_equals_brute_force_for_both_outputs(shape, roi, overlap) -> None:
    model = PositionDependent(roi, 4)
    image = rand_image(1, *shape, seed=5)
    expected = brute_force_blend(model, image, roi, overlap)
    probs = sliding_window_predict(model, image, roi, 4, overlap=overlap, window_batch_size=3)
    labels = sliding_window_predict(model, image, roi, 4, overlap=overlap, window_batch_size=3, output="labels")
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=0)
    assert torch.equal(labels.long(), expected.argmax(0))
