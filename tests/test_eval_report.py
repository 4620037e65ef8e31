"""`unet eval`: long CSV, NIfTI spacing, class names, regions, conventions, overlays, run comparison,
parallel scoring and one-line errors. Hand-computed values throughout; MONAI agreement of the metrics
themselves is in tests/test_metrics.py."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from helpers import error_lines, invoke

from unetcli.errors import ConfigError, DataError
from unetcli.evaluation.stats import bootstrap_mean_ci, compare_results
from unetcli.evaluation.metrics import METRIC_NAMES, case_metrics
from unetcli.evaluation.scoring import evaluate, evaluate_runs

# --------------------------------------------------------------------------- helpers


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(arr, np.uint8)).save(path)
    return path


def save_nii(path: Path, arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), dtype=np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype), affine), str(path))
    return path


def long_csv(path: Path) -> dict[tuple[str, str, str], str]:
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["case", "class", "label", "metric", "value"]
    return {(r["case"], r["class"], r["metric"]): r["value"] for r in rows}


@pytest.fixture()
def hand_pngs(tmp_path: Path) -> tuple[Path, Path]:
    """One 12x12 case. Class 1: truth rows 2-5 x cols 2-5 (16 px), prediction cols 2-7 (24 px).
    Class 2: truth rows 10-11 x cols 0-3 (8 px), prediction cols 0-1 (4 px)."""
    truth = np.zeros((12, 12), np.uint8)
    pred = np.zeros((12, 12), np.uint8)
    truth[2:6, 2:6] = 1
    pred[2:6, 2:8] = 1
    truth[10:12, 0:4] = 2
    pred[10:12, 0:2] = 2
    return save_png(tmp_path / "pred" / "a.png", pred).parent, save_png(tmp_path / "truth" / "a.png", truth).parent


def cube(shape=(12, 12, 12), lo=(4, 4, 4), hi=(8, 8, 8), label=1) -> np.ndarray:
    arr = np.zeros(shape, np.uint8)
    arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = label
    return arr


# --------------------------------------------------------------------------- CSV and values


def test_long_csv_holds_hand_computed_values(hand_pngs: tuple[Path, Path], tmp_path: Path) -> None:
    pred, truth = hand_pngs
    result = invoke("eval", pred, truth, "--out", tmp_path / "e", "--jobs", 1)
    assert result.exit_code == 0, result.output
    values = long_csv(tmp_path / "e" / "metrics.csv")
    assert len(values) == 2 * len(METRIC_NAMES)
    v = {k: float(x) for k, x in values.items()}
    # class 1: TP 16, FP 8, FN 0
    assert v[("a", "1", "dice")] == pytest.approx(2 * 16 / (24 + 16))
    assert v[("a", "1", "iou")] == pytest.approx(16 / 24)
    assert v[("a", "1", "precision")] == pytest.approx(16 / 24)
    assert v[("a", "1", "recall")] == 1.0
    assert v[("a", "1", "volume_difference")] == 8.0
    assert v[("a", "1", "hd")] == 2.0  # prediction's right edge (col 7) is 2 px from the truth's (col 5)
    # class 2: TP 4, FN 4
    assert v[("a", "2", "dice")] == pytest.approx(8 / 12)
    assert v[("a", "2", "recall")] == 0.5
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["classes"]["1"]["dice"] == {"mean": pytest.approx(0.8), "std": 0.0, "median": pytest.approx(0.8), "n": 1}
    assert summary["foreground_mean"]["dice"] == pytest.approx((0.8 + 8 / 12) / 2)
    assert "both_empty" in summary["conventions"] and summary["conventions"]["nsd_tolerance_mm"] == 1.0


def test_png_spacing_is_row_col_in_mm(hand_pngs: tuple[Path, Path]) -> None:
    pred, truth = hand_pngs
    result = evaluate(pred, truth, spacing=[2.0, 0.5])
    row = next(r for r in result.rows if r["class"] == "1")
    assert row["hd"] == 1.0  # the 2-px error is along columns (0.5 mm)
    assert row["volume_difference"] == 8 * 2.0 * 0.5
    with pytest.raises(ConfigError, match="2 axes"):
        evaluate(pred, truth, spacing=[1.0, 1.0, 1.0])


def test_nifti_spacing_comes_from_the_header_in_array_axis_order(tmp_path: Path) -> None:
    spacing = (0.5, 1.0, 3.0)
    truth = cube()
    save_nii(tmp_path / "t" / "z.nii.gz", truth, spacing)
    save_nii(tmp_path / "t" / "x.nii.gz", truth, spacing)
    save_nii(tmp_path / "p" / "z.nii.gz", cube(lo=(4, 4, 5), hi=(8, 8, 9)), spacing)  # one voxel along the 3 mm axis
    save_nii(tmp_path / "p" / "x.nii.gz", cube(lo=(5, 4, 4), hi=(9, 8, 8)), spacing)  # one voxel along the 0.5 mm axis
    result = evaluate(tmp_path / "p", tmp_path / "t")
    rows = {r["case"]: r for r in result.rows}
    assert rows["z"]["hd"] == 3.0 and rows["x"]["hd"] == 0.5
    assert rows["z"]["dice"] == pytest.approx(0.75) and rows["z"]["volume_difference"] == 0.0
    expected = case_metrics(cube(lo=(4, 4, 5), hi=(8, 8, 9)), truth, [1], spacing=spacing)["1"]
    assert {m: rows["z"][m] for m in METRIC_NAMES} == pytest.approx(expected)
    assert result.summary["spacings_mm"] == [[0.5, 1.0, 3.0]]


# --------------------------------------------------------------------------- conventions


def test_one_empty_mask_gives_dice_zero_nan_distances_and_a_count(tmp_path: Path) -> None:
    truth = np.zeros((10, 10), np.uint8)
    truth[1:4, 1:4] = 1
    truth[6:9, 6:9] = 2
    pred = truth.copy()
    pred[pred == 2] = 0  # class 2 missed
    save_png(tmp_path / "p" / "a.png", pred)
    save_png(tmp_path / "t" / "a.png", truth)
    save_png(tmp_path / "p" / "b.png", truth)
    save_png(tmp_path / "t" / "b.png", truth)
    result = invoke("eval", tmp_path / "p", tmp_path / "t", "--out", tmp_path / "e", "--jobs", 1)
    assert result.exit_code == 0, result.output
    values = long_csv(tmp_path / "e" / "metrics.csv")
    assert values[("a", "2", "dice")] == "0.0" and values[("a", "2", "nsd")] == "0.0"
    assert values[("a", "2", "hd95")] == "" and values[("a", "2", "assd")] == ""  # NaN, never inf
    s = json.loads((tmp_path / "e" / "summary.json").read_text())["classes"]["2"]
    assert s["cases_one_mask_empty"] == 1 and s["cases_prediction_empty"] == 1 and s["cases_reference_empty"] == 0
    assert s["dice"]["n"] == 2 and s["dice"]["mean"] == 0.5
    assert s["hd95"]["n"] == 1 and s["hd95"]["mean"] == 0.0


def test_both_empty_is_nan_by_default_and_perfect_with_keep_empty(tmp_path: Path) -> None:
    truth = np.zeros((10, 10), np.uint8)
    truth[1:4, 1:4] = 1
    both = truth.copy()
    both[6:9, 6:9] = 2
    pred1 = truth.copy()
    pred1[1, 1] = 0
    save_png(tmp_path / "p" / "a.png", pred1)  # class 2 absent from both masks of case a
    save_png(tmp_path / "t" / "a.png", truth)
    save_png(tmp_path / "p" / "b.png", both)
    save_png(tmp_path / "t" / "b.png", both)
    default = evaluate(tmp_path / "p", tmp_path / "t")
    row = next(r for r in default.rows if r["case"] == "a" and r["class"] == "2")
    assert all(math.isnan(row[m]) for m in METRIC_NAMES)
    stats = default.summary["classes"]["2"]
    assert stats["dice"]["n"] == 1 and stats["cases_absent_in_both"] == 1
    kept = evaluate(tmp_path / "p", tmp_path / "t", keep_empty=True)
    row = next(r for r in kept.rows if r["case"] == "a" and r["class"] == "2")
    assert row["dice"] == row["nsd"] == row["recall"] == 1.0 and row["hd95"] == row["assd"] == 0.0
    assert kept.summary["classes"]["2"]["dice"]["n"] == 2
    assert "keep-empty" in kept.summary["conventions"]["both_empty"]


# --------------------------------------------------------------------------- classes


def test_labels_and_regions(tmp_path: Path) -> None:
    truth = np.zeros((10, 10), np.uint8)
    truth[1:5, 1:5] = 1  # 16
    truth[5:7, 1:5] = 2  # 8
    truth[7:9, 1:5] = 3  # 8
    pred = truth.copy()
    pred[7:9, 1:5] = 0  # class 3 missed: whole region 1+2+3 has TP 24, FN 8
    save_png(tmp_path / "p" / "a.png", pred)
    save_png(tmp_path / "t" / "a.png", truth)
    only = evaluate(tmp_path / "p", tmp_path / "t", labels=[1])
    assert only.classes == ["1"]
    result = invoke("eval", tmp_path / "p", tmp_path / "t", "--out", tmp_path / "e", "--region", "whole=1,2,3",
                    "--region", "core=1,3", "--jobs", 1)
    assert result.exit_code == 0, result.output
    values = long_csv(tmp_path / "e" / "metrics.csv")
    assert {k[1] for k in values} == {"whole", "core"}  # regions only, without --labels
    assert float(values[("a", "whole", "dice")]) == pytest.approx(48 / 56)
    assert float(values[("a", "core", "dice")]) == pytest.approx(32 / 40)
    rows = list(csv.DictReader((tmp_path / "e" / "metrics.csv").open()))
    assert {r["label"] for r in rows} == {"1+2+3", "1+3"}
    both = evaluate(tmp_path / "p", tmp_path / "t", labels=[1, 2], regions={"whole": [1, 2, 3]})
    assert both.classes == ["1", "2", "whole"]


@pytest.mark.parametrize("layout", ["nnunet", "decathlon"])
def test_class_names_from_dataset_json_and_label_names(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "Dataset001"
    labels = {"background": 0, "liver": 1, "tumour": 2} if layout == "nnunet" else {"0": "background", "1": "liver", "2": "tumour"}
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    truth = cube(label=1)
    truth[1:3, 1:3, 1:3] = 2
    save_nii(root / "labelsTs" / "c.nii.gz", truth)
    save_nii(tmp_path / "pred" / "c.nii.gz", truth)
    result = invoke("eval", tmp_path / "pred", root / "labelsTs", "--out", tmp_path / "e", "--jobs", 1)
    assert result.exit_code == 0, result.output
    assert {k[1] for k in long_csv(tmp_path / "e" / "metrics.csv")} == {"liver", "tumour"}
    assert "liver" in result.output
    result = invoke("eval", tmp_path / "pred", root / "labelsTs", "--out", tmp_path / "e2", "--label-names", "bg,a,b")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert list(summary["classes"]) == ["a", "b"] and summary["classes"]["a"]["label"] == "1"


def test_class_names_from_a_runs_checkpoint(tmp_path: Path) -> None:
    from unetcli.checkpoint import save_checkpoint

    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "best.pt", {"config": {}, "model": {}, "metadata": {
        "label_names": ["background", "lesion"], "label_values": [0, 255]}})
    truth = np.zeros((8, 8), np.uint8)
    truth[2:5, 2:5] = 255  # binary 0/255 masks are scored as 0/1
    save_png(tmp_path / "p" / "a.png", truth)
    save_png(tmp_path / "t" / "a.png", truth)
    result = invoke("eval", tmp_path / "p", tmp_path / "t", "--run", run, "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert {k[1] for k in long_csv(tmp_path / "e" / "metrics.csv")} == {"lesion"}
    missing = invoke("eval", tmp_path / "p", tmp_path / "t", "--run", tmp_path / "nope", "--out", tmp_path / "e2")
    assert missing.exit_code == 2 and len(error_lines(missing.output)) == 1


# --------------------------------------------------------------------------- overlays


def test_overlays_for_the_worst_cases(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    truth = np.zeros((16, 16), np.uint8)
    truth[3:12, 3:12] = 1
    dices = {}
    for i, cut in enumerate([0, 1, 2, 4, 6]):
        pred = truth.copy()
        pred[3:3 + cut, 3:12] = 0
        save_png(tmp_path / "p" / f"c{i}.png", pred)
        save_png(tmp_path / "t" / f"c{i}.png", truth)
        save_png(tmp_path / "img" / f"c{i}_0000.png", rng.integers(0, 255, (16, 16)))
        dices[f"c{i}"] = 2 * (81 - 9 * cut) / (81 + 81 - 9 * cut)
    result = invoke("eval", tmp_path / "p", tmp_path / "t", "--out", tmp_path / "e", "--overlays", tmp_path / "ov",
                    "--worst", 2, "--image-dir", tmp_path / "img", "--jobs", 1)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["c3.png", "c4.png"]  # the two lowest Dice
    with Image.open(tmp_path / "ov" / "c4.png") as img:
        rgb = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    assert np.any((rgb[:, 1] > 150) & (rgb[:, 0] < 80) & (rgb[:, 2] < 80))  # green reference contour
    assert np.any((rgb[:, 0] > 150) & (rgb[:, 2] > 150) & (rgb[:, 1] < 80))  # magenta prediction contour
    again = invoke("eval", tmp_path / "p", tmp_path / "t", "--out", tmp_path / "e2", "--overlays", tmp_path / "ov")
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_overlay_of_a_3d_case(tmp_path: Path) -> None:
    save_nii(tmp_path / "t" / "v.nii.gz", cube(), (1.0, 1.0, 2.5))
    save_nii(tmp_path / "p" / "v.nii.gz", cube(hi=(8, 8, 7)), (1.0, 1.0, 2.5))
    save_nii(tmp_path / "img" / "v_0000.nii.gz", np.random.default_rng(0).normal(size=(12, 12, 12)), (1.0, 1.0, 2.5),
             dtype=np.float32)
    result = evaluate(tmp_path / "p", tmp_path / "t")
    from unetcli.evaluation.overlays import _pick_slice, write_overlays

    written = write_overlays(result, tmp_path / "ov", worst=3, image_dir=tmp_path / "img")
    assert [p.name for p in written] == ["v.png"] and written[0].stat().st_size > 1000
    assert _pick_slice([cube(hi=(8, 8, 7)) > 0], [cube() > 0]) == 7  # the slice the prediction misses


# --------------------------------------------------------------------------- comparison


def _compare_data(tmp_path: Path, n: int = 12) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(1)
    for i in range(n):
        truth = np.zeros((24, 24), np.uint8)
        r0, c0 = rng.integers(2, 8, 2)
        truth[r0:r0 + 12, c0:c0 + 12] = 1
        truth[r0 + 3:r0 + 7, c0 + 3:c0 + 7] = 2
        good, bad = truth.copy(), truth.copy()
        good[r0:r0 + 1, c0:c0 + 12] = 0  # one row missed
        bad[r0:r0 + 3 + int(rng.integers(0, 2)), c0:c0 + 12] = 0  # three or four rows missed
        save_png(tmp_path / "t" / f"c{i:02d}.png", truth)
        save_png(tmp_path / "good" / f"c{i:02d}.png", good)
        save_png(tmp_path / "bad" / f"c{i:02d}.png", bad)
    return tmp_path / "good", tmp_path / "bad", tmp_path / "t"


def test_compare_runs_writes_table_chart_and_a_small_p_value(tmp_path: Path) -> None:
    good, bad, truth = _compare_data(tmp_path)
    out = tmp_path / "cmp"
    result = invoke("eval", good, bad, "--truth", truth, "--out", out, "--jobs", 1)
    assert result.exit_code == 0, result.output
    for name in ("comparison.csv", "comparison.png", "summary.json", "good/metrics.csv", "bad/summary.json"):
        assert (out / name).is_file(), name
    assert "(ref)" in result.output and "bootstrap CI" in result.output and "Wilcoxon p vs good" in result.output
    comparison = json.loads((out / "summary.json").read_text())["comparison"]
    assert comparison["reference_run"] == "good" and comparison["cases"] == 12
    bad_dice = comparison["stats"]["bad"]["foreground"]["dice"]
    assert bad_dice["p_value"] < 0.01 and bad_dice["diff"] < 0 and bad_dice["diff_ci_high"] < 0
    for run in ("good", "bad"):
        for metric in ("dice", "hd95", "nsd"):
            s = comparison["stats"][run]["foreground"][metric]
            assert s["ci_low"] <= s["mean"] <= s["ci_high"], (run, metric, s)
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    ref_row = next(r for r in rows if r["run"] == "good" and r["class"] == "foreground" and r["metric"] == "dice")
    assert ref_row["p_value"] == "" and float(ref_row["ci_low"]) <= float(ref_row["mean"])
    with Image.open(out / "comparison.png") as img:
        assert img.size[0] > 400


def test_compare_needs_the_same_cases(tmp_path: Path) -> None:
    good, bad, truth = _compare_data(tmp_path, n=3)
    (bad / "c01.png").unlink()
    result = invoke("eval", good, bad, "--truth", truth, "--out", tmp_path / "cmp")
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"error: {truth / 'c01.png'}: no prediction named c01.png in {bad}"]


def test_bootstrap_ci_and_paired_statistics_by_hand() -> None:
    idx = np.random.default_rng(0).integers(0, 4, size=(10_000, 4))
    mean, low, high, n = bootstrap_mean_ci(np.array([1.0, 2.0, 3.0, np.nan, 4.0]), np.random.default_rng(0).integers(0, 5, size=(10_000, 5)))
    assert mean == 2.5 and n == 4 and 1.0 <= low < 2.5 < high <= 4.0
    assert bootstrap_mean_ci(np.full(4, 7.0), idx)[:3] == (7.0, 7.0, 7.0)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_parallel_scoring_gives_identical_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_method: str) -> None:
    import multiprocessing

    from unetcli.evaluation import scoring

    if start_method not in multiprocessing.get_all_start_methods():
        pytest.skip(f"no {start_method} on this platform")
    monkeypatch.setattr(scoring, "_start_method", lambda: start_method)
    good, bad, truth = _compare_data(tmp_path, n=6)
    serial = evaluate_runs([good, bad], truth, jobs=1)
    parallel = evaluate_runs([good, bad], truth, jobs=2, parallel_min_seconds=0.0)
    for a, b in zip(serial, parallel):
        assert a.cases == b.cases and len(a.rows) == len(b.rows)
        for ra, rb in zip(a.rows, b.rows):
            assert ra.keys() == rb.keys()
            assert all(ra[k] == rb[k] or (isinstance(ra[k], float) and math.isnan(ra[k]) and math.isnan(rb[k])) for k in ra)
    comparison = compare_results(parallel)
    assert comparison.runs == ["good", "bad"]


# --------------------------------------------------------------------------- bad input


def _bad_input(tmp_path: Path, kind: str) -> tuple[list[object], list[str]]:
    """Arguments for `unet eval` and strings its one error line must contain."""
    p, t = tmp_path / "p", tmp_path / "t"
    save_nii(t / "a.nii.gz", cube())
    if kind == "unmatched":
        save_nii(p / "b.nii.gz", cube())
        save_nii(t / "b.nii.gz", cube())
        save_nii(p / "extra.nii.gz", cube())
        (t / "a.nii.gz").unlink()
        return [p, t], [str(p / "extra.nii.gz"), "no reference named extra.nii.gz"]
    if kind == "shape":
        save_nii(p / "a.nii.gz", np.zeros((12, 12, 10)))
        return [p, t], [str(p / "a.nii.gz"), str(t / "a.nii.gz"), "shape"]
    if kind == "affine":
        save_nii(p / "a.nii.gz", cube(), origin=(0.0, 2.0, 0.0))
        return [p, t], [str(p / "a.nii.gz"), str(t / "a.nii.gz"), "affine"]
    if kind == "non-integer":
        save_nii(p / "a.nii.gz", cube() * 0.5, dtype=np.float32)
        return [p, t], [str(p / "a.nii.gz"), "non-integer"]
    if kind == "unreadable":
        p.mkdir()
        (p / "a.nii.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
        return [p, t], [str(p / "a.nii.gz")]
    if kind == "mixed-formats":
        save_png(p / "a.png", np.zeros((4, 4)))
        return [p, t], ["PNG", "NIFTI"]
    if kind == "three-paths":
        save_nii(p / "a.nii.gz", cube())
        return [p, p, t], ["expected PRED TRUTH"]
    if kind == "region":
        save_nii(p / "a.nii.gz", cube())
        return [p, t, "--region", "whole"], ["--region 'whole'"]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["unmatched", "shape", "affine", "non-integer", "unreadable", "mixed-formats",
                                  "three-paths", "region"])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path: Path, kind: str) -> None:
    args, expected = _bad_input(tmp_path, kind)
    result = invoke("eval", *args, "--out", tmp_path / "e", "--jobs", 1)
    assert result.exit_code == 2, result.output
    errors = error_lines(result.output)
    assert len(errors) == 1, result.output
    for text in expected:
        assert text in errors[0], (text, errors[0])
    assert "Traceback" not in result.output and not (tmp_path / "e" / "metrics.csv").exists()


def test_errors_in_worker_processes_are_reported_like_in_process(tmp_path: Path) -> None:
    p, t = tmp_path / "p", tmp_path / "t"
    for i in range(3):
        save_nii(t / f"c{i}.nii.gz", cube())
        save_nii(p / f"c{i}.nii.gz", cube())
    save_nii(p / "c2.nii.gz", cube(), origin=(1.0, 0.0, 0.0))
    with pytest.raises(DataError, match="c2.nii.gz: affine differs from reference"):
        evaluate(p, t, jobs=2, parallel_min_seconds=0.0)


def test_the_ignore_label_is_never_a_class_and_is_recorded(tmp_path: Path) -> None:
    """Unlabelled reference voxels (value 3 here, from --ignore-label and from dataset.json alike) are
    neither scored nor a class of their own, even where a prediction holds that value."""
    truth = np.zeros((12, 12, 12), np.uint8)
    truth[2:6, 2:6, 2:6], truth[7:10, 7:10, 7:10], truth[:, :, 11] = 1, 2, 3
    pred = truth.copy()
    pred[0, 0, 0] = 3  # a prediction may hold the ignore value where the reference is labelled
    save_nii(tmp_path / "t" / "c.nii.gz", truth)
    save_nii(tmp_path / "p" / "c.nii.gz", pred)
    result = invoke("eval", tmp_path / "p", tmp_path / "t", "--out", tmp_path / "e", "--ignore-label", 3, "--jobs", 1)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert list(summary["classes"]) == ["1", "2"] and summary["ignore_label"] == 3
    assert summary["foreground_mean"]["dice"] == pytest.approx(1.0)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2, "ignore": 3}}))
    result = invoke("eval", tmp_path / "p", tmp_path / "t", "--out", tmp_path / "e2", "--jobs", 1)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e2" / "summary.json").read_text())
    assert list(summary["classes"]) == ["a", "b"] and summary["ignore_label"] == 3
