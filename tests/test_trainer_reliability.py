"""Training must never lose a run or its data: LR plans, RNG state, the run lock, numerical faults,
and what `unet train --resume` refuses."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import error_lines
from helpers import invoke_quiet as invoke
from unetcli.errors import OutputError
from unetcli.runlock import LOCK_NAME, RunLock, owner_info
from unetcli.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from unetcli.training.schedule import LRSchedule, lr_factor

FLAGS = ["--set", "model.features=[4,8,16]", "--set", "train.iterations_per_epoch=10", "--set", "train.warmup_iterations=5",
         "--batch-size", "2", "--lr", "0.01", "--precision", "fp32", "--device", "cpu", "--num-threads", "1"]


@pytest.fixture(scope="module")
def finished_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    result = invoke("train", str(data), "--out", str(out), "--epochs", "1", *FLAGS)
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------- learning-rate plan


@pytest.mark.parametrize("schedule", ["poly", "cosine", "constant"])
def test_plan_reproduces_the_schedule_and_resumes_it_exactly(schedule: str) -> None:
    plan = LRSchedule.new(schedule, 100, 10)
    assert [plan.factor(i) for i in range(101)] == [lr_factor(schedule, i, 100, 10) for i in range(101)]
    copy = LRSchedule.from_state_dict(plan.state_dict())
    copy.reschedule(37, 100)  # same total: nothing changes
    assert [copy.factor(i) for i in range(101)] == [plan.factor(i) for i in range(101)]


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
@pytest.mark.parametrize("at", [60, 100])
def test_extension_continues_downwards_from_the_current_rate(schedule: str, at: int) -> None:
    plan = LRSchedule.new(schedule, 100, 10)
    before = [plan.factor(i) for i in range(at)]
    plan.reschedule(at, 250)
    assert [plan.factor(i) for i in range(at)] == before
    after = [plan.factor(i) for i in range(at, 250)]
    assert after[0] == pytest.approx(before[-1]) and after[0] <= before[-1]
    assert all(b <= a for a, b in zip(after, after[1:]))
    assert plan.factor(250) == 0.0 and after[-1] < 0.05 * after[0]
    plan.reschedule(180, 300)  # a second extension, mid-way
    assert plan.factor(180) <= plan.factor(179) and plan.total == 300


def test_extension_during_warmup_keeps_warming_up() -> None:
    plan = LRSchedule.new("poly", 100, 50)
    plan.reschedule(20, 400)
    assert plan.factor(20) == lr_factor("poly", 20, 400, 50)  # as if planned with 400 from the start
    assert max(plan.factor(i) for i in range(400)) == 1.0


def test_shortening_decays_to_zero_at_the_new_end() -> None:
    plan = LRSchedule.new("cosine", 100, 0)
    plan.reschedule(30, 50)
    assert plan.factor(30) <= plan.factor(29) and plan.factor(50) == 0.0
    with pytest.raises(ValueError):
        plan.reschedule(60, 40)


# --------------------------------------------------------------------------- RNG state


def test_rng_state_survives_a_weights_only_checkpoint(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leave a cached Gaussian in numpy's state
    save_checkpoint(tmp_path / "c.pt", {"config": {}, "metadata": {}, "model": {}, "rng": capture_rng_state()})
    expected = (random.random(), np.random.normal(), np.random.randint(1000, size=3).tolist(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.normal(), np.random.randint(1000, size=3).tolist(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


# --------------------------------------------------------------------------- run lock


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(folder: Path, **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({**owner_info(), **fields}))
    return path


def test_lock_refuses_a_live_holder_and_names_its_pid(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
        with pytest.raises(OutputError, match=f"being written by another training \\(PID {os.getpid()}"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_takes_over_a_stale_lock_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, start_time=None)
    with caplog.at_level(logging.WARNING, logger="unetcli"):
        with RunLock(tmp_path):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"PID {pid}, which no longer runs" in caplog.text


def test_lock_treats_a_reused_pid_or_a_reboot_as_stale(tmp_path: Path) -> None:
    write_lock(tmp_path, start_time="1")  # our PID, but another process start time
    with RunLock(tmp_path):
        pass
    write_lock(tmp_path, boot_id="another-boot")
    with RunLock(tmp_path):
        pass


def test_lock_of_another_host_is_respected(tmp_path: Path) -> None:
    write_lock(tmp_path, host=socket.gethostname() + "-other", pid=12345)
    with pytest.raises(OutputError, match="PID 12345 on host") as info:
        RunLock(tmp_path).acquire()
    assert "delete" in info.value.hint


def test_lock_being_written_is_respected_but_an_old_broken_one_is_not(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(OutputError, match="just created"):
        RunLock(tmp_path).acquire()
    os.utime(tmp_path / LOCK_NAME, (0, 0))
    with RunLock(tmp_path):
        pass


def test_two_trainings_cannot_write_one_run_folder(data: Path, finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "busy"
    write_lock(run)  # held by this (live) process
    result = invoke("train", str(data), "--out", str(run), "--epochs", "1", *FLAGS)
    assert result.exit_code == 2
    assert error_lines(result.output) == [f"error: {run} is being written by another training (PID {os.getpid()}, "
                                          f"since {json.loads((run / LOCK_NAME).read_text())['since']})"]
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nothing written

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    write_lock(copy)
    result = invoke("train", "--resume", str(copy), "--epochs", "2")
    assert result.exit_code == 2 and f"(PID {os.getpid()}" in result.output


# --------------------------------------------------------------------------- numerical faults


def test_nan_loss_stops_with_the_iteration_and_keeps_the_last_good_checkpoint(data: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from unetcli.training import trainer

    real = trainer.iterate_batches

    def poisoned(sampler, start, stop, *args, **kwargs):
        for index, (images, labels) in zip(range(start, stop), real(sampler, start, stop, *args, **kwargs)):
            if index == 15:  # iteration 16 (epoch 2) sees a NaN input
                images = images.clone()
                images[0, 0, 0, 0] = float("nan")
            yield images, labels

    monkeypatch.setattr(trainer, "iterate_batches", poisoned)
    out = tmp_path / "nan"
    result = invoke("train", str(data), "--out", str(out), "--epochs", "3", *FLAGS, "--set", "train.checkpoint_interval=4")
    assert result.exit_code == 3, result.output
    (line,) = error_lines(result.output)
    assert "loss became NaN or infinite at iteration 16 (epoch 2)" in line
    assert f"last good checkpoint {out / 'checkpoints' / 'last.pt'} (epoch 1, iteration 12) is kept" in line
    assert "likely cause" in line and "--lr" in result.output
    assert "Traceback" not in result.output
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["iteration"] == 12
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert load_checkpoint(out / "checkpoints" / "best.pt")["iteration"] == 10
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert not (out / LOCK_NAME).exists()


def test_huge_learning_rate_is_reported_with_advice(data: Path, tmp_path: Path) -> None:
    result = invoke("train", str(data), "--out", str(tmp_path / "r"), "--epochs", "1", *FLAGS, "--lr", "1e30")
    assert result.exit_code == 3, result.output
    (line,) = error_lines(result.output)
    assert "NaN or infinite at iteration" in line and "no checkpoint had been saved yet" in line
    assert "learning rate too high" in line and "lower --lr" in result.output
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


def test_reduced_precision_fault_suggests_fp32() -> None:
    from unetcli.training.interrupts import numerical_fault

    error = numerical_fault(57, 10, 1e-3, "bf16", 3e-3, Path("runs/x"), (5, 50), True)
    assert "iteration 57 (epoch 6)" in error.message and "bf16" in error.message
    assert "--precision fp32" in error.hint and "unet train --resume runs/x --precision fp32" in error.hint
    assert error.exit_code == 3


# --------------------------------------------------------------------------- resume refusals and data checks


@pytest.mark.parametrize("args, named", [
    (["--lr", "0.1"], "--lr"),
    (["--seed", "5"], "--seed"),
    (["--set", "model.features=[8,16]"], "--set model.features"),
    (["--batch-size", "3"], "--batch-size"),
    (["--overwrite"], "--overwrite"),
])
def test_resume_refuses_config_changes(finished_run: Path, args: list[str], named: str) -> None:
    result = invoke("train", "--resume", str(finished_run), "--epochs", "3", *args)
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert named in line and "cannot be used with --resume" in line


def test_resume_errors_name_the_problem(data: Path, finished_run: Path, tmp_path: Path) -> None:
    result = invoke("train", "--resume", str(tmp_path / "nope"))
    assert result.exit_code == 2 and f"{tmp_path / 'nope'}: run folder not found" in result.output

    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    result = invoke("train", "--resume", str(empty))
    assert result.exit_code == 2 and "stopped before its first checkpoint" in result.output

    result = invoke("train", "--resume", str(finished_run), "--epochs", "1")
    assert result.exit_code == 2 and "already finished all 1 epochs" in result.output

    fewer = tmp_path / "fewer"
    shutil.copytree(data, fewer)
    (fewer / "images" / "case01.png").unlink()
    (fewer / "masks" / "case01.png").unlink()
    result = invoke("train", str(fewer), "--resume", str(finished_run), "--epochs", "2")
    assert result.exit_code == 2
    (line,) = error_lines(result.output)
    assert str(fewer) in line and "case(s) of the run missing: case01" in line

    result = invoke("train")
    assert result.exit_code == 2 and "missing the DATA folder" in result.output


def test_overwrite_replaces_the_old_runs_checkpoints(data: Path, finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "again"
    shutil.copytree(finished_run, run)
    refused = invoke("train", str(data), "--out", str(run), "--epochs", "1", *FLAGS)
    assert refused.exit_code == 2 and "--resume" in refused.output
    (run / "checkpoints" / "best.pt").write_bytes(b"stale")
    result = invoke("train", str(data), "--out", str(run), "--epochs", "1", *FLAGS, "--overwrite", "--set", "train.seed=1")
    assert result.exit_code == 0, result.output
    assert load_checkpoint(run / "checkpoints" / "best.pt")["config"]["train"]["seed"] == 1


def test_written_files_get_normal_permissions(finished_run: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt"):
        assert (finished_run / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert math.isfinite(load_checkpoint(finished_run / "checkpoints" / "last.pt")["best_dice"])


def test_a_failing_checkpoint_write_keeps_the_previous_checkpoint(data: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk while writing a checkpoint: a clear error, and the previous last.pt still loads."""
    from unetcli import checkpoint

    real, calls = torch.save, []

    def flaky_save(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(path)
        if len(calls) == 4:
            Path(path).write_bytes(b"half a checkpoint")
            raise RuntimeError("PytorchStreamWriter failed writing file data/3: file write failed")
        real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", flaky_save)
    out = tmp_path / "full"
    result = invoke("train", str(data), "--out", str(out), "--epochs", "2", *FLAGS, "--set", "train.checkpoint_interval=4")
    assert result.exit_code == 2, result.output
    (line,) = error_lines(result.output)
    assert f"{out / 'checkpoints' / 'last.pt'}: cannot write the checkpoint (PytorchStreamWriter failed" in line
    assert "the previous one, if any, is intact" in line
    # Saves: last.pt at 4 and 8, then at the epoch end best.pt (10) and last.pt (10), which fails.
    assert load_checkpoint(out / "checkpoints" / "last.pt")["iteration"] == 8
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp file left
    assert not (out / LOCK_NAME).exists()


def test_resume_removes_temp_files_a_killed_run_left_behind(finished_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "killed"
    shutil.copytree(finished_run, run)
    stale = [run / ".metrics.jsonl.k2j4h5g6.tmp.jsonl", run / "checkpoints" / ".last.pt.ab_cd123.tmp.pt"]
    for path in stale:
        path.write_bytes(b"half")
    (keep := run / ".notes.tmp").write_text("not ours")
    result = invoke("train", "--resume", str(run), "--epochs", "2")
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale) and keep.exists()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2


def test_quiet_run_still_writes_the_full_log_file(finished_run: Path) -> None:
    """`unet -q train` (how the fixture ran) quiets the terminal, not RUN/log.txt."""
    text = (finished_run / "log.txt").read_text()
    assert "training 2D U-Net" in text and "epoch 1/1" in text and "done in" in text
