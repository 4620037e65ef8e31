"""Continuing a run from its ``last.pt``: after a crash, a kill or Ctrl-C, or to train a finished run longer."""

from __future__ import annotations

import contextlib
import logging
import shlex
from pathlib import Path
from typing import Any

from unetcli.config import RunConfig, apply_overrides, config_from_dict
from unetcli.errors import CheckpointError, ConfigError, DataError, UnetCliError
from unetcli.runlock import RunLock
from unetcli.checkpoint import load_checkpoint
from unetcli.training.distributed import join_world
from unetcli.training.run_folder import remove_stale_temp_files
from unetcli.training.state import ResumePoint
from unetcli.training.trainer import EpochCallback, TrainResult, train

log = logging.getLogger("unetcli")

RESUME_KEYS = ("train.epochs", "train.time_limit", "train.device", "train.precision", "train.num_threads", "train.num_workers",
               "train.checkpoint_interval", "train.trackers", "train.track_interval", "train.track_image_epochs")
"""Config keys a resumed run may change: none of them alters the model, the data or the optimisation
(except --epochs and --time, whose schedule change is re-planned; and --precision, which changes the arithmetic)."""


def resume_training(run: Path, data_dir: Path | None = None, overrides: dict[str, Any] | None = None,
                    progress: bool = True, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Continue the run in ``run`` from ``checkpoints/last.pt`` (or train a finished run for more epochs).

    The config comes from the checkpoint; only :data:`RESUME_KEYS` may be overridden. ``data_dir``
    defaults to the folder the run was trained on; its cases must be those of the run's split.
    """
    run = Path(run)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    refused = sorted(set(overrides) - set(RESUME_KEYS))
    if refused:
        raise ConfigError(f"{', '.join(refused)} cannot be changed when resuming {run}",
                          hint="a resumed run keeps its config; only " + ", ".join(RESUME_KEYS) + " may change")
    if not run.is_dir():
        raise CheckpointError(f"{run}: run folder not found", hint="pass the folder an earlier `unet train` wrote (its --out)")
    world = join_world(overrides.get("train.device", "auto"))
    # Under torchrun rank 0 alone holds the lock and tidies the folder; every rank reads last.pt.
    with RunLock(run) if world.is_main else contextlib.nullcontext():
        if world.is_main:
            remove_stale_temp_files(run)
        point = load_resume_point(run)
        cfg = _resumed_config(point, run, overrides)
        data = Path(data_dir) if data_dir is not None else point.data_dir
        if data is None:
            raise DataError(f"{point.path}: does not record its data folder", hint="pass it: unet train DATA --resume RUN")
        if not data.is_dir():
            raise DataError(f"{data}: the run's data folder is not there any more",
                            hint=f"pass its new location: unet train DATA --resume {shlex.quote(str(run))}")
        return train(data, cfg, run, progress=progress, on_epoch=on_epoch, resume=point)


def load_resume_point(run: Path) -> ResumePoint:
    """``run/checkpoints/last.pt`` as a :class:`ResumePoint`, refusing files that cannot be resumed."""
    path = run / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; the run stopped before its first checkpoint",
                              hint=f"start it again: unet train DATA --out {shlex.quote(str(run))} --overwrite")
    state = load_checkpoint(path)
    if not isinstance(state.get("resume"), dict) or "rng" not in state:
        raise CheckpointError(f"{path}: holds no resume state (written by an older unetcli)",
                              hint="predict with it, or start a new run")
    return ResumePoint(path, state)


def _resumed_config(point: ResumePoint, run: Path, overrides: dict[str, Any]) -> RunConfig:
    try:
        cfg = config_from_dict(point.checkpoint["config"])
    except ConfigError as exc:
        raise CheckpointError(f"{point.path}: its config is not valid for unetcli here ({exc.message})",
                              hint="use the unetcli version that wrote it") from exc
    if "augmentation" not in point.checkpoint["config"].get("train", {}):
        cfg.train.augmentation = "basic"  # written before presets existed: keep the augmentation it trained with
    if "foreground_mask" not in point.checkpoint["config"].get("data", {}):
        cfg.data.foreground_mask = "nonzero"  # written before the robust mask: keep the normalisation it trained with
    planned, planned_time = cfg.train.epochs, cfg.train.time_limit
    cfg = apply_overrides(cfg, overrides)
    if planned_time is None and cfg.train.time_limit is not None:
        raise ConfigError(f"--time cannot be added to {run}: it was planned by iterations, and its schedule cannot become a "
                          "schedule over time half-way", hint="resume it with --epochs, or start a new run with --time")
    _check_more_to_do(point, run, cfg, planned, planned_time)
    return cfg


def _check_more_to_do(point: ResumePoint, run: Path, cfg: RunConfig, planned: int | None, planned_time: float | None) -> None:
    """Refuse to resume a run that has nothing left to train under its (possibly new) epochs and time budget."""
    t, quoted = cfg.train, shlex.quote(str(run))
    done, partial = int(point.checkpoint["epoch"]), int(point.checkpoint["resume"]["epoch_iteration"])
    spent = float(point.checkpoint["resume"].get("elapsed_seconds", 0.0))
    if t.time_limit is not None and point.checkpoint["resume"].get("finished") and t.time_limit == planned_time \
            and (t.epochs is None or t.epochs == planned):
        raise ConfigError(f"{run}: training already used its time budget ({spent:.0f} of {t.time_limit:.0f} s)",
                          hint=f"to train it longer, give a larger budget: unet train --resume {quoted} --time {2 * t.time_limit / 60:.0f}m")
    if t.time_limit is not None and t.time_limit <= spent:
        raise ConfigError(f"--time {t.time_limit:.0f}s is not more than the {spent:.0f} s {run} has already trained",
                          hint=f"pass a budget larger than {spent / 60:.1f} minutes")
    if t.epochs is None or t.epochs > done:
        return
    if t.epochs == planned == done and not partial:
        raise ConfigError(f"{run}: training already finished all {done} epochs",
                          hint=f"to train it longer, pass more epochs: unet train --resume {quoted} --epochs {2 * done}")
    raise ConfigError(f"--epochs {t.epochs} is not more than the {done} epoch(s) {run} has already trained",
                      hint=f"pass --epochs larger than {done}")


def run_progress(run_dir: Path) -> str:
    """``"finished"``, ``"partial"`` (a resumable ``last.pt``) or ``"none"`` (nothing usable)."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return "none"
    try:
        resume = load_checkpoint(last).get("resume")
    except UnetCliError as exc:
        log.warning("%s: %s; training that run again", last, exc.message)
        return "none"
    if not isinstance(resume, dict):
        return "none"
    return "finished" if resume.get("finished") else "partial"
