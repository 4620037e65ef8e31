"""DICOM series: every series under a folder predicted as one volume with its geometry; broken series
(clashing geometry, missing or duplicate slices) refused with the files named."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import error_lines, invoke, make_nnunet, make_volume, save_nifti, tilted_affine, write_dicom_series as write_series

from unetcli.data.dicom import DicomSeries, find_dicom_series, series_case_names
from unetcli.data.image_io import load_volume
from unetcli.data.nifti import read_image
from unetcli.errors import DataError

TINY_3D = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=2", "--batch-size", "2",
           "--precision", "fp32", "--device", "cpu", "--num-threads", "1", "--set", "train.num_workers=0"]


def volume() -> np.ndarray:
    image, _ = make_volume(np.random.default_rng(5))
    return np.round(image).astype(np.int16)


def test_a_series_reads_as_its_volume_with_its_geometry(tmp_path: Path) -> None:
    affine = tilted_affine()
    write_series(volume(), affine, tmp_path / "dicom", "1.2.3.1")
    (series,) = find_dicom_series(tmp_path / "dicom")
    image, props = read_image([series])
    assert np.array_equal(image[0], volume())
    assert np.allclose(props.affine, affine, atol=1e-5)


def test_series_are_found_in_sub_folders_and_named_after_them(tmp_path: Path) -> None:
    data = volume()
    write_series(data, tilted_affine(), tmp_path / "in" / "patient1", "1.2.3.1")
    write_series(data, tilted_affine(), tmp_path / "in" / "patient2", "1.2.3.2", number=3, prefix="a")
    write_series(data, tilted_affine((1.0, 1.0, 3.0)), tmp_path / "in" / "patient2", "1.2.3.3", number=4, prefix="b")
    names = series_case_names(find_dicom_series(tmp_path / "in"), tmp_path / "in")
    assert sorted(names) == ["patient1", "patient2_3", "patient2_4"]
    assert names["patient2_4"].uid == "1.2.3.3" and len(names["patient2_4"].files) == data.shape[2]


def test_a_missing_slice_is_refused_naming_the_neighbours(tmp_path: Path) -> None:
    write_series(volume(), tilted_affine(), tmp_path / "dicom", "1.2.3.1", skip=(7,))
    (series,) = find_dicom_series(tmp_path / "dicom")
    with pytest.raises(DataError, match=r"4 mm between slice006.dcm and slice008.dcm, 2 mm elsewhere \(about 1 missing"):
        read_image([series])


def test_one_series_uid_with_clashing_geometry_is_refused(tmp_path: Path) -> None:
    """Two acquisitions exported under one SeriesInstanceUID: different slice orientation."""
    write_series(volume(), tilted_affine(), tmp_path / "dicom", "1.2.3.1")
    write_series(volume(), np.diag([0.9, 0.8, 2.0, 1.0]), tmp_path / "dicom", "1.2.3.1", prefix="other")
    (series,) = find_dicom_series(tmp_path / "dicom")
    with pytest.raises(DataError, match="slices of clashing geometry in one series") as error:
        read_image([series])
    assert "orientation" in error.value.message and ".dcm" in error.value.message


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dicom_run")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNETCLI_CACHE", str(root / "cache"))
    result = invoke("train", make_nnunet(root / "data", n=3), "--out", root / "run", "--epochs", "1", *TINY_3D)
    mp.undo()
    assert result.exit_code == 0, result.output
    return root / "run"


def test_predict_a_dicom_folder_writes_one_mask_per_series(run: Path, tmp_path: Path) -> None:
    data, affine = volume(), tilted_affine()
    write_series(data, affine, tmp_path / "dicom" / "p1", "1.2.3.1")
    write_series(data, affine, tmp_path / "dicom" / "p2", "1.2.3.2")
    save_nifti(data.astype(np.float32), affine, (tmp_path / "nifti").mkdir() or tmp_path / "nifti" / "p1.nii.gz")
    result = invoke("predict", run, tmp_path / "dicom", tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["p1.nii.gz", "p2.nii.gz", "predictions.csv"]
    report = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in report[1:]] == ["p1", "p2"]  # one quality row per series
    mask = nib.load(str(tmp_path / "out" / "p1.nii.gz"))
    assert mask.shape == data.shape and np.allclose(mask.affine, affine, atol=1e-5)
    reference = invoke("predict", run, tmp_path / "nifti", tmp_path / "ref", "--device", "cpu")
    assert reference.exit_code == 0, reference.output
    assert np.array_equal(np.asarray(mask.dataobj), np.asarray(nib.load(str(tmp_path / "ref" / "p1.nii.gz")).dataobj))
    as_mha = invoke("predict", run, tmp_path / "dicom", tmp_path / "mha", "--device", "cpu", "--output-format", "mha")
    assert as_mha.exit_code == 0, as_mha.output
    assert np.allclose(load_volume(tmp_path / "mha" / "p2.mha").affine, affine, atol=1e-5)


def test_predict_refuses_a_broken_series_and_writes_nothing_for_it(run: Path, tmp_path: Path) -> None:
    write_series(volume(), tilted_affine(), tmp_path / "dicom", "1.2.3.1", skip=(3,))
    result = invoke("predict", run, tmp_path / "dicom", tmp_path / "out", "--device", "cpu")
    lines = error_lines(result.output)
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "DICOM series 1.2.3.1" in lines[0] and "slice002.dcm and slice004.dcm" in lines[0]
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_a_single_dicom_file_is_refused_with_a_hint(run: Path, tmp_path: Path) -> None:
    (first, *_) = write_series(volume(), tilted_affine(), tmp_path / "dicom", "1.2.3.1")
    result = invoke("predict", run, first, tmp_path / "out", "--device", "cpu")
    assert result.exit_code == 2 and "pass the folder holding the DICOM series" in result.output


def test_series_objects_name_their_folder_and_uid() -> None:
    assert str(DicomSeries(Path("/scans/p1"), "1.2.3", ())) == "/scans/p1 (DICOM series 1.2.3)"
