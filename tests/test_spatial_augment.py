"""Spatial augmentation in physical space (unetcli.data.spatial via PatchSampler): rotations are
rotations in mm, rotated patches come from real data (never from replicated patch borders),
thick-slice data turns only in-plane, and 90-degree turns only where they are exact."""

from __future__ import annotations

import numpy as np
import pytest

from unetcli.data.augment import IntensityAugmentation
from unetcli.data.sampling import PatchSampler
from unetcli.data.spatial import moving_axes, square_planes
from unetcli.data.types import Case, Dataset
from unetcli.training.setup import grid_spacing

THICK = (1.0, 1.0, 4.0)
"""1 x 1 x 4 mm voxels (RAS: the slice axis is the last)."""


def sphere_case(radius_mm: float = 11.0) -> tuple[Case, np.ndarray]:
    """A ball of ``radius_mm`` in a 1 x 1 x 4 mm volume (label 1, its centre voxel label 2), and its centre in voxels."""
    shape = (64, 64, 20)
    centre = np.array([32, 32, 10])
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    distance = np.linalg.norm((grid - centre) * np.asarray(THICK), axis=-1)
    label = (distance <= radius_mm).astype(np.int64)
    label[tuple(centre)] = 2
    return Case("ball", label[None].astype(np.float32), label), centre


def test_a_rotated_ball_stays_a_ball_of_the_same_radius_in_mm() -> None:
    """48 x 32 x 8 voxels of 1 x 1 x 4 mm are 48 x 32 x 32 mm: a rotation in voxel or normalised
    coordinates squeezes the ball into an ellipsoid; one in mm keeps it round (+-1 voxel)."""
    radius = 11.0
    case, _ = sphere_case(radius)
    sampler = PatchSampler([case], (48, 32, 8), 2, num_classes=3, foreground=[[2]], foreground_fraction=1.0,
                           flips=False, rotate90=False, rotate_scale_prob=1.0, spacing=THICK, scale_range=(1.0, 1.0))
    for position in range(6):
        _, labels = sampler.batch(position)
        for label in labels.numpy():
            ball = label > 0
            grid = np.stack(np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij"), axis=-1).astype(float)
            mm = grid * np.asarray(THICK)
            centre = mm[ball].mean(axis=0)
            distance = np.linalg.norm(mm - centre, axis=-1)
            assert ball[distance < radius - 1.5].all(), "a hole inside the ball"
            assert not ball[distance > radius + 1.5].any(), "the ball bulges out"


def test_rotated_patch_corners_are_real_data_or_padding_never_a_replicated_border() -> None:
    """A label present only on the case's outermost ring must stay a thin ring after rotation:
    replicating the cropped patch's border would smear it over whole corners."""
    label = np.zeros((32, 32), np.int64)
    label[0, :] = label[-1, :] = label[:, 0] = label[:, -1] = 1
    image = np.where(label == 1, 5.0, 1.0).astype(np.float32)[None]
    ring, padded = int(label.sum()), 0
    for ignore in (None, 2):
        sampler = PatchSampler([Case("ring", image, label)], (32, 32), 4, num_classes=2, flips=False, rotate90=False,
                               rotate_scale_prob=1.0, scale_range=(1.0, 1.0), foreground_fraction=0.0, ignore_index=ignore)
        for position in range(5):
            images, labels = sampler.batch(position)
            for img, lab in zip(images.numpy(), labels.numpy()):
                assert (lab == 1).sum() <= 1.3 * ring
                outside = img[0] == 0  # beyond the case's edge: intensity 0 and the ignore label (else background)
                assert (lab[outside] == (ignore if ignore is not None else 0)).all()
                padded += int(outside.sum())
    assert padded > 0


def test_thick_slice_data_is_never_rotated_out_of_plane() -> None:
    """Slabs across the 4 mm slice axis stay slabs: each output slice holds one label value
    (besides the background that pads beyond the case's in-plane edges)."""
    shape = (96, 96, 16)
    label = np.ones(shape, np.int64)
    label[:, :, 3:6] = 2
    label[:, :, 9:10] = 3
    assert moving_axes(THICK) == (0, 1)
    sampler = PatchSampler([Case("slabs", label[None].astype(np.float32), label)], (40, 24, 8), 2, num_classes=4,
                           flips=False, rotate90=False, rotate_scale_prob=1.0, spacing=THICK)
    for position in range(8):
        for lab in sampler.batch(position)[1].numpy():
            for z in range(lab.shape[2]):
                values = set(np.unique(lab[:, :, z]).tolist()) - {0}
                assert len(values) == 1, f"slice {z} mixes labels {values}: rotated out of plane"


def _bar_angles(spacing: tuple[float, ...], patch: tuple[int, ...], shape: tuple[int, ...]) -> list[float]:
    """Degrees by which rotated patches turn a bar pointing along axis 0 (label 1) from a marked centre
    (label 2), measured in the plane of the first two axes."""
    label = np.zeros(shape, np.int64)
    centre = tuple(n // 2 for n in shape)
    label[(slice(centre[0], centre[0] + 12),) + centre[1:]] = 1
    label[centre] = 2
    sampler = PatchSampler([Case("bar", label[None].astype(np.float32), label)], patch, 4, num_classes=3,
                           foreground=[[2]], foreground_fraction=1.0, flips=False, rotate90=False,
                           rotate_scale_prob=1.0, scale_range=(1.0, 1.0), spacing=spacing)
    angles = []
    for position in range(8):
        for lab in sampler.batch(position)[1].numpy():
            bar = np.argwhere(lab == 1).mean(axis=0) - np.argwhere(lab == 2).mean(axis=0)
            angles.append(float(np.degrees(np.arctan2(bar[1] * spacing[1], bar[0] * spacing[0]))))
    return angles


@pytest.mark.parametrize("spacing, patch, shape, widest", [
    (THICK, (40, 40, 8), (64, 64, 12), 180.0),  # thick slices: a full in-plane turn (nnU-Net's dummy 2D)
    ((1.0, 1.0), (40, 40), (64, 64), 180.0),  # a square 2D patch
    ((1.0, 1.0), (48, 24), (64, 64), 15.0),  # an elongated 2D patch: +-15 degrees
])
def test_rotation_ranges_follow_nnunet(spacing, patch, shape, widest) -> None:
    angles = np.abs(_bar_angles(spacing, patch, shape))
    assert angles.max() <= widest + 5.0
    assert angles.max() > 0.6 * widest, f"the widest turn drawn was {angles.max():.0f} degrees"


@pytest.mark.parametrize("spacing, coarsened", [(THICK, False), ((1.0, 1.0, 1.0), True)])
def test_thick_slices_are_made_coarser_in_plane_only(spacing: tuple[float, ...], coarsened: bool) -> None:
    """The low-resolution change (nnU-Net's ``ignore_axes`` for dummy-2D data) leaves the slice axis of
    thick-slice data as sharp as the scans the network will see; isotropic data is coarsened along every axis."""
    image = np.tile(np.array([-1.0, 1.0], np.float32), 8).reshape(1, 1, 1, 16) * np.ones((1, 48, 48, 16), np.float32)
    label = np.ones((48, 48, 16), np.int64)
    sampler = PatchSampler([Case("slices", image, label)], (32, 32, 8), 2, num_classes=2, flips=False, rotate90=False,
                           intensity=IntensityAugmentation(lowres_prob=1.0), spacing=spacing)
    steps = [float(np.abs(np.diff(img[0], axis=2)).min()) for pos in range(6) for img in sampler.batch(pos)[0].numpy()]
    assert (min(steps) < 1.9) == coarsened  # every patch keeps its +-1 slice-to-slice steps, or some lose them


@pytest.mark.parametrize("spacing, patch, planes", [
    (THICK, (16, 16, 16), [(0, 1)]),
    ((1.0, 1.0, 1.0), (16, 16, 16), [(0, 1), (0, 2), (1, 2)]),
    ((1.0, 1.0, 1.0), (16, 24, 24), [(1, 2)]),
    ((0.8, 0.8), (32, 32), [(0, 1)]),
    ((0.8, 1.6), (32, 32), []),
])
def test_ninety_degree_turns_only_in_planes_of_equal_spacing_and_size(spacing, patch, planes) -> None:
    assert square_planes(spacing, patch) == planes


def test_thick_slices_are_turned_by_ninety_degrees_only_in_plane() -> None:
    """A cubic patch of 1 x 1 x 4 mm voxels is not cubic in mm: turning the slice axis into the
    plane would swap a 4 mm axis for a 1 mm one. The slab profile along the slice axis must survive."""
    label = np.zeros((16, 16, 16), np.int64)
    label[:, :, :4] = 1
    label[:6, :, :] += 2  # something that a turn in-plane does move
    sampler = PatchSampler([Case("c", label[None].astype(np.float32), label)], (16, 16, 16), 4, num_classes=4,
                           flips=False, rotate90=True, spacing=THICK)
    moved = False
    for position in range(6):
        for lab in sampler.batch(position)[1].numpy():
            assert ((lab & 1) == (np.arange(16) < 4)[None, None, :]).all(), "the slice axis was turned"
            moved = moved or not np.array_equal(lab, label)
    assert moved, "no in-plane turn happened at all"


def test_rotation_keeps_batches_a_pure_function_of_seed_and_position() -> None:
    case, _ = sphere_case()
    make = lambda: PatchSampler([case], (32, 32, 8), 2, num_classes=3, rotate_scale_prob=1.0, elastic_prob=1.0,  # noqa: E731
                                spacing=THICK)
    a, b = make(), make()
    for position in (3, 0, 7):
        (ia, la), (ib, lb) = a.batch(position), b.batch(position)
        assert np.array_equal(ia.numpy(), ib.numpy()) and np.array_equal(la.numpy(), lb.numpy())


def test_elastic_deformation_moves_the_anatomy_in_plane_only_for_thick_slices() -> None:
    shape = (64, 64, 16)
    label = np.zeros(shape, np.int64)
    label[20:44, 20:44, 4:12] = 1
    sampler = PatchSampler([Case("box", label[None].astype(np.float32), label)], (40, 40, 8), 2, num_classes=2,
                           flips=False, rotate90=False, elastic_prob=1.0, spacing=THICK, foreground_fraction=1.0)
    plain = PatchSampler([Case("box", label[None].astype(np.float32), label)], (40, 40, 8), 2, num_classes=2,
                         flips=False, rotate90=False, spacing=THICK, foreground_fraction=1.0)
    changed = 0
    for position in range(4):
        warped, straight = sampler.batch(position)[1].numpy(), plain.batch(position)[1].numpy()
        changed += int(not np.array_equal(warped, straight))
        for lab, ref in zip(warped, straight):  # along the slice axis every column is the box's profile or empty
            profile = ref.any(axis=(0, 1))
            columns = lab.reshape(-1, lab.shape[2]).astype(bool)
            assert all(not c.any() or np.array_equal(c, profile) for c in columns)
    assert changed > 0


def test_the_sampler_gets_the_spacing_of_the_training_grid() -> None:
    volume = Dataset([], 2, 1, 3, [0, 1], ["bg", "fg"], ["t1"], "nifti", {"target_spacing": [1.0, 1.0, 4.0]})
    slices = Dataset([], 2, 1, 2, [0, 1], ["bg", "fg"], ["t1"], "nifti", {"target_spacing": [0.9, 1.0, 4.0], "slice_axis": 2})
    pngs = Dataset([], 2, 1, 2, [0, 1], ["bg", "fg"], ["gray"], "png")
    assert (grid_spacing(volume), grid_spacing(slices), grid_spacing(pngs)) == ([1.0, 1.0, 4.0], [0.9, 1.0], None)


@pytest.mark.parametrize("target_spacing, rotate_scale_prob", [("[1,1,2]", 0.0), ("[1,1,4]", 0.2)])
def test_thick_slices_train_with_in_plane_rotation_by_default(tmp_path, target_spacing: str, rotate_scale_prob: float) -> None:
    """The saved config of a run says what it trained with: thick slices (spacing ratio > 3) turn on the
    scanner preset's in-plane rotation/scaling, other 3D data keeps it off."""
    import yaml

    from helpers import invoke, make_nnunet

    run = tmp_path / "run"
    result = invoke("-q", "train", make_nnunet(tmp_path / "data", n=3), "--out", run, "--epochs", "1",
                    "--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=1", "--batch-size", "2",
                    "--precision", "fp32", "--device", "cpu", "--set", "train.num_workers=0",
                    "--set", f"data.target_spacing={target_spacing}")
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["rotate_scale_prob"] == rotate_scale_prob
