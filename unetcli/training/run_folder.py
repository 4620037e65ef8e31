"""The run folder: claiming it (lock, refusing to mix runs), its log file, its metrics file and
cleaning up after a killed run. Under ``torchrun`` only rank 0 writes (:func:`is_main_process`)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from unetcli.atomic import atomic_write_text, output_folder
from unetcli.errors import CheckpointError, ConfigError, DataError, ModelError, OutputError
from unetcli.runlock import LOCK_NAME, RunLock
from unetcli.training.curves import plot_curves

log = logging.getLogger("unetcli")


def is_main_process() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: run folder already exists and is not empty",
                          hint=f"choose another --out, pass --overwrite, or continue that run: unet train --resume {shlex.quote(str(out))}")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    if overwrite:
        # A new run must not leave the old run's checkpoints behind (predict would pick up its best.pt).
        for name in ("best.pt", "last.pt"):
            (out / "checkpoints" / name).unlink(missing_ok=True)


@contextlib.contextmanager
def claim_run_dir(out: Path, overwrite: bool) -> Iterator[None]:
    """Create ``out``, hold its lock for the block, and refuse to mix runs in one folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder", hint="choose another --out")
    created = not out.exists()
    with output_folder(out, "run folder", hint="choose a writable --out"), RunLock(out):
        try:
            _prepare_run_dir(out, overwrite)
        except PermissionError as exc:
            raise OutputError(f"{out}: cannot write into the run folder ({exc.strerror})", hint="choose a writable --out") from exc
        try:
            yield
        except (ConfigError, DataError, ModelError, CheckpointError, OutputError):
            if created and not (out / "checkpoints" / "last.pt").exists():
                # Refused or failed before the first checkpoint: leave no half-made folder that a corrected
                # rerun would find "not empty" (and whose hint, --resume, could not work either).
                shutil.rmtree(out, ignore_errors=True)
            raise


@contextlib.contextmanager
def run_log_file(out: Path) -> Iterator[None]:
    """Copy the ``unetcli`` log into ``out/log.txt`` for the block. The CLI keeps the logger at INFO and
    quiets only its terminal handler, so the file holds the full log even with ``--quiet``."""
    if not is_main_process():
        yield
        return
    handler = logging.FileHandler(out / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        handler.close()


def write_metrics(out: Path, history: list[dict[str, Any]], curves: bool = True) -> None:
    """``metrics.jsonl`` (one record per epoch) and, with ``curves``, ``curves.png``."""
    if not is_main_process():
        return
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    if curves:
        plot_curves(history, out / "curves.png")


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$")
"""Temporary files of :func:`unetcli.atomic.atomic_path` (``.NAME.XXXXXXXX.tmp.SUFFIX``)."""


def remove_stale_temp_files(run: Path) -> None:
    """Half-written files of a killed run (its lock is ours now, so nobody is writing them)."""
    for folder in (run, run / "checkpoints"):
        for path in folder.glob(".*.tmp*") if folder.is_dir() else []:
            if _TEMP_NAME.match(path.name) and path.is_file():
                log.info("removing %s, left half-written by the interrupted run", path)
                path.unlink(missing_ok=True)
