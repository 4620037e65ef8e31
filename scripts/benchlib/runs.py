"""``unet`` as a user runs it, from the benchmark scripts: subprocesses that train for a number of
iterations, predict and score with ``unet eval``. Every value comes in as a parameter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def run(cmd: Sequence[object], env: dict[str, str] | None = None, quiet: bool = False) -> float:
    """Run a command, echoed as ``+ cmd``; its wall time in seconds, or exit on failure.
    ``quiet`` drops the command's standard output (its errors still show)."""
    cmd = [str(c) for c in cmd]
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL if quiet else None)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start


def unet_cmd(*args: object) -> list[str]:
    """The command line of ``unet -q ARGS`` with this interpreter."""
    return [sys.executable, "-m", "unetcli", "-q", *[str(a) for a in args]]


def unet(*args: object, quiet: bool = True) -> float:
    """Run ``unet -q ARGS``; its wall time."""
    return run(unet_cmd(*args), quiet=quiet)


def train_iterations(data: Path, run_dir: Path, iterations: int, per_epoch: int, *, seed: int, threads: int,
                     extra: Sequence[object] = (), quiet: bool = False) -> float:
    """``unet train`` for ``iterations`` (= epochs x ``per_epoch``) on all of DATA (no validation
    split), replacing ``run_dir``; its wall time."""
    return unet("train", data, "--out", run_dir, "--overwrite", "--epochs", iterations // per_epoch, "--seed", seed,
                "--num-threads", threads, "--set", f"train.iterations_per_epoch={per_epoch}",
                "--set", "data.val_fraction=0", *extra, quiet=quiet)


def epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl`` (one record per epoch); empty if there is none yet."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def seconds_per_iteration(run_dir: Path, iterations: int) -> float:
    """Training seconds per iteration, from the epoch times the run logged (validation excluded)."""
    return round(sum(r["epoch_seconds"] for r in epoch_records(run_dir)) / iterations, 3)


def eval_summary(pred: Path, truth: Path, out: Path, *eval_args: object, quiet: bool = False) -> dict[str, Any]:
    """Score a prediction folder with ``unet eval``; its ``summary.json``."""
    unet("eval", pred, truth, "--out", out, "--overwrite", *eval_args, quiet=quiet)
    return json.loads((out / "summary.json").read_text())


def dice_by_class(summary: dict[str, Any]) -> dict[str, float]:
    """Mean Dice per class (or region) of a ``unet eval`` summary, plus ``mean``: the foreground mean."""
    dice = {name: entry["dice"]["mean"] for name, entry in summary["classes"].items()}
    dice["mean"] = summary["foreground_mean"]["dice"]
    return dice
