"""zscore_nonzero with a foreground mask that background noise does not change (data.foreground_mask):
a test scan whose skull-stripped background holds noise instead of exact zeros is normalised like
the training scans, while plans and checkpoints without the key keep the non-zero mask."""

from __future__ import annotations

import numpy as np
import pytest

from unetcli.config import DataConfig
from unetcli.data.preprocessing import foreground_mask, foreground_masks, normalize_image
from unetcli.data.volumes import _normalise


def skull_stripped(seed: int = 0) -> np.ndarray:
    """A (1, 64, 64, 40) brain-like ellipsoid: white matter 100, grey matter 70 at its rim, dark
    ventricles (25) and sulcal CSF (30) inside, mild tissue noise; exactly 0 around it."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in (64, 64, 40)], indexing="ij"))
    r = np.sqrt(((grid / np.array([0.8, 0.9, 0.8])[:, None, None, None]) ** 2).sum(0))
    image = np.where(r < 1, 100.0, 0.0)
    image[(r > 0.8) & (r < 1)] = 70.0
    image[(r > 0.93) & (r < 1) & (grid[0] > 0.3)] = 30.0  # CSF in sulci at the brain's edge
    image[np.sqrt(grid[0] ** 2 * 16 + grid[1] ** 2 * 4 + grid[2] ** 2 * 9) < 1] = 25.0  # ventricles
    image = np.where(r < 1, image + rng.normal(0, 3, image.shape), 0.0)
    return image[None].astype(np.float32)


def with_background_noise(image: np.ndarray, sigma: float, seed: int = 1) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, sigma, image.shape).astype(np.float32)
    return np.where(image != 0, image, noise)


def stats(image: np.ndarray, method: str) -> tuple[float, float]:
    values = image[0][foreground_masks(image[0], method)[1]]
    return float(values.mean()), float(values.std())


@pytest.mark.parametrize("sigma", [2.0, 6.0])
def test_background_noise_changes_the_brains_statistics_by_less_than_2_percent(sigma: float) -> None:
    clean = skull_stripped()
    noisy = with_background_noise(clean, sigma)
    (m1, s1), (m2, s2) = stats(clean, "robust"), stats(noisy, "robust")
    assert abs(m2 - m1) / m1 < 0.02 and abs(s2 - s1) / s1 < 0.02
    brain = clean[0] != 0
    a = normalize_image(clean, "zscore_nonzero", "robust")[0]
    b = normalize_image(noisy, "zscore_nonzero", "robust")[0]
    assert np.abs(b[brain] - a[brain]).mean() < 0.02
    assert np.mean(b[~brain] == 0) > 0.99  # the noisy background reads as the training scans' background


def test_the_exact_zero_mask_is_what_breaks() -> None:
    """What the robust mask fixes: with exact zeros as the mask, noise moves the statistics by far more than 2 %."""
    clean = skull_stripped()
    noisy = with_background_noise(clean, 2.0)
    (m1, _), (m2, _) = stats(clean, "nonzero"), stats(noisy, "nonzero")
    assert abs(m2 - m1) / m1 > 0.2


def test_on_clean_scans_the_robust_mask_is_the_brain_ventricles_and_edge_csf_included() -> None:
    clean = skull_stripped()[0]
    robust, nonzero = foreground_mask(clean, "robust"), clean != 0
    dice = 2 * (robust & nonzero).sum() / (robust.sum() + nonzero.sum())
    assert dice > 0.98
    assert robust[(clean > 15) & (clean < 45)].mean() > 0.95  # dark CSF (ventricles, sulci at the edge) is not cut away


def test_plans_without_the_key_keep_the_non_zero_mask_exactly() -> None:
    """Checkpoints and cached plans from before data.foreground_mask predict as they did."""
    noisy = with_background_noise(skull_stripped(), 2.0)
    old_plan = {"schemes": ["zscore_nonzero"], "ct_stats": None}
    values = noisy[0][noisy[0] != 0]
    expected = np.where(noisy[0] != 0, (noisy[0] - values.mean()) / values.std(), 0.0)
    assert np.allclose(_normalise(noisy, old_plan)[0], expected, atol=1e-4)
    assert not np.allclose(_normalise(noisy, {**old_plan, "foreground_mask": "robust"})[0], expected, atol=1e-2)
    assert DataConfig().foreground_mask == "robust"


def test_constant_and_empty_channels_do_not_break() -> None:
    assert not normalize_image(np.zeros((1, 8, 8, 4), np.float32), "zscore_nonzero", "robust").any()
    flat = np.full((1, 8, 8), 5.0, np.float32)
    assert np.array_equal(normalize_image(flat, "zscore_nonzero", "robust"), np.zeros_like(flat))
