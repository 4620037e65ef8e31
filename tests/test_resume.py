"""Exact resume: a run killed at a random moment (SIGKILL), interrupted (SIGINT/SIGTERM) or extended
continues from its last checkpoint and ends with the same weights as an uninterrupted run.

Design: one uninterrupted reference run (in this process, through the CLI). The interrupted runs
use the same seed, data and flags: a real ``python -m unetcli`` subprocess is killed with SIGKILL
at a seeded random moment after its first checkpoint exists (or sent SIGINT), then resumed with
``unet train --resume RUN``; every tensor of the final model and optimiser state must be
bit-identical (torch.equal) to the reference. CPU, fp32 and one thread keep the arithmetic
deterministic; ``train.checkpoint_interval=3`` puts checkpoints mid-epoch, so most kills land
between epoch boundaries.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import invoke_quiet as invoke
from unetcli.training.schedule import LRSchedule

EPOCHS = 4
ITERATIONS = 10
FLAGS = ["--set", "model.features=[4,8,16]", "--set", f"train.iterations_per_epoch={ITERATIONS}",
         "--set", "train.checkpoint_interval=3", "--set", "train.warmup_iterations=5", "--batch-size", "2",
         "--lr", "0.01", "--precision", "fp32", "--device", "cpu", "--num-threads", "1", "--seed", "3"]


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """The uninterrupted run and how long its training took."""
    out = tmp_path_factory.mktemp("reference") / "run"
    started = time.perf_counter()
    result = invoke("train", str(data), "--out", str(out), "--epochs", str(EPOCHS), *FLAGS)
    assert result.exit_code == 0, result.output
    return out, time.perf_counter() - started


def spawn(data: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "unetcli", "-q", "train", str(data), "--out", str(out),
                             "--epochs", str(EPOCHS), *FLAGS],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_checkpoint(proc: subprocess.Popen, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (out / "checkpoints" / "last.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)


def tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else []
    found: dict[str, torch.Tensor] = {}
    for key, item in items:
        found.update(tensors(item, f"{prefix}/{key}"))
    return found


def assert_same_final_state(run: Path, reference: Path) -> None:
    a = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (b["epoch"], b["iteration"]) == (a["epoch"], a["iteration"]) == (EPOCHS, EPOCHS * ITERATIONS)
    for part in ("model", "optimizer"):
        ta, tb = tensors(a[part]), tensors(b[part])
        assert ta.keys() == tb.keys() and ta, part
        different = [k for k in ta if not torch.equal(ta[k], tb[k])]
        assert not different, f"{part} differs in {different[:5]}"
    assert a["optimizer"]["param_groups"] == b["optimizer"]["param_groups"]
    assert a["sampler"] == b["sampler"]
    # Same history: one line per epoch, no duplicates, the same losses and scores.
    ra = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rb] == list(range(1, EPOCHS + 1))
    for x, y in zip(ra, rb):
        for key in ("iteration", "train_loss", "lr", "val_dice_mean"):
            assert x[key] == y[key], (x["epoch"], key)
    assert not (run / ".lock").exists()


def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(data: Path, reference: tuple[Path, float],
                                                                  tmp_path: Path) -> None:
    ref, seconds = reference
    rng = random.Random(20240611)
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        proc = spawn(data, out)
        wait_for_checkpoint(proc, out)
        # A seeded random moment within the rest of the run (later attempts: sooner).
        time.sleep(rng.uniform(0.0, 0.6 * seconds) / (1 + 3 * attempt))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        killed_at = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["iteration"]
        if proc.returncode == -signal.SIGKILL and killed_at < EPOCHS * ITERATIONS:
            break
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 0 < killed_at < EPOCHS * ITERATIONS, "the run was killed only after training had finished"
    print(f"SIGKILL after attempt {attempt + 1}; last checkpoint at iteration {killed_at} of {EPOCHS * ITERATIONS}")
    assert (out / ".lock").exists()  # left behind by the killed process: must be taken over

    result = invoke("train", "--resume", str(out))
    assert result.exit_code == 0, result.output
    assert "no longer runs" in " ".join(result.output.split())  # the stale lock was taken over, with a warning (lines wrap by path length)
    assert_same_final_state(out, ref)
    assert not list(out.rglob(".*.tmp*")), "a temp file was left behind"


def test_sigint_saves_exits_130_and_resumes_bit_identical(data: Path, reference: tuple[Path, float], tmp_path: Path) -> None:
    ref, _ = reference
    out = tmp_path / "interrupted"
    proc = spawn(data, out)
    wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGINT arrived (very slow machine?)")
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "interrupted by SIGINT" in lines[0], stderr
    assert f"resume with: unet train --resume {out}" in lines[0]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] < EPOCHS * ITERATIONS
    assert not (out / ".lock").exists()  # released on the way out

    result = invoke("train", "--resume", str(out))
    assert result.exit_code == 0, result.output
    assert_same_final_state(out, ref)


def test_extending_a_finished_run_replans_the_schedule_downwards(reference: tuple[Path, float], tmp_path: Path) -> None:
    run = tmp_path / "extended"
    shutil.copytree(reference[0], run)
    before = torch.load(run / "checkpoints" / "last.pt", weights_only=True)

    again = invoke("train", "--resume", str(run))
    assert again.exit_code == 2 and "already finished all 4 epochs" in again.output and "--epochs" in again.output

    result = invoke("train", "--resume", str(run), "--epochs", str(2 * EPOCHS))
    assert result.exit_code == 0, result.output
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert (after["epoch"], after["iteration"]) == (2 * EPOCHS, 2 * EPOCHS * ITERATIONS)
    assert after["config"]["train"]["epochs"] == 2 * EPOCHS

    old, new = LRSchedule.from_state_dict(before["scheduler"]), LRSchedule.from_state_dict(after["scheduler"])
    end = EPOCHS * ITERATIONS
    assert [new.factor(i) for i in range(end)] == [old.factor(i) for i in range(end)]  # the past is unchanged
    last_before = old.factor(end - 1)
    rates = [new.factor(i) for i in range(end, 2 * end)]
    assert 0 < rates[0] <= last_before  # no jump back up
    assert all(b <= a for a, b in zip(rates, rates[1:]))  # decays ...
    assert rates[-1] < 0.1 * rates[0] and new.factor(2 * end) == 0.0  # ... to ~0 at the new end

    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 2 * EPOCHS + 1))
    lrs = [r["lr"] for r in lines]
    assert all(b <= a for a, b in zip(lrs[EPOCHS - 1:], lrs[EPOCHS:]))
    # The weights moved on from where the finished run stood.
    assert any(not torch.equal(after["model"][k], v) for k, v in before["model"].items() if v.is_floating_point())


def signal_at(monkeypatch: pytest.MonkeyPatch, signum: int, position: int) -> None:
    """Make this process receive ``signum`` while the batch at ``position`` is handed to the loop."""
    from unetcli.training import trainer

    real = trainer.iterate_batches

    def batches(sampler, start, stop, *args, **kwargs):
        for index, batch in zip(range(start, stop), real(sampler, start, stop, *args, **kwargs)):
            if index == position:
                os.kill(os.getpid(), signum)
            yield batch

    monkeypatch.setattr(trainer, "iterate_batches", batches)


@pytest.mark.parametrize("position, where", [(13, "in epoch 2 after iteration 14"),
                                             (19, "in epoch 2 after iteration 20")])
def test_sigterm_saves_exits_143_and_resumes_bit_identical(data: Path, reference: tuple[Path, float], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch, position: int, where: str) -> None:
    """Mid-epoch, and after the epoch's last step but before its validation (resume validates first)."""
    out = tmp_path / "terminated"
    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        signal_at(patch, signal.SIGTERM, position)
        result = invoke("train", str(data), "--out", str(out), "--epochs", str(EPOCHS), *FLAGS)
    assert signal.getsignal(signal.SIGTERM) is handler  # the loop's handler is gone again
    assert result.exit_code == 143, result.output
    assert f"interrupted by SIGTERM {where}" in result.output
    assert f"resume with: unet train --resume {out}" in result.output
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["iteration"] == position + 1 and state["resume"]["epoch_iteration"] == position + 1 - ITERATIONS
    assert [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]

    resumed = invoke("train", str(data), "--resume", str(out))  # DATA may be given again
    assert resumed.exit_code == 0, resumed.output
    assert_same_final_state(out, reference[0])
