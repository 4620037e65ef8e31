"""Quality checks at predict time (issue 29): predictions.csv, out-of-distribution warnings,
uncertainty signals, the predicted Dice, and errors that stay errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import error_lines, invoke, make_nnunet, make_volume, save_nifti
from PIL import Image
from torch import nn

from unetcli.checkpoint import load_checkpoint, save_checkpoint
from unetcli.evaluation.quality_fit import fit_quality_model, spearman
from unetcli.inference.confidence import ConfidenceSums
from unetcli.data.scan_geometry import ScanGeometry
from unetcli.inference.quality import RULES, UNFITTED_THRESHOLD, check_signal, compare_with_training
from unetcli.inference.quality_signals import measure_case, training_reference
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.workflows.quality import add_quality_reference

TINY_3D = ["--epochs", "2", "--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=10", "--batch-size", "2",
           "--lr", "0.01", "--set", "train.warmup_iterations=5", "--precision", "fp32", "--set", "train.num_workers=0"]
TINY_2D = ["--epochs", "1", "--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=4",
           "--batch-size", "2", "--precision", "fp32", "--set", "train.num_workers=0"]


def rows_of(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as handle:
        return {r["case"]: r for r in csv.DictReader(handle)}


# --------------------------------------------------------------------------- the parts


def test_confidence_of_sure_and_unsure_probabilities() -> None:
    sure = torch.zeros(3, 4, 5)
    sure[0, :2], sure[1, 2:, :3], sure[2, 2:, 3:] = 1, 1, 1
    unsure = 0.8 * sure + 0.2 / 3
    a, b = ConfidenceSums(3), ConfidenceSums(3)
    a.add(sure)
    b.add(unsure)
    assert a.summary()["softmax_dice"] == pytest.approx(1.0)
    assert a.summary()["margin"] == pytest.approx(1.0) and a.summary()["entropy"] == pytest.approx(0.0, abs=1e-6)
    assert b.summary()["softmax_dice"] < 0.95 and b.summary()["margin"] == pytest.approx(0.8, abs=1e-6)
    assert b.summary()["entropy"] > 0.3 and math.isnan(b.summary()["mirror_disagreement"])


@pytest.mark.parametrize("mirror", [False, True])
def test_labels_and_probabilities_outputs_see_the_same_voxels(mirror: bool) -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 3, padding=1)).eval()
    for shape in ((1, 13, 20, 9), (1, 5, 6, 4)):  # larger than a window, and smaller (padded)
        image = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        by_probs, by_labels = ConfidenceSums(3), ConfidenceSums(3)
        probs = sliding_window_predict(net, image, (8, 8, 8), 3, mirror=mirror, confidence=by_probs)
        labels = sliding_window_predict(net, image, (8, 8, 8), 3, mirror=mirror, output="labels", confidence=by_labels)
        assert by_labels.voxels.tolist() == np.bincount(labels.flatten().numpy(), minlength=3).tolist()
        assert by_probs.voxels.sum() == np.prod(shape)
        assert np.allclose(by_probs.prob_all, by_labels.prob_all, rtol=1e-4)
        assert np.allclose(probs.sum(dim=(1, 2, 3)).numpy(), by_probs.prob_all, rtol=1e-4)
        assert (by_labels.flip_voxels > 0) == mirror


def test_a_spacing_far_from_the_training_spacings_is_outside_their_range() -> None:
    training = np.array([[1.0, 1.0, 1.0], [1.2, 1.1, 1.0], [1.1, 1.0, 1.2]])
    far = check_signal(RULES["spacing"], [1.1, 1.0, 5.0], training, ["along R", "along A", "along S"])
    assert far.outside and far.distance > 10
    assert far.message.startswith("spacing 5 mm along S vs training 1–1.2 mm (")
    assert "SD above the training mean" in far.message
    near = check_signal(RULES["spacing"], [1.15, 1.05, 1.1], training, ["along R", "along A", "along S"])
    assert not near.outside and near.distance < 2


def test_a_bias_field_is_told_apart_by_the_uneven_intensity_of_a_structure() -> None:
    """A slow multiplicative drift (a receive coil's bias field) leaves a structure's percentiles near
    the training ones but spreads its block means: the drift signal flags it; another clean scan is not flagged."""
    rng = np.random.default_rng(3)
    labels = np.zeros((32, 32, 32), np.uint8)
    labels[4:28, 4:28, 4:28] = 1
    ramp = np.linspace(-0.5, 0.5, 32)[:, None, None]

    def scan(bias: float) -> np.ndarray:
        image = np.where(labels == 1, 1.0, 0.0) + rng.normal(0, 0.3, labels.shape)
        return (image * (1 + bias * ramp))[None].astype(np.float32)

    geometry = ScanGeometry((1.0, 1.0, 1.0), (32, 32, 32), "RAS", 0.0)
    training = [measure_case(geometry, scan(0.0), labels, 1, 0.001) for _ in range(4)]
    reference = training_reference(training, "mL", [f"t{i}" for i in range(4)])
    clean, biased = measure_case(geometry, scan(0.0), labels, 1, 0.001), measure_case(geometry, scan(0.8), labels, 1, 0.001)
    assert clean.drift[0][0] < 0.15 < 0.5 < biased.drift[0][0]
    check_of = {c.name: c for c in compare_with_training(biased, reference, ["T1"], ["box"])}
    assert check_of["intensity_drift"].outside
    assert check_of["intensity_drift"].message.startswith("intensity uneven across box:")
    assert not {c.name: c for c in compare_with_training(clean, reference, ["T1"], ["box"])}["intensity_drift"].outside
    older = {k: v for k, v in reference.items() if k != "intensity_drift"}  # a reference made before the signal
    assert "intensity_drift" not in {c.name for c in compare_with_training(biased, older, ["T1"], ["box"])}


def test_the_fit_follows_the_out_of_fold_cases_and_keeps_the_unfitted_model_without_them() -> None:
    rng = np.random.default_rng(0)
    softmax = rng.uniform(0.7, 0.95, 40)
    dice = 0.2 + 0.7 * softmax + rng.normal(0, 0.005, 40)
    model = fit_quality_model(softmax, np.zeros(40), dice)
    assert model.fitted and model.slope == pytest.approx(0.7, abs=0.05)
    predicted = [model.predict(s, 0.0) for s in softmax]
    assert model.threshold == pytest.approx(np.percentile(predicted, 5))
    assert model.predict(0.9, 3.0) < model.predict(0.9, 0.0)  # the distance penalty stays without OOD cases
    few = fit_quality_model(softmax[:3], np.zeros(3), dice[:3])
    assert not few.fitted and few.threshold == UNFITTED_THRESHOLD
    assert spearman([1, 2, 3, 4], [10, 20, 25, 40]) == (pytest.approx(1.0), 4)


# --------------------------------------------------------------------------- 3D, end to end


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("qc3d")
    mp = pytest.MonkeyPatch()
    mp.setenv("UNETCLI_CACHE", str(root / "cache"))
    data = make_nnunet(root / "data", n=5)
    result = invoke("-q", "train", data, "--out", root / "run", *TINY_3D)
    mp.undo()
    assert result.exit_code == 0, result.output
    return data, root / "run"


@pytest.fixture()
def scans(tmp_path: Path) -> Path:
    """Two new cases as the training data stores them, and one stored at three times the spacing."""
    rng = np.random.default_rng(7)
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("alike_a", "alike_b"):
        image, _ = make_volume(rng)
        save_nifti(image, np.diag([1.0, 1.0, 2.0, 1.0]), folder / f"{name}_0000.nii.gz")
    image, _ = make_volume(rng)
    save_nifti(image, np.diag([3.0, 3.0, 6.0, 1.0]), folder / "coarse_0000.nii.gz")
    return folder


def test_predict_writes_a_row_per_case_with_volumes_and_signals(run_3d: tuple[Path, Path], scans: Path, tmp_path: Path) -> None:
    _, run = run_3d
    out = tmp_path / "pred"
    result = invoke("predict", run, scans, out)
    assert result.exit_code == 0, result.output
    rows = rows_of(out / "predictions.csv")
    assert sorted(rows) == ["alike_a", "alike_b", "coarse"]
    header = (out / "predictions.csv").read_text().splitlines()[0].split(",")
    for column in ("file", "shape", "spacing_mm", "seconds", "predicted_dice", "flagged", "reasons", "softmax_dice",
                   "margin", "entropy", "ood_spacing", "ood_intensity_p99", "volume_sphere_mL", "volume_box_mL"):
        assert column in header
    mask = np.asarray(nib.load(str(out / "alike_a.nii.gz")).dataobj)
    assert float(rows["alike_a"]["volume_sphere_mL"]) == pytest.approx(np.sum(mask == 1) * 2.0 / 1000, rel=1e-4)
    assert rows["alike_a"]["shape"] == "24x24x16" and rows["coarse"]["spacing_mm"] == "3x3x6"
    assert float(rows["alike_a"]["ood_spacing"]) == 0 and float(rows["coarse"]["ood_spacing"]) > 5
    assert 0 <= float(rows["alike_a"]["predicted_dice"]) <= 1 and float(rows["alike_a"]["seconds"]) > 0


def test_a_case_outside_the_training_range_gets_a_warning_line_per_signal(run_3d: tuple[Path, Path], scans: Path,
                                                                          tmp_path: Path) -> None:
    _, run = run_3d
    result = invoke("predict", run, scans, tmp_path / "pred")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning: coarse:")]
    assert any("spacing 3 mm along R vs training 1 mm (" in line for line in warnings), result.output
    assert any("field of view" in line for line in warnings)
    assert not any(line.startswith("warning: alike_a: spacing") for line in result.output.splitlines())
    assert rows_of(tmp_path / "pred" / "predictions.csv")["coarse"]["flagged"] == "yes"
    assert "flagged for review" in result.output


def test_qc_off_writes_no_report_and_the_same_masks(run_3d: tuple[Path, Path], scans: Path, tmp_path: Path) -> None:
    _, run = run_3d
    assert invoke("-q", "predict", run, scans, tmp_path / "on").exit_code == 0
    off = invoke("-q", "predict", run, scans, tmp_path / "off", "--qc", "off")
    assert off.exit_code == 0 and "warning" not in off.output and "flagged" not in off.output
    assert not (tmp_path / "off" / "predictions.csv").exists()
    for name in ("alike_a", "coarse"):
        a, b = (np.asarray(nib.load(str(tmp_path / d / f"{name}.nii.gz")).dataobj) for d in ("on", "off"))
        assert np.array_equal(a, b)
    bad = invoke("predict", run, scans, tmp_path / "x", "--qc", "maybe")
    assert bad.exit_code != 0 and "--qc 'maybe' is not on or off" in error_lines(bad.output)[0]


def _bad_inputs(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    (empty := folder / "empty_0000.nii.gz").write_bytes(b"")
    two = folder / "two_channels.nii.gz"
    save_nifti(np.zeros((24, 24, 16, 2), np.float32) + 1, np.diag([1.0, 1.0, 2.0, 1.0]), two)
    png = folder / "slice.png"
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(png)
    return {"empty": empty, "two channels": two, "2D image": png}


def test_errors_stay_errors_with_the_quality_check_on(run_3d: tuple[Path, Path], tmp_path: Path) -> None:
    _, run = run_3d
    expected = {"empty": "file is empty (0 bytes)", "two channels": "2 channel(s) but the model was trained on 1",
                "2D image": "the model was trained on 3D volume (.nii.gz, .nii"}
    for kind, bad in _bad_inputs(tmp_path / "bad").items():
        on = invoke("predict", run, bad, tmp_path / f"on_{bad.stem}")
        off = invoke("predict", run, bad, tmp_path / f"off_{bad.stem}", "--qc", "off")
        assert on.exit_code == off.exit_code != 0, (kind, on.output)
        assert error_lines(on.output) == error_lines(off.output) and expected[kind] in error_lines(on.output)[0]
        assert "warning" not in on.output and not (tmp_path / f"on_{bad.stem}" / "predictions.csv").exists()


def test_parts_write_their_own_report_and_continue_keeps_earlier_rows(run_3d: tuple[Path, Path], scans: Path,
                                                                      tmp_path: Path) -> None:
    _, run = run_3d
    out = tmp_path / "pred"
    for share in ("1/2", "2/2"):
        assert invoke("-q", "predict", run, scans, out, "--part", share).exit_code == 0
    first, second = rows_of(out / "predictions.part1of2.csv"), rows_of(out / "predictions.part2of2.csv")
    assert sorted([*first, *second]) == ["alike_a", "alike_b", "coarse"] and not (out / "predictions.csv").exists()
    again = tmp_path / "again"
    assert invoke("-q", "predict", run, scans, again).exit_code == 0
    (again / "alike_b.nii.gz").unlink()  # as if interrupted before this case
    assert invoke("-q", "predict", run, scans, again, "--continue").exit_code == 0
    assert sorted(rows_of(again / "predictions.csv")) == ["alike_a", "alike_b", "coarse"]


def test_eval_reports_how_the_estimates_track_the_real_dice(run_3d: tuple[Path, Path], tmp_path: Path) -> None:
    data, run = run_3d
    pred = tmp_path / "pred"
    assert invoke("-q", "predict", run, data / "imagesTr", pred).exit_code == 0
    result = invoke("eval", pred, data / "labelsTr", "--out", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert "quality estimates vs real Dice" in result.output and "Spearman" in result.output
    quality = json.loads((tmp_path / "ev" / "summary.json").read_text())["quality_estimate"]
    assert quality["cases_joined"] == 5
    assert quality["spearman"]["predicted_dice"]["cases"] == 5  # rho itself is null if a tiny model predicts one value
    rho = quality["spearman"]["softmax_dice"]
    assert rho["cases"] == 5 and -1 <= rho["spearman_rho"] <= 1
    assert quality["spearman"]["mirror_disagreement"]["cases"] == 0  # no mirroring: nothing to correlate


def test_an_older_checkpoint_predicts_the_same_masks_and_can_get_its_reference_back(run_3d: tuple[Path, Path], scans: Path,
                                                                                      tmp_path: Path) -> None:
    data, run = run_3d
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "split.json", old / "split.json")
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    reference = state["metadata"].pop("quality_reference")
    save_checkpoint(old / "checkpoints" / "best.pt", {k: v for k, v in state.items() if k not in ("format", "format_version")})
    assert invoke("-q", "predict", run, scans, tmp_path / "new").exit_code == 0
    result = invoke("predict", old, scans, tmp_path / "old_pred")
    assert result.exit_code == 0 and "no training reference" in result.output
    rows = rows_of(tmp_path / "old_pred" / "predictions.csv")
    assert rows["coarse"]["ood_spacing"] == "" and rows["coarse"]["softmax_dice"] != ""
    for name in ("alike_a", "coarse"):
        a, b = (np.asarray(nib.load(str(tmp_path / d / f"{name}.nii.gz")).dataobj) for d in ("new", "old_pred"))
        assert np.array_equal(a, b)
    mp = pytest.MonkeyPatch()
    mp.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    written = add_quality_reference(old, data)
    mp.undo()
    assert json.loads(written.read_text())["spacing"] == reference["spacing"]
    assert invoke("-q", "predict", old, scans, tmp_path / "backfilled").exit_code == 0
    assert rows_of(tmp_path / "backfilled" / "predictions.csv")["coarse"] == {
        **rows_of(tmp_path / "new" / "predictions.csv")["coarse"],
        "seconds": rows_of(tmp_path / "backfilled" / "predictions.csv")["coarse"]["seconds"]}


# --------------------------------------------------------------------------- 2D


def test_png_predictions_report_volumes_in_pixels(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert invoke("-q", "train", data, "--out", run, *TINY_2D).exit_code == 0
    result = invoke("predict", run, data / "images", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    rows = rows_of(tmp_path / "pred" / "predictions.csv")
    assert len(rows) == 6 and rows["case00"]["spacing_mm"] == "" and rows["case00"]["shape"] == "32x32"
    mask = np.asarray(Image.open(tmp_path / "pred" / "case00.png"))
    names = [c for c in rows["case00"] if c.startswith("volume_")]
    assert len(names) == 2 and all(n.endswith("_px") for n in names)
    assert sum(float(rows["case00"][n]) for n in names) == np.sum(mask > 0)
    assert rows["case00"]["ood_spacing"] == "" and rows["case00"]["ood_field_of_view"] != ""


def test_mirror_passes_report_their_disagreement(run_3d: tuple[Path, Path], scans: Path, tmp_path: Path) -> None:
    _, run = run_3d
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(scans / "alike_a_0000.nii.gz", one)
    assert invoke("-q", "predict", run, one, tmp_path / "plain").exit_code == 0
    assert invoke("-q", "predict", run, one, tmp_path / "mirrored", "--mirror").exit_code == 0
    assert rows_of(tmp_path / "plain" / "predictions.csv")["alike_a"]["mirror_disagreement"] == ""
    assert 0 <= float(rows_of(tmp_path / "mirrored" / "predictions.csv")["alike_a"]["mirror_disagreement"]) <= 1
