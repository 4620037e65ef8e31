"""Training for a time budget (``--time``): the schedule runs over elapsed time, the run ends inside
its budget with every usual output, and a resumed run continues the same budget."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import error_lines, invoke, make_blobs
from unetcli.config import parse_duration
from unetcli.errors import ConfigError
from unetcli.training.schedule import LRSchedule, decay
from unetcli.workflows.cv.runner import fold_time_budget

TINY = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=4", "--batch-size", "2",
        "--precision", "fp32", "--device", "cpu", "--num-threads", "1", "--set", "train.num_workers=0"]


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("45m", 2700), ("2h", 7200), ("1h30m", 5400), ("1.5h", 5400)])
def test_durations_need_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "10x", "0m", "m", "5m 3"])
def test_a_duration_without_a_unit_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="--time"):
        parse_duration(text)


def test_a_timed_schedule_warms_up_then_decays_to_zero_at_the_budget() -> None:
    plan = LRSchedule.new("poly", total=10**9, warmup=50, seconds=600.0)
    assert plan.factor(0, 0.0) == pytest.approx(1 / 50)
    assert plan.factor(49, 5.0) == pytest.approx((1 - 5 / 600) ** 0.9)  # warm-up steps done
    assert plan.factor(3, 20.0) == pytest.approx(1.0 * (1 - 20 / 600) ** 0.9)  # 1/30 of the budget: warm-up over too
    assert plan.factor(10_000, 300.0) == pytest.approx(0.5 ** 0.9)
    assert plan.factor(10_000, 600.0) == 0.0
    assert LRSchedule.from_state_dict(plan.state_dict()) == plan


def test_a_longer_budget_on_resume_continues_from_the_current_rate() -> None:
    plan = LRSchedule.new("cosine", total=10**9, warmup=0, seconds=100.0)
    before = plan.factor(500, 60.0)
    plan.reschedule_timed(501, 60.0, 10**9, 200.0)
    assert plan.factor(501, 60.0) == pytest.approx(before)  # no jump back up
    assert plan.factor(900, 130.0) < before and plan.factor(2000, 200.0) == pytest.approx(0.0, abs=1e-12)


def test_with_epochs_beside_the_time_the_decay_ends_with_whichever_budget_ends_first() -> None:
    plan = LRSchedule.new("poly", total=200, warmup=0, seconds=600.0)
    assert plan.factor(100, 30.0) == pytest.approx(0.5 ** 0.9)  # a fast machine: the iterations lead
    assert plan.factor(20, 300.0) == pytest.approx(0.5 ** 0.9)  # a slow one: the time leads
    assert plan.factor(199, 100.0) < 0.01 and plan.factor(10, 599.0) < 0.01


def test_plans_saved_before_time_budgets_still_count_iterations() -> None:
    old = {"schedule": "poly", "segments": [{"start": 0, "end": 100, "start_factor": 1.0, "warmup": 10}]}
    plan = LRSchedule.from_state_dict(old)
    assert not plan.timed and plan.factor(55) == pytest.approx((1 - 45 / 90) ** 0.9)


def test_cv_time_is_shared_out_over_the_folds() -> None:
    assert fold_time_budget(3600.0, None, 5, None, None) == 720.0
    assert fold_time_budget(3600.0, None, 5, None, 2) == 1200.0  # 3 slots of 2 folds side by side
    assert fold_time_budget(3600.0, None, 5, 2, None) == 720.0  # one fold of five: its share
    assert fold_time_budget(3600.0, None, 4, None, None, configurations=2) == 450.0
    assert fold_time_budget(None, 600.0, 5, None, None) == 600.0
    with pytest.raises(ConfigError):
        fold_time_budget(3600.0, 600.0, 5, None, None)


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    tmp = tmp_path_factory.mktemp("timed")
    data = make_blobs(tmp / "data", n=6)
    out = tmp / "run"
    result = invoke("train", data, "--out", out, "--time", "10s", *TINY)
    return data, out, result.output


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_timed_run_ends_inside_its_budget_with_a_complete_run_folder(timed_run: tuple[Path, Path, str]) -> None:
    _, out, output = timed_run
    assert "best validation Dice" in output, output
    for name in ("config.yaml", "split.json", "metrics.jsonl", "curves.png", "log.txt", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).is_file(), name
    rows = records(out)
    assert len(rows) >= 2, "a few epochs fit in the budget"
    assert 6.0 <= rows[-1]["elapsed_seconds"] <= 11.0, rows[-1]  # stopped near, and not past, the budget (10 %)
    # The rate follows the clock: the last step's rate has decayed at least as far as the poly decay
    # 2 s before the run ended (the validation and checkpoint after that step take the rest; the
    # schedule runs ahead by the epoch's overhead, so there is no matching lower bound).
    end = rows[-1]["elapsed_seconds"]
    assert 0 < rows[-1]["lr"] <= 3e-3 * decay("poly", (end - 2) / 10), rows[-1]
    decaying = [r["lr"] for r in rows if r["elapsed_seconds"] >= 1.0]  # the warm-up ends within 1/30 of the budget
    assert len(decaying) >= 2 and decaying == sorted(decaying, reverse=True), "the rate never rises after the warm-up"
    assert all(r["seconds_per_iteration"] > 0 and r["epoch_iterations"] >= 1 for r in rows)
    assert "time budget:" in (out / "log.txt").read_text()
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["resume"]["finished"] and state["iteration"] == rows[-1]["iteration"]
    assert state["config"]["train"]["epochs"] is None and state["config"]["train"]["time_limit"] == 10.0


def test_a_spent_budget_is_not_resumed_but_a_larger_one_continues_it(timed_run: tuple[Path, Path, str]) -> None:
    _, out, _ = timed_run
    again = invoke("train", "--resume", out)
    assert again.exit_code == 2 and "already used its time budget" in error_lines(again.output)[0], again.output
    before = records(out)[-1]
    longer = invoke("train", "--resume", out, "--time", "16s")
    assert longer.exit_code == 0, longer.output
    rows = records(out)
    assert rows[-1]["iteration"] > before["iteration"]
    assert 10.0 <= rows[-1]["elapsed_seconds"] <= 17.6, rows[-1]  # the total budget, not 16 s more


def test_time_and_epochs_together_stop_at_whichever_comes_first(tmp_path: Path, timed_run: tuple[Path, Path, str]) -> None:
    data, _, _ = timed_run
    result = invoke("train", data, "--out", tmp_path / "r", "--time", "1h", "--epochs", "2", *TINY)
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in records(tmp_path / "r")] == [1, 2]


def test_a_bad_duration_is_one_error_line(tmp_path: Path) -> None:
    result = invoke("train", tmp_path, "--time", "30")
    assert result.exit_code == 2
    assert error_lines(result.output) == ["error: --time '30' is not a duration"], result.output

