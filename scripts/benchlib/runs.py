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

import yaml


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
                     extra: Sequence[object] = (), quiet: bool = False, reuse: bool = False) -> float:
    """``unet train`` for ``iterations`` (= epochs x ``per_epoch``) on all of DATA (no validation
    split), replacing ``run_dir``; its training wall time.

    With ``reuse`` a run folder left by the same arm is kept: a finished run is not trained again
    and a stopped one (killed, or the machine went away) continues where its last checkpoint left
    it (``unet train --resume``), so a long arm can be trained over several sittings."""
    epochs = iterations // per_epoch
    records = epoch_records(run_dir)
    if reuse and records and (run_dir / "checkpoints" / "last.pt").is_file():
        check_same_arm(run_dir, epochs, seed)
        if records[-1]["epoch"] < epochs:
            print(f"continuing the stopped run {run_dir} after epoch {records[-1]['epoch']} of {epochs}", flush=True)
            unet("train", "--resume", run_dir, "--num-threads", threads, quiet=quiet)
        else:
            print(f"reusing the finished run {run_dir}", flush=True)
        return epoch_records(run_dir)[-1]["elapsed_seconds"]
    return unet("train", data, "--out", run_dir, "--overwrite", "--epochs", epochs, "--seed", seed,
                "--num-threads", threads, "--set", f"train.iterations_per_epoch={per_epoch}",
                "--set", "data.val_fraction=0", *extra, quiet=quiet)


def check_same_arm(run_dir: Path, epochs: int, seed: int) -> None:
    """Exit with a message when ``run_dir`` was started with another number of epochs or seed,
    so that a reused folder never stands in for a different arm."""
    train = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]
    if (train["epochs"], train["seed"]) != (epochs, seed):
        sys.exit(f"{run_dir} was trained for {train['epochs']} epochs with seed {train['seed']}, not {epochs} "
                 f"with seed {seed}: remove it or drop --reuse to train it again")


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


def record_result(path: Path, name: str, entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Add ``entry`` under ``name`` to the JSON results file ``path`` and return all its results.

    Re-read just before writing, and written atomically: several benchmark processes (one thread
    each) may share one results file, and each must keep what the others added meanwhile.
    """
    results: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}
    results[name] = entry
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)
    return results
