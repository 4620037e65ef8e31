"""Tests for unetcli.data.nifti: I/O round trips, orientation, resampling, cropping, bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt

from unetcli.data.nifti import (
    ImageProperties,
    crop_to_nonzero,
    from_canonical,
    nifti_stem,
    read_image,
    read_label,
    resample,
    resample_to_shape,
    to_canonical,
    uncrop,
    write_segmentation,
)
from unetcli.data.spacing import fullres_spacing
from unetcli.errors import DataError

SHAPE = (12, 10, 8)
SPACING = (0.8, 1.2, 2.5)
ORIGIN = (-40.0, 12.5, 7.0)

# --------------------------------------------------------------------------- helpers


def oriented_affine(codes: str, spacing=SPACING, origin=ORIGIN, tilt_deg: float = 0.0) -> np.ndarray:
    """Affine whose voxel axes point along ``codes`` (e.g. "PIR"), optionally tilted a little (oblique)."""
    affine = np.eye(4)
    for axis, (world, flip) in enumerate(axcodes2ornt(tuple(codes))):
        affine[int(world), axis] = flip * spacing[axis]
    t = np.deg2rad(tilt_deg)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    affine[:3, :3] = rot @ affine[:3, :3]
    affine[:3, 3] = origin
    return affine


def save(path: Path, data: np.ndarray, affine: np.ndarray, qcode: int = 1, scode: int = 2) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    nib.save(img, path)
    return path


def volume(shape=SHAPE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, size=shape).astype(np.float32)


@pytest.fixture
def case(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A valid single-channel .nii.gz (LPS, qform 1 / sform 2), its data and affine."""
    affine = oriented_affine("LPS")
    data = volume()
    return save(tmp_path / "case_0000.nii.gz", data, affine), data, affine


# --------------------------------------------------------------------------- reading / writing


def test_read_image_single_channel(case):
    path, data, affine = case
    image, props = read_image([path])
    assert image.shape == (1, *SHAPE) and image.dtype == np.float32
    np.testing.assert_array_equal(image[0], data)
    assert props.original_shape == SHAPE
    np.testing.assert_allclose(props.spacing, SPACING, rtol=1e-6)
    assert props.orientation == ("L", "P", "S")
    np.testing.assert_allclose(props.affine, affine, atol=1e-5)


def test_read_image_channel_files_and_4d_agree(tmp_path):
    affine = oriented_affine("RAS")
    a, b = volume(seed=1), volume(seed=2)
    files = [save(tmp_path / "c_0000.nii.gz", a, affine), save(tmp_path / "c_0001.nii.gz", b, affine)]
    four_d = save(tmp_path / "c4d.nii.gz", np.stack([a, b], axis=-1), affine)
    from_files, _ = read_image(files)
    from_4d, props = read_image([four_d])
    assert from_files.shape == (2, *SHAPE)
    np.testing.assert_array_equal(from_files, from_4d)
    assert props.original_shape == SHAPE


@pytest.mark.parametrize("four_d", [False, True])
@pytest.mark.parametrize("max_label", [3, 300])
def test_write_segmentation_round_trip(tmp_path, four_d, max_label):
    affine = oriented_affine("PIR", tilt_deg=7)
    data = volume()
    if four_d:
        data = np.stack([data, data * 2], axis=-1)
    src = nib.Nifti1Image((data * 10).astype(np.int16), affine)
    src.set_qform(affine, code=1)
    src.set_sform(affine, code=4)
    src.header.set_slope_inter(0.1, 5.0)  # scaled input: must not leak into the labels
    src.header["cal_max"] = 3000
    nib.save(src, tmp_path / "img.nii.gz")
    _, props = read_image([tmp_path / "img.nii.gz"])
    labels = np.random.default_rng(3).integers(0, max_label + 1, size=SHAPE)
    out = tmp_path / "pred" / "img.nii.gz"
    write_segmentation(labels, props, out)

    written = nib.load(out)
    original = nib.load(tmp_path / "img.nii.gz")
    assert written.shape == SHAPE
    assert written.header["dim"][0] == 3
    np.testing.assert_allclose(written.affine, original.affine, atol=1e-6)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 4
    np.testing.assert_allclose(written.header["pixdim"][1:4], original.header["pixdim"][1:4])
    assert np.issubdtype(written.get_data_dtype(), np.integer)
    assert written.get_data_dtype() == (np.uint8 if max_label < 256 else np.int16)
    assert written.dataobj.slope == 1 and written.dataobj.inter == 0
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels)
    np.testing.assert_array_equal(read_label(out, reference=props), labels)
    assert not list(out.parent.glob(".*"))  # no temp file left behind


def test_nifti2_and_uncompressed_round_trip(tmp_path):
    affine = oriented_affine("ASL")
    data = volume()
    nib.save(nib.Nifti2Image(data, affine), tmp_path / "n2.nii")
    image, props = read_image([tmp_path / "n2.nii"])
    np.testing.assert_array_equal(image[0], data)
    labels = (data > 100).astype(np.int64)
    write_segmentation(labels, props, tmp_path / "out.nii")
    assert isinstance(nib.load(tmp_path / "out.nii"), nib.Nifti2Image)
    np.testing.assert_array_equal(read_label(tmp_path / "out.nii", props), labels)


def test_write_segmentation_rejects_wrong_shape(case, tmp_path):
    _, props = read_image([case[0]])
    with pytest.raises(ValueError):
        write_segmentation(np.zeros((2, 2, 2), np.int64), props, tmp_path / "x.nii.gz")


def test_nifti_stem():
    assert nifti_stem(Path("a/case_0000.nii.gz")) == "case_0000"
    assert nifti_stem("b.nii") == "b"
    with pytest.raises(ValueError):
        nifti_stem("c.png")


# --------------------------------------------------------------------------- orientation

ORIENTATIONS = ["RAS", "LPS", "PIR", "ASL", "LAS", "SRA", "IPL"]


@pytest.mark.parametrize("codes", ORIENTATIONS)
@pytest.mark.parametrize("tilt", [0.0, 10.0])
def test_canonical_round_trip_and_world_positions(codes, tilt):
    affine = oriented_affine(codes, tilt_deg=tilt)
    assert "".join(nib.aff2axcodes(affine)) == codes
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)  # value identifies the voxel
    image = np.stack([data, -data])
    canon, canon_affine = to_canonical(image, affine)
    assert nib.aff2axcodes(canon_affine) == ("R", "A", "S")

    props = ImageProperties(affine, nib.Nifti1Header(), SHAPE, SPACING, tuple(nib.aff2axcodes(affine)))
    assert canon.shape[1:] == props.canonical_shape
    np.testing.assert_allclose(props.canonical_affine, canon_affine)
    rng = np.random.default_rng(0)
    for _ in range(5):
        ijk_c = [int(rng.integers(n)) for n in canon.shape[1:]]
        ijk_o = np.unravel_index(int(canon[(0, *ijk_c)]), SHAPE)
        np.testing.assert_allclose(canon_affine @ [*ijk_c, 1], affine @ [*ijk_o, 1], atol=1e-9)
    np.testing.assert_array_equal(from_canonical(canon, props), image)
    np.testing.assert_array_equal(from_canonical(canon[0], props), data)


def test_lps_and_ras_give_identical_canonical_arrays(tmp_path):
    data = volume()
    ras = oriented_affine("RAS")
    flip = np.array([[-1, 0, 0, SHAPE[0] - 1], [0, -1, 0, SHAPE[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    lps = ras @ flip  # voxel (i, j, k) of the LPS file is voxel (X-1-i, Y-1-j, k) of the RAS file
    assert nib.aff2axcodes(lps) == ("L", "P", "S")
    image_ras, props_ras = read_image([save(tmp_path / "ras.nii.gz", data, ras)])
    image_lps, props_lps = read_image([save(tmp_path / "lps.nii.gz", data[::-1, ::-1].copy(), lps)])
    canon_ras, aff_ras = to_canonical(image_ras, props_ras.affine)
    canon_lps, aff_lps = to_canonical(image_lps, props_lps.affine)
    np.testing.assert_array_equal(canon_ras, canon_lps)
    np.testing.assert_allclose(aff_ras, aff_lps, atol=1e-5)


# --------------------------------------------------------------------------- resampling


def test_resample_shape_scales_with_spacing_ratio():
    image = volume()[None]
    out = resample(image, (1.0, 1.0, 1.0), (2.0, 0.5, 1.0), order=3)
    assert out.shape == (1, 6, 20, 8) and out.dtype == np.float32


def test_resample_order0_keeps_label_values_and_shape_round_trip():
    labels = np.random.default_rng(1).integers(0, 4, size=SHAPE)
    labels[labels == 2] = 7
    out = resample(labels, (1.0, 1.0, 1.0), (0.7, 1.3, 2.0), order=0)
    assert out.shape == (17, 8, 4)
    assert set(np.unique(out)) <= {0, 1, 3, 7}
    back = resample_to_shape(out, SHAPE, order=0)
    assert back.shape == SHAPE and set(np.unique(back)) <= {0, 1, 3, 7}
    probs = np.random.default_rng(2).random((3, *SHAPE)).astype(np.float32)
    up = resample(probs, (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), order=1)
    assert up.shape == (3, 24, 20, 16)
    assert resample_to_shape(up, SHAPE, order=1).shape == (3, *SHAPE)
    assert 0.0 <= up.min() and up.max() <= 1.0


@pytest.mark.parametrize("axis", [0, 2])
def test_resample_anisotropic_uses_nearest_out_of_plane(axis):
    shape = [10, 10, 10]
    shape[axis] = 6
    grid = np.indices(shape, dtype=np.float32)
    in_plane = [a for a in range(3) if a != axis]
    image = (100 * grid[axis] + 0.05 * grid[in_plane[0]] + 0.03 * grid[in_plane[1]])[None]
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 5.0
    target = [0.5, 0.5, 0.5]
    target[axis] = 2.0
    out = resample(image, spacing, target, order=3)
    expected = [20, 20, 20]
    expected[axis] = 15
    assert out.shape == (1, *expected)
    # every output voxel is an in-plane interpolation of one original slice: within 1 of 100 * k
    assert np.all(np.abs(out - 100 * np.round(out / 100)) < 1.0)
    # whereas plain (isotropic) cubic resampling blends slices
    blended = resample_to_shape(image, expected, order=3)
    assert np.any(np.abs(blended - 100 * np.round(blended / 100)) > 10)


# --------------------------------------------------------------------------- cropping


def test_crop_uncrop_round_trip():
    image = np.zeros((2, *SHAPE), np.float32)
    image[0, 2:5, 3:9, 1:4] = 1.5
    image[1, 6, 4, 6] = -2.0
    labels = (image[0] > 0).astype(np.int64)
    cropped, cropped_labels, box = crop_to_nonzero(image, labels)
    assert box == (slice(2, 7), slice(3, 9), slice(1, 7))
    assert cropped.shape == (2, 5, 6, 6) and cropped_labels.shape == (5, 6, 6)
    np.testing.assert_array_equal(uncrop(cropped, box, SHAPE), image)
    np.testing.assert_array_equal(uncrop(cropped_labels, box, SHAPE), labels)
    _, _, wide = crop_to_nonzero(image, margin=3)
    assert wide == (slice(0, 10), slice(0, 10), slice(0, 8))
    _, none, full = crop_to_nonzero(np.zeros((1, *SHAPE)))
    assert none is None and full == tuple(slice(0, n) for n in SHAPE)


# --------------------------------------------------------------------------- planning


def test_target_spacing_median_rule():
    spacings = [(1.0, 1.0, 1.0), (1.2, 0.8, 1.1), (0.9, 1.0, 2.0)]
    assert fullres_spacing(spacings, [(100, 100, 100)] * 3) == pytest.approx((1.0, 1.0, 1.1))


def test_target_spacing_anisotropic_uses_10th_percentile():
    zs = [1.5, 3.0, 5.0, 5.0, 6.0]
    spacings = [(0.5, 0.5, z) for z in zs]
    thick_and_short = [(200, 200, 30)] * 5
    assert fullres_spacing(spacings, thick_and_short) == pytest.approx((0.5, 0.5, float(np.percentile(zs, 10))))
    assert np.percentile(zs, 10) == pytest.approx(2.1)
    # the out-of-plane axis never becomes finer than the in-plane axes
    clamped = [(0.5, 0.9, 0.1)] * 2 + [(0.5, 0.9, 5.0)] * 3  # 10th percentile 0.1 < in-plane 0.9
    assert fullres_spacing(clamped, thick_and_short) == pytest.approx((0.5, 0.9, 0.9))
    # a thick axis that is not short (a large field of view) keeps its median, as nnU-Net does
    assert fullres_spacing(spacings, [(200, 200, 150)] * 5) == pytest.approx((0.5, 0.5, 5.0))


# --------------------------------------------------------------------------- bad files


def _raises_naming(func, *names: str) -> DataError:
    with pytest.raises(DataError) as info:
        func()
    for name in names:
        assert name in str(info.value), str(info.value)
    return info.value


def test_bad_file_zero_bytes(tmp_path):
    path = tmp_path / "empty_0000.nii.gz"
    path.write_bytes(b"")
    _raises_naming(lambda: read_image([path]), path.name)


def test_bad_file_truncated(case):
    path, _, _ = case
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _raises_naming(lambda: read_image([path]), path.name)


def test_bad_file_gzip_garbage(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + np.random.default_rng(0).bytes(2000))
    _raises_naming(lambda: read_image([path]), path.name)


def test_bad_file_text_named_nii_gz(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image\n" * 30)
    _raises_naming(lambda: read_image([path]), path.name)


def test_bad_file_missing(tmp_path):
    _raises_naming(lambda: read_image([tmp_path / "missing.nii.gz"]), "missing.nii.gz")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_bad_file_non_finite_voxel(tmp_path, value):
    data = volume()
    data[3, 4, 5] = value
    path = save(tmp_path / "nonfinite.nii.gz", data, oriented_affine("RAS"))
    _raises_naming(lambda: read_image([path]), path.name)


def test_bad_label_4d(tmp_path):
    path = save(tmp_path / "lab4d.nii.gz", np.zeros((*SHAPE, 2), np.uint8), oriented_affine("RAS"))
    _raises_naming(lambda: read_label(path), path.name)


def test_label_with_trailing_singleton_axis_is_accepted(tmp_path):
    path = save(tmp_path / "lab.nii.gz", np.ones((*SHAPE, 1), np.uint8), oriented_affine("RAS"))
    assert read_label(path).shape == SHAPE


def test_bad_label_values(tmp_path):
    affine = oriented_affine("RAS")
    frac = np.zeros(SHAPE, np.float32)
    frac[1, 1, 1] = 0.5
    path = save(tmp_path / "frac.nii.gz", frac, affine)
    _raises_naming(lambda: read_label(path), path.name, "non-integer")
    neg = np.zeros(SHAPE, np.int16)
    neg[2, 2, 2] = -1
    path = save(tmp_path / "neg.nii.gz", neg, affine)
    _raises_naming(lambda: read_label(path), path.name, "negative")


def test_bad_label_grid(tmp_path, case):
    image_path, _, affine = case
    _, props = read_image([image_path])
    small = save(tmp_path / "small.nii.gz", np.zeros((12, 10, 7), np.uint8), affine)
    _raises_naming(lambda: read_label(small, props), small.name, "(12, 10, 7)", "(12, 10, 8)")
    shifted = affine.copy()
    shifted[:3, 3] += 2.0
    moved = save(tmp_path / "moved.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    _raises_naming(lambda: read_label(moved, props), moved.name, image_path.name, "origin")
    ok = save(tmp_path / "ok.nii.gz", np.ones(SHAPE, np.uint8), affine)
    assert read_label(ok, props).dtype == np.int64


def test_bad_channel_files(tmp_path):
    affine = oriented_affine("RAS")
    first = save(tmp_path / "c_0000.nii.gz", volume(), affine)
    other_shape = save(tmp_path / "c_0001.nii.gz", volume((12, 10, 9)), affine)
    _raises_naming(lambda: read_image([first, other_shape]), first.name, other_shape.name)
    other_affine = save(tmp_path / "c_0002.nii.gz", volume(), oriented_affine("RAS", spacing=(0.8, 1.2, 2.6)))
    _raises_naming(lambda: read_image([first, other_affine]), first.name, other_affine.name)
    tiny_diff = oriented_affine("RAS", origin=(ORIGIN[0] + 1e-6, ORIGIN[1], ORIGIN[2]))
    close = save(tmp_path / "c_0003.nii.gz", volume(), tiny_diff)
    assert read_image([first, close])[0].shape == (2, *SHAPE)
    four_d = save(tmp_path / "c_0004.nii.gz", np.zeros((*SHAPE, 2), np.float32), affine)
    _raises_naming(lambda: read_image([first, four_d]), four_d.name)


def test_gzip_crc_error_is_caught(case):
    """A flipped byte deep in the deflate stream may only fail the CRC at the end of the stream."""
    path, _, _ = case
    raw = bytearray(path.read_bytes())
    raw[-8] ^= 0xFF  # corrupt the stored CRC32 itself: the data decompresses fine, the check fails
    path.write_bytes(bytes(raw))
    _raises_naming(lambda: read_image([path]), path.name)


def test_flip_inside_deflate_stream_caught_by_crc(case):
    """A flip that still inflates cleanly (wrong voxels) is only detectable by the trailing CRC."""
    path, _, _ = case
    raw = path.read_bytes()
    for pos in range(len(raw) // 2, len(raw) - 8):
        mutated = bytearray(raw)
        mutated[pos] ^= 0x01
        try:
            gzip.decompress(bytes(mutated))
        except gzip.BadGzipFile as exc:
            if "CRC" in str(exc):
                break
        except (EOFError, OSError, ValueError):
            continue
    else:
        pytest.skip("no CRC-only corruption found")
    path.write_bytes(bytes(mutated))
    _raises_naming(lambda: read_image([path]), path.name, "gzip")


@pytest.mark.parametrize("compressed", [True, False])
def test_fuzz_only_data_errors(tmp_path, compressed):
    name = "fuzz.nii.gz" if compressed else "fuzz.nii"
    path = save(tmp_path / name, volume(), oriented_affine("LPS"))
    raw = path.read_bytes()
    rng = np.random.default_rng(1234 if compressed else 4321)
    outcomes = {"ok": 0, "DataError": 0}
    for _ in range(30):
        mutated = bytearray(raw)
        if rng.random() < 0.3:
            mutated = mutated[: int(rng.integers(0, len(raw)))]
        else:
            # uncompressed: aim at the 348-byte header, where the parser can trip
            limit = len(raw) if compressed else 352
            for _ in range(int(rng.integers(1, 4))):
                mutated[int(rng.integers(0, limit))] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(mutated))
        try:
            image, _ = read_image([path])
        except DataError:
            outcomes["DataError"] += 1
        else:
            assert image.ndim == 4 and np.all(np.isfinite(image))
            outcomes["ok"] += 1
    assert outcomes["DataError"] >= 10, outcomes


def test_gzip_member_with_zero_padding_is_accepted(case):
    path, data, _ = case
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())) + b"\0" * 16)
    np.testing.assert_array_equal(read_image([path])[0][0], data)
