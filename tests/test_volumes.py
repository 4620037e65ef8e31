"""The 3D NIfTI path: layouts, cached preprocessing, geometry round trips, training, prediction."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import lps_affine, make_nnunet, make_volume, save_nifti
from typer.testing import CliRunner

from unetcli.cli import app
from unetcli.config import DataConfig
from unetcli.data import volumes
from unetcli.data.dataset import discover_dataset, load_dataset
from unetcli.data.nifti import read_image
from unetcli.errors import DataError

TINY_3D = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=20", "--batch-size", "2",
           "--lr", "0.01", "--set", "train.warmup_iterations=5", "--precision", "fp32", "--set", "train.num_workers=0"]


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_nnunet_layout_is_detected_with_names(tmp_path: Path, cache: Path) -> None:
    files = discover_dataset(make_nnunet(tmp_path / "d", n=3))
    assert files.layout == "nnunet" and files.file_format == "nifti"
    assert files.label_names == ["background", "sphere", "box"] and files.channel_names == ["T1"]
    dataset = load_dataset(files, DataConfig())
    assert dataset.spatial_dims == 3 and dataset.num_classes == 3 and dataset.in_channels == 1
    assert dataset.preprocessing["target_spacing"] == [1.0, 1.0, 2.0]
    assert isinstance(dataset.cases[0].image, np.memmap)
    # cropped to the brain's non-zero box
    assert dataset.cases[0].image.shape[1:] == dataset.cases[0].label.shape
    assert max(dataset.cases[0].label.shape) < 24


def test_decathlon_4d_layout(tmp_path: Path, cache: Path) -> None:
    root = tmp_path / "msd"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for i in range(2):
        image, label = make_volume(rng)
        save_nifti(np.stack([image, image * 0.5], axis=-1), np.eye(4), root / "imagesTr" / f"brain_{i:03d}.nii.gz")
        save_nifti(label, np.eye(4), root / "labelsTr" / f"brain_{i:03d}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1w"},
                                                   "labels": {"0": "background", "1": "a", "2": "b"}}))
    files = discover_dataset(root)
    assert files.layout == "decathlon"
    dataset = load_dataset(files, DataConfig())
    assert dataset.in_channels == 2 and dataset.channel_names == ["FLAIR", "T1w"] and dataset.label_names == ["background", "a", "b"]


def test_preprocessing_is_cached_and_reused(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = discover_dataset(make_nnunet(tmp_path / "d", n=2))
    first = load_dataset(files, DataConfig())
    assert len(list(cache.glob("*_image.npy"))) == 2

    def no_read(*args, **kwargs):
        raise AssertionError("cached cases must not be decoded again")

    monkeypatch.setattr(volumes, "read_image", no_read)
    second = load_dataset(files, DataConfig())
    assert np.array_equal(first.cases[1].image, second.cases[1].image)


def test_a_damaged_cache_entry_is_prepared_again(tmp_path: Path, cache: Path) -> None:
    """The cache is the tool's own file: a truncated entry (killed mid-write, full disk) is made again."""
    files = discover_dataset(make_nnunet(tmp_path / "d", n=2))
    first = load_dataset(files, DataConfig())
    for entry in cache.glob("*.json"):
        entry.write_text('{"shape": [')
    second = load_dataset(files, DataConfig())
    assert np.array_equal(first.cases[1].image, second.cases[1].image)


def test_every_bad_case_is_listed_before_training(tmp_path: Path, cache: Path) -> None:
    root = make_nnunet(tmp_path / "d", n=4)
    save_nifti(np.zeros((20, 24, 16), np.uint8), np.diag([1.0, 1.0, 2.0, 1.0]), root / "labelsTr" / "case1.nii.gz")
    bad = nib.load(str(root / "imagesTr" / "case2_0000.nii.gz"))
    data = np.asanyarray(bad.dataobj).copy()
    data[3, 3, 3] = np.nan
    save_nifti(data, bad.affine, root / "imagesTr" / "case2_0000.nii.gz")
    with pytest.raises(DataError) as info:
        load_dataset(discover_dataset(root), DataConfig())
    lines = info.value.message.splitlines()
    assert len(lines) == 2
    assert "case1.nii.gz" in lines[0] and "shape" in lines[0]
    assert "case2_0000.nii.gz" in lines[1] and ("NaN" in lines[1] or "finite" in lines[1])


def test_preprocess_then_restore_is_exact_without_resampling(tmp_path: Path) -> None:
    image, label = make_volume(np.random.default_rng(3))
    save_nifti(image, lps_affine(), tmp_path / "img.nii.gz")
    arr, props = read_image([tmp_path / "img.nii.gz"])
    plan = {"target_spacing": [1.0, 1.0, 2.0], "crop_to_nonzero": True, "schemes": ["zscore"], "ct_stats": None}
    image_pp, label_pp, geometry = volumes.preprocess(arr, props, plan, label.astype(np.int64))
    onehot = np.eye(3, dtype=np.float32)[label_pp].transpose(3, 0, 1, 2)
    assert np.array_equal(volumes.restore_labels(onehot, props, geometry), label)


def test_restore_after_resampling_keeps_anatomy(tmp_path: Path) -> None:
    image, label = make_volume(np.random.default_rng(4), shape=(32, 32, 20))
    save_nifti(image, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "img.nii.gz")
    arr, props = read_image([tmp_path / "img.nii.gz"])
    plan = {"target_spacing": [1.5, 1.5, 1.5], "crop_to_nonzero": True, "schemes": ["zscore"], "ct_stats": None}
    image_pp, label_pp, geometry = volumes.preprocess(arr, props, plan, label.astype(np.int64))
    assert image_pp.shape[1:] != geometry.cropped_shape  # really resampled
    onehot = np.eye(3, dtype=np.float32)[label_pp].transpose(3, 0, 1, 2)
    restored = volumes.restore_labels(onehot, props, geometry)
    assert restored.shape == label.shape
    for k in (1, 2):
        dice = 2 * np.sum((restored == k) & (label == k)) / (np.sum(restored == k) + np.sum(label == k))
        assert dice > 0.8, (k, dice)


def test_label_maps_are_restored_with_smooth_boundaries(tmp_path: Path) -> None:
    # Two nested spheres on a 1 mm file grid, predicted on a 2.5 mm network grid: the restored map
    # must follow the spheres more closely than the network grid's nearest-neighbour staircase.
    grid = np.indices((48, 48, 48)).astype(np.float32) - 23.5
    radius = np.sqrt((grid ** 2).sum(0))
    label = np.where(radius < 10, 2, np.where(radius < 18, 1, 0)).astype(np.int64)
    save_nifti((100.0 + 50 * label).astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0]), tmp_path / "img.nii.gz")
    arr, props = read_image([tmp_path / "img.nii.gz"])
    plan = {"target_spacing": [2.5, 2.5, 2.5], "crop_to_nonzero": False, "schemes": ["zscore"], "ct_stats": None}
    _, label_pp, geometry = volumes.preprocess(arr, props, plan, label)
    restored = volumes.restore_label_map(label_pp, props, geometry)
    staircase = volumes.resample_to_shape(label_pp, label.shape, order=0)
    assert restored.shape == label.shape and set(np.unique(restored)) == {0, 1, 2}
    for k in (1, 2):
        dice = {name: 2 * np.sum((m == k) & (label == k)) / (np.sum(m == k) + np.sum(label == k))
                for name, m in (("smooth", restored), ("nearest", staircase))}
        assert dice["smooth"] > dice["nearest"] + 0.005, (k, dice)


@pytest.fixture(scope="module")
def trained_3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vol")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNETCLI_CACHE", str(root / "cache"))
    data = make_nnunet(root / "data", n=6, flip_first=True)
    run = root / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(run), "--epochs", "6", *TINY_3D])
    mp.undo()
    assert result.exit_code == 0, result.output
    return data, run


def test_short_3d_training_learns(trained_3d: tuple[Path, Path]) -> None:
    _, run = trained_3d
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < 0.7 * records[0]["train_loss"]
    assert max(r["val_dice_mean"] for r in records) > records[0]["val_dice_mean"] + 0.1
    assert max(r["val_dice_mean"] for r in records) > 0.5


def test_predicted_nifti_keeps_geometry_and_orientation(trained_3d: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = trained_3d
    rng = np.random.default_rng(99)
    image, label = make_volume(rng)
    scans = tmp_path / "scans"
    scans.mkdir()
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    save_nifti(image, ras, scans / "new_ras_0000.nii.gz")
    # the same scan stored flipped (LPS): a different array, the same anatomy
    save_nifti(image[::-1, ::-1].copy(), lps_affine(), scans / "new_lps_0000.nii.gz")
    out = tmp_path / "pred"
    result = CliRunner().invoke(app, ["predict", str(run), str(scans), str(out)])
    assert result.exit_code == 0, result.output
    for name, affine in (("new_ras", ras), ("new_lps", lps_affine())):
        pred = nib.load(str(out / f"{name}.nii.gz"))
        assert pred.shape == image.shape
        assert np.allclose(pred.affine, affine)
        assert pred.header["sform_code"] == 1 and pred.header["qform_code"] == 1
        assert np.issubdtype(pred.get_data_dtype(), np.integer)
    a = np.asanyarray(nib.load(str(out / "new_ras.nii.gz")).dataobj)
    b = np.asanyarray(nib.load(str(out / "new_lps.nii.gz")).dataobj)[::-1, ::-1]  # back onto the RAS grid
    fg = (a > 0) | (b > 0)
    assert fg.any()
    assert 2 * np.sum((a == b) & fg & (a > 0)) / (np.sum(a > 0) + np.sum(b > 0)) >= 0.95


def test_2d_on_3d_mode_predicts_a_volume(tmp_path: Path, cache: Path) -> None:
    data = make_nnunet(tmp_path / "d", n=3)
    run = tmp_path / "run"
    args = ["train", str(data), "--out", str(run), "--epochs", "1", "--set", "data.slice_axis=2",
            "--set", "model.features=[4,8]", "--set", "train.iterations_per_epoch=3", "--precision", "fp32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(app, ["predict", str(run), str(data / "imagesTr" / "case0_0000.nii.gz"), str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    pred = nib.load(str(tmp_path / "p" / "case0.nii.gz"))
    assert pred.shape == (24, 24, 16)


def test_predict_refuses_a_png_for_a_3d_model(trained_3d: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = trained_3d
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png)
    result = CliRunner().invoke(app, ["predict", str(run), str(png), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "x.png: the model was trained on 3D volume (.nii.gz, .nii, .mha, .mhd, .nrrd, .tif) files" in result.output
