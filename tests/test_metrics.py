"""Tests for unetcli.evaluation.metrics: hand-computed cases, edge cases, cropping, MONAI agreement."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from unetcli.evaluation import metrics as M
from unetcli.evaluation.metrics import (
    METRIC_NAMES,
    assd,
    case_metrics,
    confusion_counts,
    dice,
    hausdorff,
    iou,
    normalized_surface_dice,
    precision,
    recall,
    surface_distances,
    volume_difference,
)

# --------------------------------------------------------------------------- helpers


def blobby(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, fraction: float) -> np.ndarray:
    """Thresholded smoothed noise: a mask covering about ``fraction`` of the image."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, 1.0 - fraction)


def blobby_labels(rng: np.random.Generator, shape: tuple[int, ...], n_classes: int, sigma: float) -> np.ndarray:
    """Integer label map with ``n_classes`` blobby, possibly touching, classes (0 = background)."""
    out = np.zeros(shape, dtype=np.int16)
    for c in range(1, n_classes + 1):
        out[blobby(rng, shape, sigma, rng.uniform(0.1, 0.3))] = c
    return out


def square(shape: tuple[int, int], r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def full_volume_surface_distances(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Reference without cropping: erosion and EDT on the whole image (MONAI's definitions)."""
    sp = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, float)
    ep = pred & ~ndimage.binary_erosion(pred, border_value=0)
    et = truth & ~ndimage.binary_erosion(truth, border_value=0)
    d_pt = ndimage.distance_transform_edt(~et, sampling=sp)[ep]
    d_tp = ndimage.distance_transform_edt(~ep, sampling=sp)[et]
    return d_pt, d_tp


# --------------------------------------------------------------------------- hand-computed cases


def test_overlap_metrics_on_two_squares() -> None:
    a = square((10, 10), 2, 6, 2, 6)  # 16 voxels
    b = square((10, 10), 3, 7, 3, 7)  # 16 voxels, overlap 3x3 = 9
    assert confusion_counts(a, b) == (9, 7, 7)
    assert dice(a, b) == pytest.approx(2 * 9 / (16 + 16))
    assert iou(a, b) == pytest.approx(9 / 23)
    assert precision(a, b) == pytest.approx(9 / 16)
    assert recall(a, b) == pytest.approx(9 / 16)
    c = square((10, 10), 2, 4, 2, 6)  # 8 voxels inside a
    assert precision(c, a) == pytest.approx(1.0)
    assert recall(c, a) == pytest.approx(0.5)
    assert dice(c, a) == pytest.approx(2 * 8 / 24)


def test_volume_difference_is_signed_mm3() -> None:
    a = np.zeros((4, 5, 6), bool)
    a[1:3, 1:4, 1:5] = True  # 24 voxels
    b = np.zeros_like(a)
    b[1:2, 1:3, 1:3] = True  # 4 voxels
    assert volume_difference(a, b, (1.0, 2.0, 3.0)) == pytest.approx(20 * 6.0)
    assert volume_difference(b, a, (1.0, 2.0, 3.0)) == pytest.approx(-20 * 6.0)
    assert volume_difference(a, b) == pytest.approx(20.0)
    assert volume_difference(a, a, (0.5, 0.5, 0.5)) == 0.0


def test_one_voxel_shift_anisotropic_2d() -> None:
    # a: rows 2..7, b: rows 3..8, both cols 2..7; spacing 2 mm (rows) x 0.5 mm (cols).
    a = square((12, 12), 2, 8, 2, 8)
    b = square((12, 12), 3, 9, 2, 8)
    sp = (2.0, 0.5)
    d_ab, d_ba = surface_distances(a, b, sp)
    # 20 surface voxels each: 6 on the outer row at 2.0 mm; on the inner row, 2 voxels next
    # to the other mask's side columns (0.5 mm) and 2 two columns away (1.0 mm); 10 shared
    # with the other surface.
    expected = np.sort(np.r_[np.full(6, 2.0), np.full(2, 1.0), np.full(2, 0.5), np.zeros(10)])
    np.testing.assert_allclose(np.sort(d_ab), expected)
    np.testing.assert_allclose(np.sort(d_ba), expected)
    assert hausdorff(a, b, sp) == pytest.approx(2.0)
    # per-direction linear percentile: 50th of 20 sorted values = mean of values[9], values[10]
    assert hausdorff(a, b, sp, percentile=50) == pytest.approx(0.25)
    assert hausdorff(a, b, sp, percentile=95) == pytest.approx(2.0)
    assert assd(a, b, sp) == pytest.approx(30 / 40)
    assert normalized_surface_dice(a, b, sp, tolerance_mm=1.0) == pytest.approx(28 / 40)
    assert normalized_surface_dice(a, b, sp, tolerance_mm=0.4) == pytest.approx(20 / 40)
    # a distance exactly equal to the tolerance counts as within tolerance
    assert normalized_surface_dice(a, b, sp, tolerance_mm=2.0) == pytest.approx(1.0)
    # the same shift along the other axis costs 0.5 mm
    c = square((12, 12), 2, 8, 3, 9)
    assert hausdorff(a, c, sp) == pytest.approx(0.5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_voxel_shift_3d_gives_spacing_of_that_axis(axis: int) -> None:
    sp = (0.8, 1.7, 3.1)
    a = np.zeros((9, 9, 9), bool)
    a[2:6, 2:6, 2:6] = True
    b = np.roll(a, 1, axis=axis)
    assert hausdorff(a, b, sp) == pytest.approx(sp[axis])
    assert hausdorff(a, b, sp, percentile=95) == pytest.approx(sp[axis])


def test_hausdorff_directions_are_combined_by_max() -> None:
    # small square inside a big one: d(small -> big) is large, d(big -> small) larger
    big = square((20, 20), 2, 18, 2, 18)
    small = square((20, 20), 9, 11, 9, 11)
    d_sb, d_bs = surface_distances(small, big)
    assert hausdorff(small, big) == pytest.approx(max(d_sb.max(), d_bs.max()))
    assert hausdorff(small, big) == pytest.approx(hausdorff(big, small))
    assert assd(small, big) == pytest.approx(np.concatenate([d_sb, d_bs]).mean())


# --------------------------------------------------------------------------- edge cases


def test_both_empty_gives_nan_everywhere() -> None:
    z = np.zeros((6, 7), bool)
    for f in (dice, iou, precision, recall):
        assert math.isnan(f(z, z))
    assert dice(z, z, empty_value=1.0) == 1.0
    assert iou(z, z, empty_value=1.0) == 1.0
    assert math.isnan(volume_difference(z, z, (1.0, 2.0)))
    d1, d2 = surface_distances(z, z)
    assert d1.size == 0 and d2.size == 0
    assert math.isnan(hausdorff(z, z))
    assert math.isnan(assd(z, z))
    assert math.isnan(normalized_surface_dice(z, z, None, 1.0))
    out = case_metrics(np.zeros((6, 7), int), np.zeros((6, 7), int), [1, 2])
    assert list(out) == ["1", "2"]
    for row in out.values():
        assert list(row) == list(METRIC_NAMES)
        assert all(math.isnan(v) for v in row.values())


def test_prediction_empty_reference_not() -> None:
    truth = np.zeros((8, 8), int)
    truth[2:5, 2:5] = 1  # 9 voxels
    pred = np.zeros_like(truth)
    row = case_metrics(pred, truth, [1], spacing=(2.0, 1.0))["1"]
    assert row["dice"] == 0.0 and row["iou"] == 0.0
    assert math.isnan(row["precision"])
    assert row["recall"] == 0.0
    assert row["volume_difference"] == pytest.approx(-18.0)
    assert math.isnan(row["hd"]) and math.isnan(row["hd95"]) and math.isnan(row["assd"])
    assert row["nsd"] == 0.0
    d_pt, d_tp = surface_distances(pred, truth)
    assert d_pt.size == 0 and d_tp.size == 8 and np.all(np.isinf(d_tp))


def test_reference_empty_prediction_not() -> None:
    pred = np.zeros((8, 8), int)
    pred[2:5, 2:5] = 1
    truth = np.zeros_like(pred)
    row = case_metrics(pred, truth, [1])["1"]
    assert row["dice"] == 0.0 and row["iou"] == 0.0
    assert row["precision"] == 0.0
    assert math.isnan(row["recall"])
    assert row["volume_difference"] == pytest.approx(9.0)
    assert all(math.isnan(row[m]) for m in ("hd", "hd95", "assd"))
    assert row["nsd"] == 0.0
    assert not any(math.isinf(v) for v in row.values())


def test_single_voxel_masks() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[3, 4] = True
    b[5, 4] = True
    sp = (0.5, 1.0)
    assert dice(a, b) == 0.0
    assert hausdorff(a, b, sp) == pytest.approx(1.0)
    assert assd(a, b, sp) == pytest.approx(1.0)
    assert normalized_surface_dice(a, b, sp, 1.0) == 1.0
    assert normalized_surface_dice(a, b, sp, 0.99) == 0.0
    # identical single voxel
    assert dice(a, a) == 1.0
    assert hausdorff(a, a, sp) == 0.0 and assd(a, a, sp) == 0.0
    assert normalized_surface_dice(a, a, sp, 0.0) == 1.0
    # single voxel at a corner of the image
    c = np.zeros((10, 10), bool)
    c[0, 0] = True
    assert hausdorff(c, a, sp) == pytest.approx(math.hypot(3 * 0.5, 4 * 1.0))


def test_tolerance_tie_is_robust_to_float_rounding() -> None:
    # 7 * 0.1 mm is 0.7000000000000001 in float64; it must count as within 0.7 mm
    a = np.zeros((12, 3), bool)
    b = np.zeros((12, 3), bool)
    a[1, 1] = True
    b[8, 1] = True
    assert normalized_surface_dice(a, b, (0.1, 1.0), tolerance_mm=0.7) == 1.0


def test_masks_touching_the_image_border() -> None:
    # the image border counts as background: a full image has its outer ring as surface
    full = np.ones((6, 6), bool)
    d1, d2 = surface_distances(full, full)
    assert d1.size == 20 and np.all(d1 == 0) and np.all(d2 == 0)
    # dropping the last row moves that side of the surface by one voxel
    cut = full.copy()
    cut[5, :] = False
    sp = (1.5, 1.0)
    d_cf, d_fc = surface_distances(cut, full, sp)
    assert d_cf.size == 6 * 2 + 3 * 2  # rows 0 and 4 (6 each) + cols 0, 5 on rows 1..3
    assert hausdorff(cut, full, sp) == pytest.approx(1.5)
    # every surface voxel of `full` except row 5's interior lies on `cut`'s surface
    assert np.count_nonzero(d_fc > 0) == 6
    # 3D: a mask filling a slab that touches two opposite faces
    vol = np.zeros((5, 6, 7), bool)
    vol[:, 1:4, :] = True
    interior = np.zeros_like(vol)
    interior[1:-1, 2, 1:-1] = True  # only the middle layer, away from the border faces
    d1, _ = surface_distances(vol, vol, (1.0, 1.0, 1.0))
    assert d1.size == np.count_nonzero(vol & ~interior)


def test_anisotropic_spacing_changes_distances_not_overlap() -> None:
    rng = np.random.default_rng(3)
    a = blobby(rng, (20, 24, 16), 2.0, 0.3)
    b = blobby(rng, (20, 24, 16), 2.0, 0.3)
    iso = case_metrics(a.astype(int), b.astype(int), [1], spacing=(1, 1, 1))["1"]
    aniso = case_metrics(a.astype(int), b.astype(int), [1], spacing=(0.5, 0.5, 4.0))["1"]
    for m in ("dice", "iou", "precision", "recall"):
        assert iso[m] == aniso[m]
    assert aniso["volume_difference"] == pytest.approx(iso["volume_difference"])  # voxel volume 1
    d_iso = surface_distances(a, b)[0]
    d_aniso = surface_distances(a, b, (0.5, 0.5, 4.0))[0]
    assert d_iso.shape == d_aniso.shape and not np.allclose(d_iso, d_aniso)


# --------------------------------------------------------------------------- cropping


@pytest.mark.parametrize("seed", range(6))
def test_cropped_equals_whole_volume(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    shape = (18, 22, 15) if seed % 2 else (40, 35)
    sp = (0.9, 1.4, 2.5) if seed % 2 else (0.6, 1.7)
    if seed < 2:  # large blobs: masks reach the image border on several sides
        pred, truth = blobby(rng, shape, 2.0, 0.7), blobby(rng, shape, 2.0, 0.6)
    elif seed < 4:  # small far-apart pieces, one in a corner of the image
        pred, truth = np.zeros(shape, bool), np.zeros(shape, bool)
        pred[(slice(0, 3),) * len(shape)] = True
        truth[tuple(slice(n - 4, n - 1) for n in shape)] = True
        truth[(slice(5, 7),) * len(shape)] = True
    else:  # ordinary blobs
        pred, truth = blobby(rng, shape, 1.5, 0.2), blobby(rng, shape, 1.5, 0.25)
    ref = full_volume_surface_distances(pred, truth, sp)
    got = surface_distances(pred, truth, sp)
    for r, g in zip(ref, got):
        assert r.shape == g.shape
        np.testing.assert_allclose(g, r, rtol=1e-12, atol=0)


def test_case_metrics_computes_one_edt_pair_per_class(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    pred = blobby_labels(rng, (20, 20, 12), 3, 1.5)
    truth = blobby_labels(rng, (20, 20, 12), 3, 1.5)
    calls: list[tuple[int, ...]] = []
    real = ndimage.distance_transform_edt

    def counting(x, *args, **kwargs):
        calls.append(x.shape)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(M.ndimage, "distance_transform_edt", counting)
    out = case_metrics(pred, truth, [1, 2, 3], spacing=(1.0, 1.2, 2.0))
    assert len(calls) == 2 * 3
    monkeypatch.undo()
    # ...and gives the same numbers as the single-metric functions
    sp = (1.0, 1.2, 2.0)
    for c in (1, 2, 3):
        p, t = pred == c, truth == c
        row = out[str(c)]
        assert row["dice"] == pytest.approx(dice(p, t))
        assert row["iou"] == pytest.approx(iou(p, t))
        assert row["precision"] == pytest.approx(precision(p, t))
        assert row["recall"] == pytest.approx(recall(p, t))
        assert row["volume_difference"] == pytest.approx(volume_difference(p, t, sp))
        assert row["hd"] == pytest.approx(hausdorff(p, t, sp))
        assert row["hd95"] == pytest.approx(hausdorff(p, t, sp, 95))
        assert row["assd"] == pytest.approx(assd(p, t, sp))
        assert row["nsd"] == pytest.approx(normalized_surface_dice(p, t, sp, 1.0))


def test_case_metrics_crops_the_distance_transform(monkeypatch: pytest.MonkeyPatch) -> None:
    pred = np.zeros((50, 60), int)
    truth = np.zeros((50, 60), int)
    pred[10:15, 20:30] = 1
    truth[12:18, 22:33] = 1
    shapes: list[tuple[int, ...]] = []
    real = ndimage.distance_transform_edt
    monkeypatch.setattr(
        M.ndimage, "distance_transform_edt", lambda x, *a, **k: shapes.append(x.shape) or real(x, *a, **k)
    )
    case_metrics(pred, truth, [1])
    assert shapes == [(10, 15), (10, 15)]  # union bbox rows 10..17, cols 20..32, padded by 1


def test_metric_selection_and_no_surface_work(monkeypatch: pytest.MonkeyPatch) -> None:
    pred = np.zeros((10, 10), int)
    pred[2:5, 2:5] = 1
    monkeypatch.setattr(M.ndimage, "distance_transform_edt", lambda *a, **k: pytest.fail("EDT not needed"))
    out = case_metrics(pred, pred, [1], metrics=("recall", "dice"))
    assert out == {"1": {"recall": 1.0, "dice": 1.0}}


# --------------------------------------------------------------------------- labels and errors


def test_region_based_labels() -> None:
    rng = np.random.default_rng(11)
    pred = blobby_labels(rng, (30, 30), 3, 2.0)
    truth = blobby_labels(rng, (30, 30), 3, 2.0)
    regions = {"whole_tumour": [1, 2, 3], "tumour_core": [1, 3], "enhancing": [3]}
    out = case_metrics(pred, truth, regions, spacing=(0.8, 1.1))
    assert list(out) == ["whole_tumour", "tumour_core", "enhancing"]
    for name, labs in regions.items():
        p, t = np.isin(pred, labs), np.isin(truth, labs)
        assert out[name]["dice"] == pytest.approx(dice(p, t))
        assert out[name]["hd95"] == pytest.approx(hausdorff(p, t, (0.8, 1.1), 95))
        assert out[name]["nsd"] == pytest.approx(normalized_surface_dice(p, t, (0.8, 1.1), 1.0))
    per_label = case_metrics(pred, truth, [3], spacing=(0.8, 1.1))
    assert per_label["3"] == out["enhancing"]


def test_shape_mismatch_raises_value_error() -> None:
    a, b = np.zeros((4, 5), int), np.zeros((5, 4), int)
    with pytest.raises(ValueError, match="same shape"):
        case_metrics(a, b, [1])
    for f in (dice, iou, precision, recall, confusion_counts, surface_distances, hausdorff, assd):
        with pytest.raises(ValueError):
            f(a, b)
    with pytest.raises(ValueError):
        volume_difference(a, b, (1.0, 1.0))


def test_bad_arguments_raise_value_error() -> None:
    a = np.zeros((4, 5), int)
    with pytest.raises(ValueError, match="spacing"):
        case_metrics(a, a, [1], spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(a, a, (1.0, 0.0))
    with pytest.raises(ValueError, match="unknown metric"):
        case_metrics(a, a, [1], metrics=("dice", "hd99"))
    with pytest.raises(ValueError, match="percentile"):
        hausdorff(a, a, None, percentile=101)
    with pytest.raises(ValueError, match="tolerance"):
        case_metrics(a, a, [1], tolerance_mm=-1.0)
    with pytest.raises(ValueError):
        case_metrics(a, a, ["1"])
    with pytest.raises(ValueError):
        case_metrics(a, a, {"empty": []})


# --------------------------------------------------------------------------- MONAI agreement

ATOL = 1e-5  # MONAI works in float32; our values are float64


def _monai_all(pred: np.ndarray, truth: np.ndarray, n_classes: int, spacing, tau: float) -> dict[str, np.ndarray]:
    """MONAI's per-class values (classes 1..n_classes) for integer label maps."""
    torch = pytest.importorskip("torch")
    mm = pytest.importorskip("monai.metrics")

    def onehot(x: np.ndarray):
        return torch.as_tensor(np.stack([x == c for c in range(n_classes + 1)])[None].astype(np.float32))

    yp, yt = onehot(pred), onehot(truth)
    sp = list(spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = {
            "dice": mm.DiceMetric(include_background=False, reduction="none", ignore_empty=False)(yp, yt),
            "iou": mm.MeanIoU(include_background=False, reduction="none", ignore_empty=False)(yp, yt),
            "hd": mm.compute_hausdorff_distance(yp, yt, spacing=sp),
            "hd95": mm.compute_hausdorff_distance(yp, yt, percentile=95, spacing=sp),
            "assd": mm.compute_average_surface_distance(yp, yt, symmetric=True, spacing=sp),
            "nsd": mm.compute_surface_dice(yp, yt, class_thresholds=[tau] * n_classes, spacing=sp),
        }
    return {k: v.detach().cpu().numpy().reshape(-1).astype(np.float64) for k, v in out.items()}


def _compare_with_monai(pred: np.ndarray, truth: np.ndarray, n_classes: int, spacing, tau: float) -> None:
    ref = _monai_all(pred, truth, n_classes, spacing, tau)
    ours = case_metrics(pred, truth, list(range(1, n_classes + 1)), spacing=spacing, tolerance_mm=tau)
    for c in range(1, n_classes + 1):
        for name, values in ref.items():
            expected, got = values[c - 1], ours[str(c)][name]
            assert got == pytest.approx(expected, abs=ATOL, rel=1e-6), (c, name, got, expected)


@pytest.mark.parametrize("seed", range(4))
def test_matches_monai_random_2d(seed: int) -> None:
    pytest.importorskip("monai")
    rng = np.random.default_rng(seed)
    shape = (48, 56)
    pred = blobby_labels(rng, shape, 3, rng.uniform(1.5, 3.0))
    truth = blobby_labels(rng, shape, 3, rng.uniform(1.5, 3.0))
    _compare_with_monai(pred, truth, 3, (0.7, 1.3), float(rng.uniform(0.5, 3.0)))


@pytest.mark.parametrize("seed", range(4))
def test_matches_monai_random_3d(seed: int) -> None:
    pytest.importorskip("monai")
    rng = np.random.default_rng(50 + seed)
    shape = (28, 32, 20)
    pred = blobby_labels(rng, shape, 3, rng.uniform(1.5, 2.5))
    # truth = a perturbed copy of pred for realistic, mostly-overlapping surfaces
    truth = pred.copy()
    noise = blobby(rng, shape, 1.5, 0.1)
    truth[noise] = rng.integers(0, 4)
    _compare_with_monai(pred, truth, 3, (1.6, 0.55, 2.2), float(rng.uniform(0.5, 3.0)))


def test_matches_monai_hand_made_and_border_touching() -> None:
    pytest.importorskip("monai")
    # 2D: a square, a ring touching two borders and a diagonal staircase
    pred = np.zeros((20, 24), int)
    truth = np.zeros((20, 24), int)
    pred[3:9, 4:12] = 1
    truth[4:10, 4:13] = 1
    yy, xx = np.mgrid[:20, :24]
    r = np.hypot(yy - 2, xx - 20)
    pred[(r > 3) & (r < 7)] = 2
    truth[(r > 3.5) & (r < 7.5)] = 2
    pred[(yy + xx > 20) & (xx < 12)] = 3
    truth[(yy + xx > 21) & (xx < 13)] = 3
    assert all((pred == c).any() and (truth == c).any() for c in (1, 2, 3))
    _compare_with_monai(pred, truth, 3, (0.45, 1.25), 1.0)
    # 3D: full-extent slab and a ball clipped by the image border
    zz, yy, xx = np.mgrid[:12, :14, :16]
    p3 = np.zeros((12, 14, 16), int)
    t3 = np.zeros((12, 14, 16), int)
    p3[:, 2:5, :] = 1
    t3[:, 3:6, 1:] = 1
    p3[np.hypot(np.hypot(zz - 10, yy - 11), xx - 13) < 4.5] = 2
    t3[np.hypot(np.hypot(zz - 11, yy - 11), xx - 12) < 5.0] = 2
    _compare_with_monai(p3, t3, 2, (2.0, 0.8, 1.1), 1.5)


def test_matches_monai_on_empty_and_single_voxel_classes() -> None:
    """Where MONAI and we agree on degenerate classes; where we deliberately differ (inf -> NaN)."""
    pytest.importorskip("monai")
    pred = np.zeros((10, 12), int)
    truth = np.zeros((10, 12), int)
    pred[2, 3] = 1
    truth[4, 7] = 1  # class 1: single voxels
    pred[6:9, 6:9] = 2  # class 2: only in the prediction
    truth[1:3, 9:11] = 3  # class 3: only in the reference
    sp, tau = (1.3, 0.6), 1.0
    ref = _monai_all(pred, truth, 4, sp, tau)  # class 4 absent from both
    ours = case_metrics(pred, truth, [1, 2, 3, 4], spacing=sp, tolerance_mm=tau)
    for name in ("dice", "iou", "hd", "hd95", "assd", "nsd"):
        assert ours["1"][name] == pytest.approx(ref[name][0], abs=ATOL)
    for key, idx in (("2", 1), ("3", 2)):
        assert ours[key]["dice"] == ref["dice"][idx] == 0.0
        assert ours[key]["iou"] == ref["iou"][idx] == 0.0
        assert ours[key]["nsd"] == ref["nsd"][idx] == 0.0
        # MONAI gives inf for hd and assd (and NaN for hd95: torch.quantile of infs); we give NaN
        for name in ("hd", "assd"):
            assert np.isinf(ref[name][idx]) and math.isnan(ours[key][name])
        assert math.isnan(ref["hd95"][idx]) and math.isnan(ours[key]["hd95"])
    # both empty: MONAI's surface metrics are NaN too (its Dice/IoU with ignore_empty=False are 1)
    for name in ("hd", "hd95", "assd", "nsd"):
        assert math.isnan(ref[name][3]) and math.isnan(ours["4"][name])
