"""End-to-end: the `unet` command on tiny generated PNG datasets (train -> predict -> eval, errors)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from helpers import make_blobs
from typer.testing import CliRunner

from unetcli.cli import app
from unetcli.evaluation.metrics import METRIC_NAMES

TINY = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=25",
        "--batch-size", "4", "--lr", "0.01", "--set", "train.warmup_iterations=5", "--precision", "fp32"]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_blobs(tmp_path_factory.mktemp("blobs"))


@pytest.fixture(scope="module")
def trained_run(blobs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    result = CliRunner().invoke(app, ["train", str(blobs), "--out", str(out), "--epochs", "8", *TINY])
    assert result.exit_code == 0, result.output
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unetcli", *args], capture_output=True, text=True, timeout=300)


def test_train_writes_a_self_contained_run_folder_and_learns(trained_run: Path) -> None:
    for name in ("config.yaml", "split.json", "metrics.jsonl", "curves.png", "log.txt",
                 "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (trained_run / name).is_file(), name
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 9))
    assert records[-1]["train_loss"] < 0.6 * records[0]["train_loss"]
    assert max(r["val_dice_mean"] for r in records) > 0.7
    assert max(r["val_dice_mean"] for r in records) > records[0]["val_dice_mean"] + 0.2
    split = json.loads((trained_run / "split.json").read_text())
    assert len(split["val"]) == 2 and not set(split["train"]) & set(split["val"])
    assert "features:\n  - 4\n  - 8\n  - 16" in (trained_run / "config.yaml").read_text()


def test_predict_then_eval_scores_well(trained_run: Path, blobs: Path, tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    result = CliRunner().invoke(app, ["predict", str(trained_run), str(blobs / "images"), str(preds)])
    assert result.exit_code == 0, result.output
    written = sorted(p.name for p in preds.glob("*.png"))
    assert written == sorted(p.name for p in (blobs / "images").glob("*.png"))
    mask = np.asarray(Image.open(preds / "case00.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 1, 2}

    out = tmp_path / "eval"
    result = CliRunner().invoke(app, ["eval", str(preds), str(blobs / "masks"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "foreground mean" in result.output
    rows = list(csv.DictReader((out / "metrics.csv").open()))  # long form: case, class, label, metric, value
    assert len(rows) == 10 * 2 * len(METRIC_NAMES) and {r["class"] for r in rows} == {"1", "2"}
    assert {r["metric"] for r in rows} == set(METRIC_NAMES)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["foreground_mean"]["dice"] > 0.7
    assert summary["classes"]["1"]["dice"]["n"] == 10


def test_predict_keeps_odd_input_size_and_binary_encoding(tmp_path: Path) -> None:
    data = make_blobs(tmp_path / "bin", n=6, size=36, binary_255=True)
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(data), "--out", str(run), "--epochs", "1", *TINY])
    assert result.exit_code == 0, result.output
    odd = tmp_path / "odd"
    odd.mkdir()
    Image.fromarray(np.full((27, 45), 90, np.uint8)).save(odd / "scan.png")
    result = CliRunner().invoke(app, ["predict", str(run), str(odd / "scan.png"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    mask = np.asarray(Image.open(tmp_path / "out" / "scan.png"))
    assert mask.shape == (27, 45)
    assert set(np.unique(mask)) <= {0, 255}  # written back in the training masks' encoding


def test_predict_refuses_input_folder_and_existing_outputs(trained_run: Path, blobs: Path, tmp_path: Path) -> None:
    before = {p: p.read_bytes() for p in (blobs / "images").iterdir()}
    result = CliRunner().invoke(app, ["predict", str(trained_run), str(blobs / "images"), str(blobs / "images")])
    assert result.exit_code == 2
    assert "input folder" in result.output
    assert {p: p.read_bytes() for p in (blobs / "images").iterdir()} == before

    preds = tmp_path / "p"
    assert CliRunner().invoke(app, ["predict", str(trained_run), str(blobs / "images"), str(preds)]).exit_code == 0
    again = CliRunner().invoke(app, ["predict", str(trained_run), str(blobs / "images"), str(preds)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, ["predict", str(trained_run), str(blobs / "images"), str(preds), "--overwrite"]).exit_code == 0


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("corrupt", "case03.png: not a readable PNG"),
        ("size", "case03.png: mask size"),
        ("stray", "case03.png: label value(s) [7]"),
    ],
)
def test_train_bad_data_exits_2_with_one_line_naming_the_file(tmp_path: Path, damage: str, expected: str) -> None:
    data = make_blobs(tmp_path / "d", n=6)
    if damage == "corrupt":
        path = data / "images" / "case03.png"
        path.write_bytes(path.read_bytes()[:40])
    elif damage == "size":
        Image.fromarray(np.zeros((20, 32), np.uint8)).save(data / "masks" / "case03.png")
    else:
        mask = np.asarray(Image.open(data / "masks" / "case03.png")).copy()
        mask[0, 0] = 7
        Image.fromarray(mask).save(data / "masks" / "case03.png")
    proc = run_cli("train", str(data), "--out", str(tmp_path / "run"), "--epochs", "1")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()


def test_unknown_config_key_gets_did_you_mean(blobs: Path, tmp_path: Path) -> None:
    proc = run_cli("train", str(blobs), "--out", str(tmp_path / "r"), "--set", "train.epocs=3")
    assert proc.returncode == 2
    assert "unknown config key 'train.epocs'" in proc.stderr and "did you mean 'epochs'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_run_folder_is_a_clear_error(blobs: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "nope"), str(blobs / "images"), str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "run folder or checkpoint not found" in result.output


def test_eval_unmatched_files_are_listed(blobs: Path, tmp_path: Path) -> None:
    preds = tmp_path / "preds"
    preds.mkdir()
    for p in list((blobs / "masks").glob("*.png"))[:3]:
        (preds / p.name).write_bytes(p.read_bytes())
    (preds / "extra.png").write_bytes((blobs / "masks" / "case00.png").read_bytes())
    result = CliRunner().invoke(app, ["eval", str(preds), str(blobs / "masks"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    assert "extra.png: no reference named extra.png" in result.output
    assert result.output.count("no prediction named") == 7


def test_eval_perfect_prediction_scores_one(blobs: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["eval", str(blobs / "masks"), str(blobs / "masks"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())
    assert summary["foreground_mean"]["dice"] == pytest.approx(1.0)
    assert summary["foreground_mean"]["hd95"] == pytest.approx(0.0)


@pytest.mark.parametrize("command", [[], ["train"], ["predict"], ["eval"], ["demo"]])
def test_help_explains_every_command_with_an_example(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output
    if command:
        assert "Examples:" in result.output and f"unet {command[0]}" in result.output.split("Examples:")[1]


def test_a_library_warning_is_one_log_line_before_the_error(blobs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's raw warning form (path:line: UserWarning: ... plus the source line) would precede and
    obscure the one `error:` line; it is logged as one line instead."""
    import warnings

    from unetcli.errors import ConfigError
    from unetcli.workflows import eval as eval_workflow

    def warns_then_fails(*args: object, **kwargs: object) -> None:
        warnings.warn("a library\nnotice", UserWarning)
        raise ConfigError("refused")

    monkeypatch.setattr(eval_workflow, "run_evaluation", warns_then_fails)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        result = CliRunner().invoke(app, ["eval", str(blobs / "masks"), str(blobs / "masks"), "--out", str(tmp_path / "e")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert any("UserWarning: a library notice" in line for line in lines), result.output
    assert not any("warnings.warn" in line or ".py:" in line for line in lines), result.output
    assert [line for line in lines if line.startswith("error:")] == ["error: refused"]
