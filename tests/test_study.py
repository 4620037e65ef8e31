"""`unet compare`: the skip-connection study end to end on tiny generated PNG data.

One study (concat and none, 2 seeds) is run once for the module; the other tests read it, rerun
it (everything skipped), change its plan (refused), and repeat its seed-0 runs in a second study
that is interrupted in the middle of a run and then resumed: every per-case number must be
identical to the first study's (same seed -> same numbers on CPU, resume included).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest

import unetcli.workflows.compare.runner as study_mod
from helpers import invoke, make_blobs
from unetcli.errors import Interrupted

TINY = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=3", "--epochs", "2",
        "--set", "train.warmup_iterations=2", "--set", "train.batch_size=4", "--set", "train.lr=0.01",
        "--precision", "fp32", "--device", "cpu", "--num-threads", "1"]
RUNS = ["concat_seed0", "concat_seed1", "none_seed0", "none_seed1"]


@pytest.fixture(scope="module")
def study_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("study_data")
    make_blobs(root / "train", n=6, seed=0)
    make_blobs(root / "test", n=3, seed=1)
    return root


@pytest.fixture(scope="module")
def study(study_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study") / "study"
    result = invoke("compare", str(study_data), "--skip", "concat,none", "--seeds", "2", "--out", str(out), *TINY)
    assert result.exit_code == 0, result.output
    return out


def test_report_has_table_boundary_metrics_charts_and_overlays(study: Path) -> None:
    report = (study / "report.md").read_text()
    assert "| variant | parameters | s / epoch | Dice | HD95 | NSD |" in report
    assert "| concat (ref) |" in report and "| none |" in report
    assert "## Paired tests against concat" in report and "Δ HD95" in report and "Δ NSD" in report
    assert "## Per seed" in report and "| none | 1 |" in report
    for name in ("comparison.png", "curves.png", "comparison.csv"):
        assert (study / name).stat().st_size > 0, name
        if name.endswith(".png"):
            assert f"]({name})" in report
    overlays = sorted((study / "overlays").glob("*.png"))
    assert overlays and len(overlays) <= 3
    for path in overlays:
        assert f"](overlays/{path.name})" in report

    state = json.loads((study / "study.json").read_text())
    assert sorted(state["runs"]) == RUNS
    assert all(r["status"] == "finished" and r["parameters"] > 0 for r in state["runs"].values())
    assert state["runs"]["concat_seed0"]["parameters"] > state["runs"]["none_seed0"]["parameters"]
    results = state["results"]
    assert results["reference"] == "concat"
    for variant in ("concat", "none"):
        for metric in ("dice", "hd95", "nsd"):
            assert metric in results["comparison"]["stats"][variant]["foreground"]
    assert "p_value" in results["comparison"]["stats"]["none"]["foreground"]["hd95"]

    # The seed statistics are the mean over seeds of each run's mean over the held-out cases.
    import numpy as np

    from unetcli.workflows.compare.report import load_eval

    truth = Path(state["plan"]["test_labels"])
    per_seed = [np.nanmean(load_eval(study / "runs" / f"none_seed{s}", truth).foreground_values("dice")) for s in (0, 1)]
    assert results["variants"]["none"]["seed_mean_std"]["dice"][0] == pytest.approx(np.mean(per_seed))
    assert results["variants"]["none"]["seed_mean_std"]["dice"][1] == pytest.approx(np.std(per_seed, ddof=1))


def test_every_run_uses_the_same_split_and_its_own_seed_and_variant(study: Path) -> None:
    import yaml

    splits = {run: (study / "runs" / run / "split.json").read_text() for run in RUNS}
    assert len(set(splits.values())) == 1
    configs = {run: yaml.safe_load((study / "runs" / run / "config.yaml").read_text()) for run in RUNS}
    assert {run: (c["model"]["skip"], c["train"]["seed"], c["data"]["split_seed"]) for run, c in configs.items()} == {
        "concat_seed0": ("concat", 0, 0), "concat_seed1": ("concat", 1, 0),
        "none_seed0": ("none", 0, 0), "none_seed1": ("none", 1, 0)}
    for run in RUNS:
        assert (study / "runs" / run / "eval" / "summary.json").is_file()
        assert len(list((study / "runs" / run / "predictions").glob("*.png"))) == 3


def test_rerun_skips_finished_runs(study: Path, study_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished run was trained or predicted again")

    for name in ("train", "resume_training", "predict"):
        monkeypatch.setattr(study_mod, name, refuse)
    before = {run: (study / "runs" / run / "checkpoints" / "best.pt").stat().st_mtime_ns for run in RUNS}
    result = invoke("compare", str(study_data), "--skip", "concat,none", "--seeds", "2", "--out", str(study), *TINY)
    assert result.exit_code == 0, result.output
    assert result.output.count("skipping") == 4
    assert "0 run(s) trained, 4 finished earlier" in result.output
    assert before == {run: (study / "runs" / run / "checkpoints" / "best.pt").stat().st_mtime_ns for run in RUNS}


def test_a_different_plan_in_the_same_folder_is_refused(study: Path, study_data: Path) -> None:
    result = invoke("compare", str(study_data), "--skip", "concat,none", "--seeds", "1", "--out", str(study), *TINY)
    assert result.exit_code == 2
    assert "holds a study with another plan (differs in: seeds)" in result.output
    assert "--overwrite" in result.output


def test_interrupted_study_resumes_and_reproduces_the_same_numbers(study: Path, study_data: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seeds -> the same per-case numbers as the first study, although the `none` run is
    stopped after its first epoch and continued from its checkpoint by the second invocation."""
    out = tmp_path / "again"
    real_train = study_mod.train
    real_resume = study_mod.resume_training

    def train_then_stop(data_dir: Path, cfg: Any, run_dir: Path, **kwargs: Any) -> Any:
        if cfg.model.skip == "none":
            def stop(record: dict[str, Any]) -> None:
                raise Interrupted("stopped for the test", signal.SIGINT)

            kwargs["on_epoch"] = stop
        return real_train(data_dir, cfg, run_dir, **kwargs)

    monkeypatch.setattr(study_mod, "train", train_then_stop)
    args = ["compare", str(study_data), "--skip", "concat,none", "--seeds", "1", "--out", str(out), *TINY]
    result = invoke(*args)
    assert result.exit_code == 130, result.output
    assert "study interrupted in run 2/2 (none_seed0); 1 run(s) finished" in " ".join(result.output.split())
    assert "rerun the same `unet compare` command" in " ".join(result.output.split())
    assert (out / "runs" / "concat_seed0" / "eval" / "summary.json").is_file()
    assert not (out / "runs" / "none_seed0" / "eval").exists()
    assert json.loads((out / "study.json").read_text())["runs"]["none_seed0"]["status"] == "running"

    calls: list[str] = []
    monkeypatch.setattr(study_mod, "train", lambda *a, **k: calls.append("train") or real_train(*a, **k))
    monkeypatch.setattr(study_mod, "resume_training", lambda *a, **k: calls.append("resume") or real_resume(*a, **k))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert calls == ["resume"]  # concat was finished; none continued from its epoch-1 checkpoint
    assert "1 run(s) trained, 1 finished earlier" in result.output
    for run in ("concat_seed0", "none_seed0"):
        first = (study / "runs" / run / "eval" / "metrics.csv").read_text()
        again = (out / "runs" / run / "eval" / "metrics.csv").read_text()
        assert first == again, run


@pytest.mark.parametrize("skip, message", [
    ("concat,residual", "--skip: unknown variant(s) 'residual'; choose from concat, add, none, valid-crop"),
    ("concat", "--skip 'concat': a comparison needs at least two variants"),
])
def test_bad_variant_list_is_one_clear_error(study_data: Path, tmp_path: Path, skip: str, message: str) -> None:
    result = invoke("compare", str(study_data), "--skip", skip, "--out", str(tmp_path / "s"))
    assert result.exit_code == 2
    assert f"error: {message}" in " ".join(result.output.split())
    assert "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_data_without_held_out_cases_needs_test(tmp_path: Path) -> None:
    make_blobs(tmp_path / "only", n=4)
    result = invoke("compare", str(tmp_path / "only"), "--skip", "concat,none", "--out", str(tmp_path / "s"))
    assert result.exit_code == 2
    assert "no held-out cases found" in result.output and "--test" in result.output
