"""Experiment tracking with the real libraries, no network: TensorBoard event files, an MLflow file
store read back with MlflowClient, W&B in offline mode. One tiny tracked run (2 epochs of 4
iterations, figures every 2 iterations, an overlay every 2 epochs) is shared by the module; the
resume test continues it last."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import error_lines, invoke_quiet as invoke

pytest.importorskip("torch.utils.tensorboard")
mlflow_tracking = pytest.importorskip("mlflow.tracking")
pytest.importorskip("wandb")

FLAGS = ["--epochs", "2", "--set", "train.iterations_per_epoch=4", "--set", "model.features=[4,8,16]", "--batch-size", "2",
         "--precision", "fp32", "--device", "cpu", "--num-threads", "1", "--set", "train.num_workers=0",
         "--set", "train.track_interval=2", "--set", "train.track_image_epochs=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A local MLflow file store and offline W&B for the module."""
    root = tmp_path_factory.mktemp("tracking")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it (unetcli sets it for local stores)
        mp.setenv("WANDB_MODE", "offline")
        mp.setenv("WANDB_SILENT", "true")
        mp.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
        mp.delenv("WANDB_PROJECT", raising=False)
        yield root


@pytest.fixture(scope="module")
def run(env: Path, data: Path) -> Path:
    out = env / "run"
    result = invoke("train", data, "--out", out, "--log-to", "tensorboard,mlflow,wandb", *FLAGS)
    assert result.exit_code == 0, result.output
    return out


def client(env: Path):
    return mlflow_tracking.MlflowClient((env / "mlruns").as_uri())


def epochs(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_holds_loss_and_dice_at_their_steps_and_one_overlay(run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4, 6, 8]
    assert all(e.value > 0 for e in events.Scalars("train/loss"))
    assert [e.step for e in events.Scalars("train/images_per_second")] == [2, 4, 6, 8]
    dice = events.Scalars("val/dice_mean")
    assert [e.step for e in dice] == [4, 8]
    assert [e.value for e in dice] == pytest.approx([r["val_dice_mean"] for r in epochs(run)], abs=1e-6)
    assert {"val/dice_class_1", "val/dice_class_2", "epoch/train_loss", "epoch/epoch_seconds"} <= set(events.Tags()["scalars"])
    images = events.Images("val/overlay")
    assert [(i.step, i.width) for i in images] == [(8, 256)]  # epoch 2 of 2; 32 px drawn 8x


def test_mlflow_run_holds_params_metric_history_and_best_checkpoint(run: Path, env: Path) -> None:
    ids = json.loads((run / "trackers.json").read_text())["mlflow"]
    c = client(env)
    assert c.get_experiment(ids["experiment_id"]).name == "blobs"  # named after the dataset folder
    got = c.get_run(ids["run_id"])
    assert got.info.status == "FINISHED"
    assert got.data.params["train.lr"] == "0.003" and got.data.params["plan.used"] == "2d"
    assert got.data.params["model.features"] == "[4, 8, 16]" and got.data.params["train.batch_size"] == "2"
    assert got.data.tags["run_dir"] == str(run.resolve())
    assert [m.step for m in c.get_metric_history(ids["run_id"], "train/loss")] == [2, 4, 6, 8]
    history = c.get_metric_history(ids["run_id"], "val/dice_mean")
    assert [(m.step, round(m.value, 6)) for m in history] == [(4 * r["epoch"], round(r["val_dice_mean"], 6)) for r in epochs(run)]
    assert got.data.metrics["best_val_dice"] == pytest.approx(max(r["val_dice_mean"] for r in epochs(run)))
    assert [a.path for a in c.list_artifacts(ids["run_id"], "model")] == ["model/best.pt"]
    assert [a.file_size for a in c.list_artifacts(ids["run_id"], "model")] == [(run / "checkpoints" / "best.pt").stat().st_size]


def test_wandb_offline_run_directory_holds_the_metrics(run: Path) -> None:
    wandb_id = json.loads((run / "trackers.json").read_text())["wandb"]["id"]
    (folder,) = (run / "wandb").glob(f"offline-run-*-{wandb_id}")
    record = (folder / f"run-{wandb_id}.wandb").read_bytes()  # the offline log, synced later by `wandb sync`
    for key in (b"train/loss", b"train/lr", b"val/dice_mean", b"val/dice_class_1", b"best_val_dice", b"blobs"):
        assert key in record, key
    assert list((folder / "files" / "media" / "images").glob("val/overlay_*.png"))


def test_a_failing_tracker_warns_once_and_training_completes(tmp_path: Path, data: Path, env: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from unetcli.tracking import backends

    calls = []

    def full_disk(self, values, step):
        calls.append(step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backends.TensorBoardBackend, "metrics", full_disk)
    out = tmp_path / "run"
    result = invoke("train", data, "--out", out, "--log-to", "tensorboard", *FLAGS)
    assert result.exit_code == 0, result.output
    warnings = [line for line in (out / "log.txt").read_text().splitlines() if "WARNING tracking" in line]
    assert len(warnings) == 1 and "tensorboard failed" in warnings[0] and "No space left" in warnings[0]
    assert calls == [2]  # dropped after its first failure
    assert len(epochs(out)) == 2 and (out / "checkpoints" / "best.pt").is_file()


def test_missing_tracker_package_is_one_error_line_with_the_install_command(tmp_path: Path, data: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # as if mlflow were not installed
    result = invoke("train", data, "--out", tmp_path / "run", "--log-to", "tensorboard,mlflow", *FLAGS)
    assert result.exit_code != 0
    (line,) = error_lines(result.output)
    assert "pip install 'unetcli[mlflow]'" in line
    assert not (tmp_path / "run").exists()
    result = invoke("train", data, "--out", tmp_path / "run", "--log-to", "tensorbord", *FLAGS)
    assert error_lines(result.output) == ["error: --log-to 'tensorbord' is not a tracker"]
    assert "did you mean 'tensorboard'" in result.output


def test_only_rank_zero_tracks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from unetcli.training import tracked

    monkeypatch.setattr(tracked, "is_main_process", lambda: False)
    trainer = SimpleNamespace(cfg=SimpleNamespace(train=SimpleNamespace(trackers=["tensorboard"])), out=tmp_path)
    with tracked.run_tracking(trainer) as tracking:
        assert not tracking.active
    assert list(tmp_path.iterdir()) == []


def test_eval_logs_a_metrics_table_to_mlflow(env: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    result = invoke("eval", data / "masks", data / "masks", "--out", out, "--log-to", "mlflow", "--jobs", "1")
    assert result.exit_code == 0, result.output
    ids = json.loads((out / "trackers.json").read_text())["mlflow"]
    c = client(env)
    got = c.get_run(ids["run_id"])
    assert got.data.metrics["dice_mean"] == 1.0 and got.data.metrics["dice_1"] == 1.0
    table = json.loads((Path(got.info.artifact_uri.removeprefix("file://")) / "metrics_table.json").read_text())
    assert table["columns"][:3] == ["case", "class", "label"] and len(table["data"]) == 6 * 2  # cases x classes
    assert {"path": "metrics_table.json", "type": "table"} in json.loads(got.data.tags["mlflow.loggedArtifacts"])


def test_resume_continues_the_same_tracked_runs(run: Path, env: Path) -> None:
    before = json.loads((run / "trackers.json").read_text())
    result = invoke("train", "--resume", run, "--epochs", "3")
    assert result.exit_code == 0, result.output
    after = json.loads((run / "trackers.json").read_text())
    assert after == before
    c = client(env)
    runs = c.search_runs([before["mlflow"]["experiment_id"]])
    assert [r.info.run_id for r in runs if r.info.run_name == "run"] == [before["mlflow"]["run_id"]]
    history = c.get_metric_history(before["mlflow"]["run_id"], "val/dice_mean")
    assert [m.step for m in history] == [4, 8, 12]
    assert c.get_run(before["mlflow"]["run_id"]).info.status == "FINISHED"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val/dice_mean")] == [4, 8, 12]
    assert len(list((run / "wandb").glob(f"offline-run-*-{before['wandb']['id']}"))) == 2  # offline: one folder per session, one id


def test_cv_tracks_one_run_per_fold_under_the_cross_validation(env: Path, data: Path) -> None:
    out = env / "cv"
    flags = ["--epochs", "1", "--set", "train.iterations_per_epoch=2", "--set", "model.features=[4,8,16]", "--set", "train.batch_size=2",
             "--precision", "fp32", "--device", "cpu", "--num-threads", "1", "--set", "train.num_workers=0"]
    result = invoke("cv", data, "--folds", "2", "--out", out, "--log-to", "mlflow,wandb,tensorboard", *flags)
    assert result.exit_code == 0, result.output
    parent = json.loads((out / "trackers.json").read_text())["mlflow"]
    c = client(env)
    assert c.get_run(parent["run_id"]).data.metrics["oof/dice_mean"] == pytest.approx(
        json.loads((out / "summary.json").read_text())["cross_validation"]["dice_with_95ci"]["mean"]["mean"])
    children = c.search_runs([parent["experiment_id"]], f"tags.mlflow.parentRunId = '{parent['run_id']}'")
    assert sorted(r.info.run_name for r in children) == ["cv-fold_0", "cv-fold_1"]
    assert all("val/dice_mean" in r.data.metrics for r in children)
    for k in range(2):
        fold_id = json.loads((out / f"fold_{k}" / "trackers.json").read_text())["wandb"]["id"]
        (log,) = (out / f"fold_{k}" / "wandb").glob(f"offline-run-*-{fold_id}/run-{fold_id}.wandb")
        assert b"val/dice_mean" in log.read_bytes()
    summary_id = json.loads((out / "trackers.json").read_text())["wandb"]["id"]
    (log,) = (out / "wandb").glob(f"offline-run-*-{summary_id}/run-{summary_id}.wandb")
    assert b"oof/dice_mean" in log.read_bytes()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert "oof/dice_mean" in events.Tags()["scalars"]
