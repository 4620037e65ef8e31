"""``unet cv --parallel N``: N folds at once, each in its own process (``unet cv ... --fold k``), one
GPU per process where there are GPUs; the scoring runs once every fold is done."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from unetcli.errors import ConfigError, TrainingError
from unetcli.config import RunConfig
from unetcli.workflows.cv.runner import CVOptions, CVResult, cv_folder_lock, prepare_cv, run_cv

log = logging.getLogger("unetcli")


def fold_commands(data: Path, out: Path, options: CVOptions, folds: list[int], parallel: int,
                  num_threads: int | None = None) -> list[tuple[list[str], dict[str, str]]]:
    """One ``unet cv DATA --out CV --fold k`` command per fold, with its environment: one GPU per
    process slot where there are GPUs, else the CPU threads shared out between slots. The training
    options need not be repeated: every fold process takes the config stored in ``CV/cv.json``."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = num_threads or max(1, (os.cpu_count() or 1) // parallel)
    base = [sys.executable, "-m", "unetcli", "-q", "cv", str(data), "--out", str(out), "--folds", str(options.folds),
            "--seed", str(options.seed)]
    base += ["--group-by", options.group_by] if options.group_by else []
    base += ["--splits", str(options.splits_file)] if options.splits_file else []
    commands = []
    for slot, k in enumerate(folds):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % parallel % gpus)
        commands.append(([*base, "--fold", str(k), "--no-scoring", *([] if gpus else ["--num-threads", str(threads)])], env))
    return commands


def run_folds_in_parallel(data: Path, out: Path, options: CVOptions, folds: list[int], parallel: int,
                          num_threads: int | None = None) -> None:
    """Run the folds ``parallel`` at a time; a failed fold stops the others and is reported."""
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    pending = fold_commands(data, out, options, folds, parallel, num_threads)
    running: list[tuple[int, subprocess.Popen]] = []
    failed: list[str] = []
    while (pending or running) and not failed:
        while pending and len(running) < parallel:
            command, env = pending.pop(0)
            k = int(command[command.index("--fold") + 1])
            log.info("fold %d: started (%s)", k, f"GPU {env['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in env else "CPU")
            running.append((k, subprocess.Popen(command, env=env)))
        time.sleep(0.5)
        for k, proc in list(running):
            if proc.poll() is not None:
                running.remove((k, proc))
                if proc.returncode != 0:
                    failed.append(f"fold {k} exited with {proc.returncode}")
    for _, proc in running:  # a fold failed: the others save a checkpoint on SIGTERM and stop
        proc.terminate()
    for _, proc in running:
        proc.wait()
    if failed:
        raise TrainingError(f"{'; '.join(failed)}; the other folds were stopped (their checkpoints are kept)",
                            hint="see the fold's error above, fix it, and rerun the same command to continue")


def run_cv_in_parallel(data: Path, cfg: RunConfig, out: Path, options: CVOptions, explicit: set[str], overwrite: bool,
                       parallel: int, num_threads: int | None, progress: bool, run_files: dict[str, str]) -> CVResult:
    """``unet cv --parallel N``: the folds in N processes, then the scoring here; this process holds
    the folder's lock throughout (its fold processes know it as their parent)."""
    with cv_folder_lock(out, options, overwrite):
        todo = prepare_cv(data, cfg, out, options, explicit, overwrite)
        run_folds_in_parallel(data, out, options, todo, parallel, num_threads)
        # overwrite=False: the folds are the ones just trained
        return run_cv(data, cfg, out, options, explicit, overwrite=False, progress=progress, run_files=run_files)
