"""`unet cv`: folds (seeded, grouped, user-given), a resumable run of every fold, out-of-fold
scoring, the postprocessing choice, and `unet predict CV` with the folds' ensemble."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import error_lines, invoke, make_blobs
from PIL import Image

from unetcli.errors import ConfigError
from unetcli.inference.ensemble import EnsembleNetwork
from unetcli.inference.postprocessing import keep_largest
from unetcli.models.unet import UNet
from unetcli.workflows.cv.splits import kfold_splits, read_splits

TINY = ["--set", "model.features=[8,16]", "--set", "train.iterations_per_epoch=6", "--set", "train.warmup_iterations=2",
        "--lr", "0.01", "--precision", "fp32", "--set", "train.num_workers=0"]


def test_kfold_validates_every_case_once_and_is_seeded() -> None:
    names = [f"c{i}" for i in range(11)]
    folds = kfold_splits(names, 5, seed=0)
    assert sorted(n for f in folds for n in f["val"]) == sorted(names)
    assert all(set(f["train"]) | set(f["val"]) == set(names) and not set(f["train"]) & set(f["val"]) for f in folds)
    assert sorted(len(f["val"]) for f in folds) == [2, 2, 2, 2, 3]
    assert kfold_splits(names, 5, seed=0) == folds and kfold_splits(names, 5, seed=1) != folds


def test_group_by_keeps_each_group_in_one_fold() -> None:
    names = [f"sub-{s:02d}_ses-{t}" for s in range(7) for t in range(1 + s % 3)]
    folds = kfold_splits(names, 3, seed=4, group_by=r"^(sub-\d+)")
    for fold in folds:
        val_subjects = {n.split("_")[0] for n in fold["val"]}
        train_subjects = {n.split("_")[0] for n in fold["train"]}
        assert not val_subjects & train_subjects
    assert sorted(n for f in folds for n in f["val"]) == sorted(names)
    with pytest.raises(ConfigError, match="at least 9 groups"):
        kfold_splits(names, 9, seed=0, group_by=r"^(sub-\d+)")
    with pytest.raises(ConfigError, match="not a regular expression"):
        kfold_splits(names, 3, seed=0, group_by="(")


def test_user_splits_in_both_formats(tmp_path: Path) -> None:
    names = ["a", "b", "c", "d"]
    nnunet = tmp_path / "splits_final.json"
    nnunet.write_text(json.dumps([{"train": ["a", "b"], "val": ["c", "d"]}, {"train": ["c", "d"], "val": ["a", "b"]}]))
    assert read_splits(nnunet, names)[1] == {"train": ["c", "d"], "val": ["a", "b"]}
    ours = tmp_path / "splits.json"
    ours.write_text(json.dumps({"folds": [{"train": ["a"], "val": ["a", "b"]}]}))
    with pytest.raises(ConfigError, match="both train and val"):
        read_splits(ours, names)
    ours.write_text(json.dumps({"folds": [{"train": ["a"], "val": ["zz"]}]}))
    with pytest.raises(ConfigError, match="not in the data: zz"):
        read_splits(ours, names)


def test_largest_component_postprocessing() -> None:
    labels = np.zeros((10, 10), np.uint8)
    labels[1:4, 1:4] = 1  # 9 voxels of class 1
    labels[7, 7] = 1  # a stray voxel of class 1
    labels[1:3, 6:9] = 2  # class 2, separate
    fg = keep_largest(labels, foreground=True)
    assert fg[7, 7] == 0 and (fg[1:3, 6:9] == 0).all() and (fg[1:4, 1:4] == 1).all()
    per_class = keep_largest(labels, classes=[1])
    assert per_class[7, 7] == 0 and (per_class[1:3, 6:9] == 2).all()


def test_ensemble_averages_the_members_probabilities() -> None:
    torch.manual_seed(0)
    a, b = UNet(2, 1, 3, features=(4, 8)).eval(), UNet(2, 1, 3, features=(4, 8)).eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        expected = (torch.softmax(a(x), 1) + torch.softmax(b(x), 1)) / 2
        got = torch.softmax(EnsembleNetwork([a, b])(x), 1)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cv")
    data = make_blobs(root / "data", n=6)
    out = root / "cv"
    result = invoke("-q", "cv", data, "--folds", "3", "--out", out, "--epochs", "2", *TINY)
    assert result.exit_code == 0, result.output
    return data, out


def test_cv_trains_every_fold_and_scores_out_of_fold_predictions(cv_run: tuple[Path, Path]) -> None:
    data, out = cv_run
    splits = json.loads((out / "splits.json").read_text())["folds"]
    assert len(splits) == 3 and sorted(n for f in splits for n in f["val"]) == [f"case{i:02d}" for i in range(6)]
    for k, fold in enumerate(splits):
        assert json.loads((out / f"fold_{k}" / "split.json").read_text()) == {"train": fold["train"], "val": fold["val"]}
        assert sorted(p.stem for p in (out / f"fold_{k}" / "oof").glob("*.png")) == fold["val"]
    assert sorted(p.name for p in (out / "oof").glob("*.png")) == sorted(p.name for p in (data / "masks").glob("*.png"))
    summary = json.loads((out / "summary.json").read_text())
    cvs = summary["cross_validation"]
    assert len(cvs["folds"]) == 3 and cvs["dice_with_95ci"]["mean"]["cases"] == 6
    assert cvs["dice_with_95ci"]["mean"]["ci_low"] <= cvs["dice_with_95ci"]["mean"]["mean"] <= cvs["dice_with_95ci"]["mean"]["ci_high"]
    assert set(json.loads((out / "postprocessing.json").read_text())) == {"foreground", "classes"}
    assert (out / "metrics.csv").read_text().startswith("case,")


def test_cv_fits_the_predicted_dice_on_its_out_of_fold_cases(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = cv_run
    with open(out / "oof" / "predictions.csv", newline="") as handle:
        assert sorted(r["case"] for r in csv.DictReader(handle)) == [f"case{i:02d}" for i in range(6)]
    stored = json.loads((out / "quality_model.json").read_text())
    assert stored["model"]["fitted"] and stored["model"]["cases"] == 6
    assert stored["reference"]["cases"] == 6  # every case trained some fold
    summary = json.loads((out / "summary.json").read_text())["cross_validation"]
    assert summary["quality_model"]["threshold"] == stored["model"]["threshold"]
    result = invoke("-q", "predict", out, data / "images", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    with open(tmp_path / "pred" / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 6 and {r["estimate"] for r in rows} == {"fitted on out-of-fold cases"}
    threshold = stored["model"]["threshold"]
    assert all((r["flagged"] == "yes") >= (float(r["predicted_dice"]) < threshold) for r in rows)


def test_rerun_skips_finished_folds_and_continues_a_killed_one(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = cv_run
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    (copy / "fold_1" / "oof" / ".complete").unlink()  # as if killed after training, before predicting
    shutil.rmtree(copy / "fold_2")  # as if killed before fold 2 started
    result = invoke("cv", data, "--folds", "3", "--out", copy, "--epochs", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert "fold 2: training" in result.output and "fold 0: training" not in result.output
    assert (copy / "fold_2" / "oof" / ".complete").is_file()
    changed = invoke("cv", data, "--folds", "3", "--out", copy, "--epochs", "3", *TINY)
    assert changed.exit_code != 0 and "differs in: train.epochs" in error_lines(changed.output)[0]


def test_predict_with_the_folds_ensemble(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = cv_run
    scan = tmp_path / "scan.png"
    shutil.copy(data / "images" / "case00.png", scan)
    result = invoke("predict", out, scan, tmp_path / "pred")
    assert result.exit_code == 0, result.output
    assert "ensemble of 3 models" in result.output
    mask = np.asarray(Image.open(tmp_path / "pred" / "scan.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1, 2}


def test_cv_errors_are_clear(data: Path, tmp_path: Path) -> None:
    result = invoke("cv", data, "--folds", "9", "--out", tmp_path / "cv")
    assert "9 folds need at least 9 cases" in error_lines(result.output)[0]
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "keep.txt").write_text("mine")
    result = invoke("cv", data, "--folds", "2", "--out", tmp_path / "cv", "--overwrite")
    assert "not a cross-validation folder" in error_lines(result.output)[0]
    assert (tmp_path / "cv" / "keep.txt").read_text() == "mine"
    result = invoke("cv", data, "--folds", "2", "--fold", "4", "--out", tmp_path / "cv2")
    assert "--fold 4 is not a fold" in error_lines(result.output)[0]


def test_configurations_compared_on_the_same_folds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from helpers import make_nnunet

    monkeypatch.setenv("UNETCLI_CACHE", str(tmp_path / "cache"))
    data = make_nnunet(tmp_path / "vol", n=4)
    out = tmp_path / "cv"
    result = invoke("-q", "cv", data, "--configs", "2d,3d_fullres", "--folds", "2", "--out", out, "--epochs", "1", *TINY)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "2d" / "splits.json").read_text())["folds"] == json.loads((out / "3d_fullres" / "splits.json").read_text())["folds"]
    assert yaml_model(out / "2d" / "fold_0") == 2 and yaml_model(out / "3d_fullres" / "fold_0") == 3
    comparison = json.loads((out / "comparison.json").read_text())
    assert set(comparison["runs"]) == {"2d", "3d_fullres", "2d+3d_fullres"}  # the pair's ensemble, on the same folds
    assert sorted(p.name for p in (out / "ensembles" / "2d+3d_fullres" / "oof").glob("*.nii.gz")) == [
        f"case{i}.nii.gz" for i in range(4)]
    loser = next(r for r in comparison["runs"] if r != comparison["winner"])
    assert "p_value" in comparison["stats"][loser]["foreground"]["dice"]
    assert "winner:" in result.output and "unet predict" in result.output

    # The pair's ensemble on one scan: where both models agree, so does their average.
    scan = data / "imagesTr" / "case0_0000.nii.gz"
    labels = {}
    for name, models in {"2d": ["2d"], "3d": ["3d_fullres"], "both": ["2d", "3d_fullres"]}.items():
        extra = [a for m in models[1:] for a in ("--ensemble-with", out / m / "fold_0")]
        pred = invoke("predict", out / models[0] / "fold_0", scan, tmp_path / name, *extra)
        assert pred.exit_code == 0, pred.output
        image = nib.load(tmp_path / name / "case0.nii.gz")
        assert image.shape == nib.load(scan).shape and np.allclose(image.affine, nib.load(scan).affine)
        labels[name] = np.asarray(image.dataobj)
    agree = labels["2d"] == labels["3d"]
    assert np.array_equal(labels["both"][agree], labels["2d"][agree])
    refused = invoke("predict", out / "2d" / "fold_0", scan, tmp_path / "p", "--ensemble-with", out / "3d_fullres" / "fold_0",
                     "--probabilities")
    assert refused.exit_code != 0 and "not available for models of different configurations" in error_lines(refused.output)[0]


def yaml_model(run: Path) -> int:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["model"]["spatial_dims"]


def test_slices_of_one_volume_stay_on_one_side_of_a_split() -> None:
    from unetcli.data.dataset import expand_to_cases, split_cases

    names = [f"{v}@{z}" for v in "abcde" for z in range(4)]
    train, val = split_cases(names, 0.4, seed=0)
    assert {n.split("@")[0] for n in train}.isdisjoint({n.split("@")[0] for n in val})
    assert sorted(train + val) == sorted(names) and len(val) == 8
    assert expand_to_cases(["b"], names) == ["b@0", "b@1", "b@2", "b@3"]


def test_parallel_folds_run_as_separate_processes(tmp_path: Path) -> None:
    data = make_blobs(tmp_path / "data", n=4)
    out = tmp_path / "cv"
    result = invoke("cv", data, "--folds", "2", "--parallel", "2", "--out", out, "--epochs", "1", *TINY)
    assert result.exit_code == 0, result.output
    assert "fold 0: started" in result.output and "fold 1: started" in result.output
    assert json.loads((out / "summary.json").read_text())["cross_validation"]["dice_with_95ci"]["mean"]["cases"] == 4
    for k in (0, 1):
        assert (out / f"fold_{k}" / "oof" / ".complete").is_file()


def test_fold_processes_of_parallel_leave_the_scoring_to_the_parent(cv_run: tuple[Path, Path]) -> None:
    # Two fold processes finishing together must not both rewrite CV/oof: they run with --no-scoring.
    data, out = cv_run
    before = (out / "summary.json").stat().st_mtime_ns
    result = invoke("cv", data, "--folds", "3", "--out", out, "--epochs", "2", *TINY, "--fold", "0", "--no-scoring")
    assert result.exit_code == 0, result.output
    assert "scoring runs once every fold is done" in " ".join(result.output.split())
    assert (out / "summary.json").stat().st_mtime_ns == before


def test_export_of_a_cv_folder_is_the_ensemble(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = cv_run
    exported = tmp_path / "ensemble.pt"
    result = invoke("export", out, "--out", exported)
    assert result.exit_code == 0, result.output
    for name, model in (("cv", out), ("file", exported)):
        assert invoke("predict", model, data / "images" / "case01.png", tmp_path / name).exit_code == 0
    a, b = (np.asarray(Image.open(tmp_path / name / "case01.png")) for name in ("cv", "file"))
    assert a.shape == (32, 32) and (a == b).mean() > 0.999


def _probabilities(folder: Path, name: str = "scan") -> np.ndarray:
    return np.load(folder / f"{name}_probabilities.npz")["probabilities"]


def test_predict_with_chosen_folds_and_checkpoint(cv_run: tuple[Path, Path], tmp_path: Path) -> None:
    data, out = cv_run
    copy = tmp_path / "cv"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "fold_1")  # a fold that has not run yet: the others can still be used
    # best.pt of fold 2 made different from its last.pt (fold 0's weights) so that the choice shows
    shutil.copy(copy / "fold_0" / "checkpoints" / "last.pt", copy / "fold_2" / "checkpoints" / "best.pt")
    scan = tmp_path / "in" / "scan.png"
    scan.parent.mkdir()
    shutil.copy(data / "images" / "case00.png", scan)

    def predict(source: Path, where: str, *flags: str) -> np.ndarray:
        result = invoke("predict", source, scan, tmp_path / where, "--probabilities", "--device", "cpu", *flags)
        assert result.exit_code == 0, result.output
        return _probabilities(tmp_path / where)

    refused = invoke("predict", copy, scan, tmp_path / "all")
    assert refused.exit_code != 0 and "fold(s) fold_1 not trained yet" in error_lines(refused.output)[0]
    assert "--folds" in refused.output
    # an ensemble of one averages in float32 what a single model gives directly: equal to float16 rounding
    last = predict(copy, "last", "--folds", "2")
    assert np.allclose(last, predict(copy / "fold_2" / "checkpoints" / "last.pt", "ref_last"), atol=2e-3)
    best = predict(copy, "best", "--folds", "2", "--checkpoint", "best")
    assert np.allclose(best, predict(copy / "fold_0" / "checkpoints" / "last.pt", "ref_best"), atol=2e-3)
    assert np.abs(best.astype(np.float32) - last).max() > 0.05
    both = invoke("predict", copy, scan, tmp_path / "both", "--folds", "0,2")
    assert both.exit_code == 0 and "ensemble of 2 models" in both.output, both.output
    outside = invoke("predict", copy, scan, tmp_path / "x", "--folds", "0,5")
    assert outside.exit_code == 2 and "--folds 0,5" in error_lines(outside.output)[0] and "folds 0..2" in outside.output
    not_cv = invoke("predict", copy / "fold_0", scan, tmp_path / "y", "--folds", "0")
    assert not_cv.exit_code == 2 and "is not a `unet cv` folder" in error_lines(not_cv.output)[0]
    bad = invoke("predict", copy, scan, tmp_path / "z", "--checkpoint", "final")
    assert bad.exit_code == 2 and "--checkpoint final: expected best or last" in error_lines(bad.output)[0]
