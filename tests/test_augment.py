"""Intensity augmentation (unetcli.data.augment) and the augmentation presets of the config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unetcli.config import RunConfig, validate_config
from unetcli.data.augment import (IntensityAugmentation, resolve_augmentation, adjust_contrast, gamma_keep_stats, gaussian_blur,
                                  random_bias_field, simulate_low_resolution)
from unetcli.data.sampling import PatchSampler
from unetcli.data.types import Case
from unetcli.errors import ConfigError

ALL_ON = IntensityAugmentation(noise_prob=1, blur_prob=1, brightness_prob=1, contrast_prob=1, lowres_prob=1,
                               inverted_gamma_prob=1, gamma_prob=1, bias_field_prob=1)


def ramp(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.linspace(0.0, 2.0, int(np.prod(shape))).reshape(shape).exp()  # strictly increasing, skewed


def test_gamma_keeps_mean_and_std_but_changes_the_shape_of_the_histogram() -> None:
    x = ramp((8, 9, 10))
    for gamma in (0.7, 1.5):
        y = gamma_keep_stats(x, gamma)
        assert torch.allclose(y.mean(), x.mean(), atol=1e-4) and torch.allclose(y.std(), x.std(), atol=1e-4)
        assert not torch.allclose(y, x, atol=1e-2)
        assert torch.equal(torch.argsort(y.flatten()), torch.argsort(x.flatten()))  # monotone: order kept


def test_contrast_stays_in_the_former_range_and_scales_about_the_mean() -> None:
    x = ramp((6, 7))
    y = adjust_contrast(x, 1.25)
    assert y.min() >= x.min() and y.max() <= x.max()
    z = adjust_contrast(x, 0.75)
    assert torch.allclose(z - x.mean(), 0.75 * (x - x.mean()), atol=1e-5)


def test_blur_keeps_a_constant_and_smooths_noise() -> None:
    const = torch.full((12, 12, 12), 3.0)
    assert torch.allclose(gaussian_blur(const, [0.8, 0.8, 0.8]), const, atol=1e-5)
    noise = torch.from_numpy(np.random.default_rng(0).standard_normal((16, 16, 16)).astype(np.float32))
    blurred = gaussian_blur(noise, [1.0, 1.0, 1.0])
    assert blurred.shape == noise.shape and blurred.std() < 0.5 * noise.std()


def test_low_resolution_keeps_the_shape_and_loses_detail() -> None:
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((20, 24)).astype(np.float32))
    y = simulate_low_resolution(x, 0.5)
    assert y.shape == x.shape and y.std() < x.std()
    assert torch.allclose(simulate_low_resolution(x, 1.0), x, atol=1e-5)


def test_low_resolution_along_chosen_axes_leaves_the_others_sharp() -> None:
    # Slices alternating -1 / +1 along the last axis, each constant in-plane: made coarser in-plane only,
    # the slices keep their values; made coarser along every axis, the alternation is gone.
    x = torch.tensor([-1.0, 1.0] * 4).view(1, 1, 8).expand(20, 24, 8).contiguous()
    assert torch.allclose(simulate_low_resolution(x, 0.5, axes=(0, 1)), x, atol=1e-5)
    assert simulate_low_resolution(x, 0.5).diff(dim=2).abs().max() < 1.5


def test_bias_field_is_smooth_within_a_factor_of_two_and_spares_the_background() -> None:
    rng = np.random.default_rng(1)
    fields = [random_bias_field((12, 16, 10), rng) for _ in range(20)]
    assert all(f.shape == (12, 16, 10) and f.min() >= 0.5 - 1e-6 and f.max() <= 2.0 + 1e-6 for f in fields)
    assert max(float(f.max() / f.min()) for f in fields) > 1.5  # strong fields are drawn, not only weak ones
    steps = max(float(f.diff(dim=d).abs().max()) for f in fields for d in range(3))
    assert steps < 0.35  # smooth: neighbouring voxels differ little
    image = torch.full((1, 1, 12, 16, 10), -1.0)
    image[..., 3:9, 4:12, 2:8] = 2.0
    out = IntensityAugmentation(bias_field_prob=1)(image, np.random.default_rng(2))
    assert torch.equal(out[image == -1.0], image[image == -1.0])  # background (the minimum) unchanged
    assert not torch.allclose(out, image) and out.std() > 0


def test_all_changes_off_returns_the_batch_and_draws_nothing() -> None:
    images = torch.randn(2, 1, 6, 6, 6)
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    assert IntensityAugmentation()(images, rng) is images
    assert rng.bit_generator.state == state  # runs without these changes keep their random stream


def test_all_changes_on_are_deterministic_per_seed_and_finite() -> None:
    images = torch.randn(2, 2, 10, 12, 8)
    a = ALL_ON(images, np.random.default_rng(3))
    b = ALL_ON(images, np.random.default_rng(3))
    assert a.shape == images.shape and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, images)


def _case() -> Case:
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 16), np.uint8)
    label[4:12, 4:12, 4:12] = 1
    image = (label[None] + 0.1 * rng.standard_normal((1, 16, 16, 16))).astype(np.float32)
    return Case(name="c", image=image, label=label)


def test_sampler_changes_images_only_and_stays_a_pure_function_of_the_position() -> None:
    plain = PatchSampler([_case()], (8, 8, 8), 2, seed=4)
    augmented = PatchSampler([_case()], (8, 8, 8), 2, seed=4, intensity=ALL_ON)
    (x0, y0), (x1, y1), (x2, y2) = plain.batch(7), augmented.batch(7), augmented.batch(7)
    assert torch.equal(y0, y1) and torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.allclose(x0, x1)


def test_presets_fill_only_the_keys_left_unset() -> None:
    cfg = RunConfig()
    resolve_augmentation(cfg.train, 3)
    assert (cfg.train.gamma_prob, cfg.train.blur_prob, cfg.train.bias_field_prob, cfg.train.rotate_scale_prob,
            cfg.train.intensity_jitter) == (0.3, 0.2, 0.2, 0.0, 0.0)  # 3D: scanner
    cfg = RunConfig()
    resolve_augmentation(cfg.train, 3, thick_slices=True)
    assert (cfg.train.bias_field_prob, cfg.train.rotate_scale_prob) == (0.2, 0.2)  # thick slices: in-plane rotation
    cfg = RunConfig()
    cfg.train.rotate_scale_prob = 0.0
    resolve_augmentation(cfg.train, 3, thick_slices=True)
    assert cfg.train.rotate_scale_prob == 0.0  # the user's own value stands
    cfg = RunConfig()
    resolve_augmentation(cfg.train, 2)
    assert (cfg.train.gamma_prob, cfg.train.rotate_scale_prob, cfg.train.intensity_jitter) == (0.0, 0.0, 0.1)
    cfg = RunConfig()
    cfg.train.augmentation, cfg.train.noise_prob = "nnunet", 0.5
    resolve_augmentation(cfg.train, 2)
    assert (cfg.train.noise_prob, cfg.train.contrast_prob, cfg.train.rotate_scale_prob, cfg.train.bias_field_prob) == (0.5, 0.15, 0.2, 0.0)


@pytest.mark.parametrize("value", [1.5, -0.1])
def test_a_probability_outside_0_1_is_refused_with_its_key(value: float) -> None:
    cfg = RunConfig()
    cfg.train.lowres_prob = value
    with pytest.raises(ConfigError, match=r"train\.lowres_prob.*\[0, 1\]"):
        validate_config(cfg)


def test_a_run_saved_before_presets_existed_resumes_with_the_augmentation_it_trained_with(tmp_path) -> None:
    from unetcli.config import config_to_dict
    from unetcli.training.resume import _resumed_config
    from unetcli.training.state import ResumePoint

    saved = config_to_dict(RunConfig())
    old = {**saved, "train": {k: v for k, v in saved["train"].items() if k != "augmentation"}}
    checkpoint = {"config": old, "epoch": 1, "resume": {"epoch_iteration": 0}}
    cfg = _resumed_config(ResumePoint(tmp_path / "last.pt", checkpoint), tmp_path, {"train.epochs": 5})
    assert cfg.train.augmentation == "basic"
    resolve_augmentation(cfg.train, 3)
    assert (cfg.train.gamma_prob, cfg.train.intensity_jitter) == (0.0, 0.1)
    current = _resumed_config(ResumePoint(tmp_path / "last.pt", {**checkpoint, "config": saved}), tmp_path, {"train.epochs": 5})
    assert current.train.augmentation == "auto"
