"""Volumes in MetaImage, NRRD and TIFF besides NIfTI: axis order and geometry read right, masks written
with their scan's geometry in every format, datasets and predictions in each format."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
from helpers import error_lines, invoke, make_nnunet, save_nifti

from unetcli.config import DataConfig
from unetcli.data.dataset import discover_dataset, load_dataset
from unetcli.data.image_io import load_volume, volume_stem
from unetcli.data.nifti import read_image, read_label, write_segmentation
from unetcli.errors import DataError

LPS = np.diag([-1.0, -1.0, 1.0])
TINY_3D = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=2", "--batch-size", "2",
           "--precision", "fp32", "--device", "cpu", "--num-threads", "1", "--set", "train.num_workers=0"]


def oblique_affine() -> np.ndarray:
    """Rotated about two axes, anisotropic, off-origin: every axis-order or LPS/RAS slip changes it."""
    a, b = 0.4, -0.25
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.8, 1.1, 2.5])
    affine[:3, 3] = [-31.25, 17.5, 42.125]
    return affine


def save_itk(array_xyz: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``(X, Y, Z)`` voxels with a voxel -> RAS affine through SimpleITK (LPS, ``(Z, Y, X)`` arrays)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array_xyz)))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((LPS @ affine[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin((LPS @ affine[:3, 3]).tolist())
    sitk.WriteImage(image, str(path), True)


def save_tiff(array_xyz: np.ndarray, spacing_xyz: tuple[float, float, float], path: Path, sidecar: bool = True) -> None:
    tifffile.imwrite(str(path), np.ascontiguousarray(np.transpose(array_xyz)))
    if sidecar:
        path.with_name(volume_stem(path) + ".json").write_text(json.dumps({"spacing": list(spacing_xyz[::-1])}))


def save_as(array_xyz: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    if path.name.endswith((".nii.gz", ".nii")):
        save_nifti(array_xyz, affine, path)
    elif path.name.endswith(".tif"):
        save_tiff(array_xyz, tuple(np.linalg.norm(affine[:3, :3], axis=0)), path)
    else:
        save_itk(array_xyz, affine, path)
    return path


def scan() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 20, (7, 6, 5)).astype(np.float32)


# --------------------------------------------------------------------------- axis order and geometry


def test_itk_voxels_and_positions_match_the_internal_convention(tmp_path: Path) -> None:
    """Voxel (i, j, k) of the internal array is SimpleITK's index (i, j, k), at the RAS point the affine gives."""
    image = sitk.GetImageFromArray(np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7))  # (Z, Y, X) = (5, 6, 7)
    image.SetSpacing((0.7, 0.9, 2.2))
    image.SetOrigin((12.5, -40.0, 7.25))
    affine = oblique_affine()
    image.SetDirection((affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)).ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "a.mha"))
    volume = load_volume(tmp_path / "a.mha")
    assert volume.data.shape == (7, 6, 5)
    for index in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1), (6, 5, 4)]:
        assert volume.data[index] == image.GetPixel(index)
        lps_point = np.asarray(image.TransformIndexToPhysicalPoint(index))
        assert np.allclose(volume.affine @ [*index, 1.0], [*(LPS @ lps_point), 1.0], atol=1e-9)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd"])
def test_a_nifti_scan_converted_by_simpleitk_reads_the_same(tmp_path: Path, suffix: str) -> None:
    """SimpleITK's own NIfTI reader converts RAS to LPS: its MHA/NRRD copy must read as the NIfTI does."""
    save_nifti(scan(), oblique_affine(), tmp_path / "scan.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(tmp_path / "scan.nii.gz")), str(tmp_path / f"scan{suffix}"))
    image, props = read_image([tmp_path / "scan.nii.gz"])
    other, other_props = read_image([tmp_path / f"scan{suffix}"])
    assert np.array_equal(image, other)
    assert np.allclose(props.affine, other_props.affine, atol=1e-5)
    assert other_props.orientation == props.orientation


SCANS = [".nii.gz", ".mha", ".nrrd"]
MASKS = [".nii.gz", ".nii", ".mha", ".nrrd", ".seg.nrrd"]


@pytest.mark.parametrize("scan_suffix", SCANS)
@pytest.mark.parametrize("mask_suffix", MASKS)
def test_a_mask_carries_its_scans_geometry_in_every_format(tmp_path: Path, scan_suffix: str, mask_suffix: str) -> None:
    affine = oblique_affine()
    _, props = read_image([save_as(scan(), affine, tmp_path / f"scan{scan_suffix}")])
    labels = np.zeros((7, 6, 5), np.int64)
    labels[1:3, 2, 0], labels[5, 0:4, 3] = 1, 300  # values above 255: stored as 16 bit
    write_segmentation(labels, props, tmp_path / f"mask{mask_suffix}")
    back = load_volume(tmp_path / f"mask{mask_suffix}")
    assert np.array_equal(back.data, labels)
    assert np.allclose(back.affine, affine, atol=1e-5)
    assert np.array_equal(read_label(tmp_path / f"mask{mask_suffix}", reference=props), labels)


def test_nifti_masks_of_non_nifti_scans_have_scanner_forms(tmp_path: Path) -> None:
    _, props = read_image([save_as(scan(), oblique_affine(), tmp_path / "scan.mha")])
    write_segmentation(np.ones((7, 6, 5), np.uint8), props, tmp_path / "mask.nii.gz")
    header = nib.load(str(tmp_path / "mask.nii.gz")).header
    assert header["sform_code"] == 1 and header["qform_code"] == 1
    assert np.allclose(header.get_qform(), oblique_affine(), atol=1e-5)


# --------------------------------------------------------------------------- TIFF


def test_tiff_spacing_from_the_sidecar_or_imagej_and_round_trip(tmp_path: Path) -> None:
    save_tiff(scan(), (0.5, 0.75, 3.0), tmp_path / "a.tif")
    image, props = read_image([tmp_path / "a.tif"])
    assert image.shape == (1, 7, 6, 5) and np.allclose(props.spacing, (0.5, 0.75, 3.0))
    tifffile.imwrite(str(tmp_path / "b.tif"), np.transpose(scan()), imagej=True, resolution=(2.0, 4.0 / 3.0),
                     metadata={"spacing": 3.0, "axes": "ZYX"})
    assert np.allclose(read_image([tmp_path / "b.tif"])[1].spacing, (0.5, 0.75, 3.0))
    labels = (scan() > 100).astype(np.int64)
    write_segmentation(labels, props, tmp_path / "out" / "mask.tif")
    assert json.loads((tmp_path / "out" / "mask.json").read_text()) == {"spacing": [3.0, 0.75, 0.5]}
    (tmp_path / "out" / "mask.json").unlink()  # the ImageJ calibration alone still gives the geometry
    back = load_volume(tmp_path / "out" / "mask.tif")
    assert np.array_equal(back.data, labels) and np.allclose(back.affine, np.diag([0.5, 0.75, 3.0, 1.0]), atol=1e-5)


def test_a_3d_tiff_without_spacing_is_refused_with_the_way_to_fix_it(tmp_path: Path) -> None:
    save_tiff(scan(), (1, 1, 1), tmp_path / "case_0000.tif", sidecar=False)
    with pytest.raises(DataError) as error:
        read_image([tmp_path / "case_0000.tif"])
    assert str(tmp_path / "case_0000.tif") in error.value.message and "without voxel spacing" in error.value.message
    assert 'add case_0000.json next to it holding {"spacing": [z, y, x]}' in error.value.message
    assert str(tmp_path / "case_0000.json") in error.value.hint


# --------------------------------------------------------------------------- datasets


def convert_dataset(source: Path, root: Path, suffix: str, label_suffix: str | None = None) -> Path:
    """A copy of an nnU-Net NIfTI dataset with every file in ``suffix`` (labels in ``label_suffix``)."""
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True)
        for path in sorted((source / folder).glob("*.nii.gz")):
            img = nib.load(str(path))
            ending = label_suffix if folder == "labelsTr" and label_suffix else suffix
            save_as(np.asarray(img.dataobj), img.affine, root / folder / f"{volume_stem(path)}{ending}")
    meta = json.loads((source / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "file_ending": suffix}))
    return root


@pytest.mark.parametrize("suffix,label_suffix", [(".mha", None), (".nrrd", ".seg.nrrd"), (".tif", None)])
def test_a_dataset_in_each_format_loads_like_its_nifti_original(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                suffix: str, label_suffix: str | None) -> None:
    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    nifti = make_nnunet(tmp_path / "nii", n=2)
    other = convert_dataset(nifti, tmp_path / "other", suffix, label_suffix)
    files = discover_dataset(other)
    assert [c.name for c in files.cases] == ["case0", "case1"] and files.file_format == "nifti"
    a, b = load_dataset(discover_dataset(nifti), DataConfig()), load_dataset(files, DataConfig())
    for x, y in zip(a.cases, b.cases):
        assert np.allclose(x.image, y.image, atol=1e-5) and np.array_equal(x.label, y.label)


def test_mixed_formats_need_file_ending(tmp_path: Path) -> None:
    data = make_nnunet(tmp_path / "d", n=2)
    img = nib.load(str(data / "imagesTr" / "case1_0000.nii.gz"))
    save_itk(np.asarray(img.dataobj), img.affine, data / "imagesTr" / "case9_0000.mha")
    # dataset.json's file_ending (".nii.gz" in make_nnunet) picks the files: the stray .mha is not a case
    assert [c.name for c in discover_dataset(data).cases] == ["case0", "case1"]
    meta = json.loads((data / "dataset.json").read_text())
    del meta["file_ending"]
    (data / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=r"several formats: NIfTI \(case0_0000.nii.gz\), MetaImage \(case9_0000.mha\)") as error:
        discover_dataset(data)
    assert 'set "file_ending" in dataset.json' in error.value.hint
    (data / "dataset.json").write_text(json.dumps({**meta, "file_ending": ".jpg"}))
    with pytest.raises(DataError, match=r"file_ending \".jpg\" is not a known image format"):
        discover_dataset(data)


# --------------------------------------------------------------------------- train, predict, eval


@pytest.fixture(scope="module")
def mha_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("formats")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNETCLI_CACHE", str(root / "cache"))
    data = convert_dataset(make_nnunet(root / "nii", n=3), root / "mha", ".mha")
    result = invoke("train", data, "--out", root / "run", "--epochs", "1", *TINY_3D)
    mp.undo()
    assert result.exit_code == 0, result.output
    return root / "nii", root / "run"


def test_the_same_scan_in_three_formats_gets_the_same_labels(mha_run: tuple[Path, Path], tmp_path: Path) -> None:
    nifti, run = mha_run
    img = nib.load(str(nifti / "imagesTr" / "case0_0000.nii.gz"))
    affine = oblique_affine()  # an oblique scan: the geometry must survive each format both ways
    scans = tmp_path / "scans"
    scans.mkdir()
    for name, suffix in (("a", ".nii.gz"), ("b", ".mha"), ("c", ".nrrd")):
        save_as(np.asarray(img.dataobj), affine, scans / f"{name}{suffix}")
    result = invoke("predict", run, scans, tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    masks = [load_volume(tmp_path / "out" / name) for name in ("a.nii.gz", "b.mha", "c.nrrd")]
    assert len(np.unique(masks[0].data)) > 1  # a real prediction, not an empty mask equal by default
    for mask in masks:
        assert np.array_equal(mask.data, masks[0].data)
        assert np.allclose(mask.affine, affine, atol=1e-5)
    again = invoke("predict", run, scans / "b.mha", tmp_path / "nrrd", "--device", "cpu", "--output-format", "nrrd")
    assert again.exit_code == 0, again.output
    assert np.array_equal(load_volume(tmp_path / "nrrd" / "b.nrrd").data, masks[0].data)
    # eval pairs a NRRD prediction with a NIfTI reference by name
    (tmp_path / "truth").mkdir()
    save_as(np.asarray(masks[0].data), affine, tmp_path / "truth" / "b.nii.gz")
    scored = invoke("eval", tmp_path / "nrrd", tmp_path / "truth", "--out", tmp_path / "report")
    assert scored.exit_code == 0, scored.output


def test_an_unknown_output_format_is_refused(mha_run: tuple[Path, Path], tmp_path: Path) -> None:
    nifti, run = mha_run
    result = invoke("predict", run, nifti / "imagesTr", tmp_path / "out", "--output-format", "tif")
    assert result.exit_code == 2 and "--output-format tif: not one of nii.gz, nii, mha, nrrd" in error_lines(result.output)[0]
    assert not (tmp_path / "out").exists()


def test_overlapped_reading_and_writing_gives_the_same_files(mha_run: tuple[Path, Path], tmp_path: Path) -> None:
    nifti, run = mha_run
    outputs = {}
    for flag in ("--overlap", "--no-overlap"):
        result = invoke("predict", run, nifti / "imagesTr", tmp_path / flag, "--device", "cpu", "--probabilities", flag, "--qc", "off")
        assert result.exit_code == 0, result.output
        outputs[flag] = {p.name: p.read_bytes() for p in sorted((tmp_path / flag).iterdir())}
    assert len(outputs["--overlap"]) == 6  # 3 masks, 3 probability files
    assert outputs["--overlap"] == outputs["--no-overlap"]
