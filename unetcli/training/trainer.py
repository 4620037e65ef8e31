"""The training loop: seeded batches, CE + Dice, validation Dice every epoch, checkpoints, logs.

Everything a run writes lives in its folder:
``config.yaml``, ``split.json``, ``checkpoints/{last,best}.pt``, ``metrics.jsonl``,
``curves.png`` and ``log.txt``. Writing goes through :func:`is_main_process`-guarded
helpers so that the same loop can later run under ``torchrun`` with rank 0 alone writing.
The parts of a run are built in :mod:`~unetcli.training.setup`; continuing a stopped run is
:func:`unetcli.training.resume.resume_training`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from tqdm import tqdm

from unetcli.atomic import atomic_write_text
from unetcli.config import RunConfig, config_to_dict, dump_config
from unetcli.data.dataset import discover_dataset, load_dataset
from unetcli.data.sampling import iterate_batches
from unetcli.data.types import Dataset
from unetcli.errors import DataError, OutputError, TrainingError, UnetCliError
from unetcli.inference.quality_reference import reference_from_dataset
from unetcli.models import count_parameters
from unetcli.runtime import autocast, configure_cpu_allocator, configure_threads, resolve_device, resolve_precision, seed_everything
from unetcli.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from unetcli.training.distributed import (any_rank, collective_timeout, current_world, first_over_ranks, join_world, leave_world,
                                          max_over_ranks, mean_over_ranks, rank_share, report_failure)
from unetcli.training.init_weights import set_encoder_trainable
from unetcli.training.interrupts import StopRequest, interrupted, numerical_fault
from unetcli.training.run_folder import claim_run_dir, is_main_process, run_log_file, write_metrics
from unetcli.training.setup import TrainComponents, build_components, default_num_workers
from unetcli.training.state import ResumePoint, TrainState
from unetcli.training.tracked import run_tracking, track_epoch
from unetcli.training.validation import validate

log = logging.getLogger("unetcli")

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_dice: float
    best_epoch: int
    epochs: int
    """Epochs trained (with a time budget: those that fitted)."""
    seconds: float
    parameters: int
    config: RunConfig | None = None
    """The resolved config the run trained with (what ``config.yaml`` holds)."""


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: Any, device: torch.device,
               precision: str, grad_clip: float | None) -> torch.Tensor:
    """One optimisation step: forward under ``precision`` autocast, loss, backward, optional
    gradient clipping, update. Returns the detached loss without a host sync."""
    with autocast(device, precision):
        logits = model(images)
    loss = loss_fn(logits, labels)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def train(data_dir: Path, cfg: RunConfig, out: Path, overwrite: bool = False, progress: bool = True,
          on_epoch: EpochCallback | None = None, resume: ResumePoint | None = None,
          run_files: dict[str, str] | None = None, split: tuple[list[str], list[str]] | None = None) -> TrainResult:
    """Train a U-Net on ``data_dir`` and write the run folder ``out``. Returns the best epoch's
    figures and the resolved config; ``cfg`` itself is not modified.

    ``resume`` is a checkpoint loaded by :func:`~unetcli.training.resume.resume_training` (which
    holds the run's lock): the loop then continues from it instead of starting afresh.
    ``run_files`` (name -> text, e.g. the plan as ``plans.yaml``) are written into the run folder.
    ``split`` (train names, validation names) replaces the seeded split (cross-validation folds).
    """
    start = time.perf_counter()
    world = join_world(cfg.train.device)
    try:
        return _train(data_dir, cfg, out, overwrite, progress and world.is_main, on_epoch, resume, start, run_files or {}, split)
    except BaseException as exc:
        # Under torchrun, the other ranks would otherwise wait in their next collective until it times out.
        if not report_failure(exc) and isinstance(exc, UnetCliError):
            exc.quiet = True  # another rank failed first and prints the one error line
        if isinstance(exc, RuntimeError) and world.distributed:
            raise (collective_timeout(exc) or TrainingError(
                f"rank {world.rank}: a collective operation failed ({str(exc).splitlines()[0][:200]})",
                hint="another process probably died; check its output")) from exc
        raise
    finally:
        if world.distributed:
            leave_world()


def _train(data_dir: Path, cfg: RunConfig, out: Path, overwrite: bool, progress: bool, on_epoch: EpochCallback | None,
           resume: ResumePoint | None, start: float, run_files: dict[str, str],
           split: tuple[list[str], list[str]] | None = None) -> TrainResult:
    configure_threads(cfg.train.num_threads)
    configure_cpu_allocator()
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)

    files = discover_dataset(data_dir)
    dataset = load_dataset(files, cfg.data)
    if resume is None:
        _check_enough_cases(dataset, cfg, data_dir)
    with contextlib.ExitStack() as stack:
        if resume is None and current_world().is_main:
            stack.enter_context(claim_run_dir(out, overwrite))
        stack.enter_context(run_log_file(out))
        try:
            if resume:
                split = resume.split_for([c.name for c in dataset.cases], Path(data_dir).resolve())
            parts = build_components(cfg, dataset, files.layout, device, precision, split, resumed=resume is not None)
            if current_world().is_main:  # what `unet predict` compares new cases with (only rank 0 saves checkpoints)
                parts.metadata["quality_reference"] = reference_from_dataset(files, dataset, parts.train_names)
            trainer = Trainer(parts, dataset, out, device, precision, Path(data_dir).resolve(), start, resume, run_files)
            return trainer.run(progress, on_epoch)
        except OSError as exc:  # e.g. a full disk: files already written are intact (atomic writes)
            raise OutputError(f"{exc.filename or out}: {exc.strerror or exc}",
                              hint=f"check the free space and permissions of {out}; its last checkpoint is intact") from exc


def _check_enough_cases(dataset: Dataset, cfg: RunConfig, data_dir: Path) -> None:
    if len(dataset.cases) < 2 and cfg.data.val_fraction > 0:
        raise DataError(
            f"{data_dir}: only 1 case ({dataset.cases[0].name if dataset.cases else 'none'}); training needs at least 2, "
            "one to train on and one to validate on",
            hint="add cases, or pass --set data.val_fraction=0 to validate on the training case itself",
        )


class Trainer:
    """One run's loop over its :class:`TrainComponents`, keeping its :class:`TrainState`."""

    def __init__(self, parts: TrainComponents, dataset: Dataset, out: Path, device: torch.device, precision: str,
                 data_dir: Path, start: float, resume: ResumePoint | None = None, run_files: dict[str, str] | None = None) -> None:
        self.parts, self.cfg, self.dataset, self.out = parts, parts.config, dataset, out
        self.device, self.precision, self.data_dir, self.start = device, precision, data_dir, start
        self.resume = resume
        self._write_run_files(run_files or {})
        self.state = resume.restore(parts, device) if resume else TrainState.fresh(device)
        if resume:
            self._log_resumed()
        write_metrics(out, self.state.history, curves=False)
        # First iteration (1-based) with a non-finite loss, kept on the device: no host sync per step.
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.stop = StopRequest()
        self.time_up = False
        """The time budget is spent (set when the next step would leave too little time to validate and save)."""
        self.epoch_overhead = 0.0
        """Seconds the last epoch end took (validation, metrics, checkpoints): reserved from a time budget."""
        self.schedule_clock = 0.0
        """Seconds the time schedule is at; never goes back when the reserved epoch overhead shrinks."""
        self.lr = parts.config.train.lr * parts.schedule.factor(max(0, self.state.iteration - 1), self.state.elapsed_before)
        """The rate of the last step taken (recorded per epoch)."""
        self._steps_in_epoch, self._elapsed_in_epoch = 0, 0.0

    # ------------------------------------------------------------------ the loop

    def run(self, progress: bool = True, on_epoch: EpochCallback | None = None) -> TrainResult:
        t, s = self.cfg.train, self.state
        total = None if t.time_limit is not None else self.max_iterations
        with self.stop, run_tracking(self) as self.tracking, tqdm(total=total, initial=s.iteration, disable=not progress, unit="it",
                                                                  dynamic_ncols=True, leave=False) as self.bar:
            self.parts.model.train()
            batches = self._batches()
            while s.epoch < t.epoch_limit and not self.time_up:
                epoch_start = time.perf_counter()
                if t.freeze_encoder_epochs:  # fine-tuning: the encoder learns only after the first epochs
                    set_encoder_trainable(self.parts.model, s.epoch >= t.freeze_encoder_epochs)
                steps = self._train_epoch(batches)
                if steps == 0 and s.epoch_iteration == 0:  # the budget ran out at an epoch's end: nothing new to validate
                    self._save("last")  # marks the run finished
                    break
                self._stop_if_requested()  # before validation, which can take a while
                record = self._end_epoch(epoch_start, steps)
                track_epoch(self, record)
                if on_epoch is not None:
                    on_epoch(record)
                self._stop_if_requested()
        seconds = time.perf_counter() - self.start
        if t.time_limit is not None:
            log.info("time budget: %d iterations in %.0f s of training (%.0f s budget)", s.iteration, self._elapsed(), t.time_limit)
        log.info("done in %.0f s; best val Dice %.4f at epoch %d; run folder %s", seconds, s.best_dice, s.best_epoch, self.out)
        return TrainResult(self.out, s.best_dice, s.best_epoch, s.epoch, seconds, count_parameters(self.parts.model), self.cfg)

    @property
    def max_iterations(self) -> int:
        t = self.cfg.train
        return t.epoch_limit * t.iterations_per_epoch

    def _clock(self) -> float:
        """Elapsed training seconds, the same on every rank (the largest) when a time budget drives the schedule."""
        elapsed = self._elapsed()
        return max_over_ranks(elapsed) if self.cfg.train.time_limit is not None else elapsed

    def _out_of_time(self, elapsed: float) -> bool:
        """Whether one more step would leave too little of the budget for the epoch's end (validation, saving)."""
        limit = self.cfg.train.time_limit
        if limit is None or self.state.iteration == 0:  # one step at least, so that the run folder is complete
            return False
        step = self._elapsed_in_epoch / self._steps_in_epoch if self._steps_in_epoch else 0.0
        return elapsed + step + self.epoch_overhead >= limit

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.parts.sampler
        batches = iterate_batches(sampler, sampler.position, self.max_iterations, default_num_workers(self.cfg),
                                  pin_memory=self.device.type == "cuda")
        if self.resume is not None:
            # After creating the batch iterator, which draws its worker seed from torch's generator,
            # exactly as the uninterrupted run did before the state was saved.
            restore_rng_state(self.resume.checkpoint["rng"])
        return batches

    def _train_epoch(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Train until the epoch is complete or the time budget is spent; returns the steps taken."""
        t, s, p = self.cfg.train, self.state, self.parts
        self._steps_in_epoch, self._elapsed_in_epoch, began = 0, 0.0, time.perf_counter()
        while s.epoch_iteration < t.iterations_per_epoch:
            self._stop_if_requested()
            elapsed = self._clock()
            if self._out_of_time(elapsed):
                self.time_up = True
                break
            try:
                images, labels = next(batches)
            except Exception:
                if self.stop.signum is None:
                    raise
                self._save_and_stop(self.stop.signum)  # a batch worker got the signal too; this iteration has not started
            p.sampler.position += 1
            images, labels = rank_share(images, labels)
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=p.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            # The epoch's end (validation, saving) is reserved, so a time schedule reaches its end at the last step.
            self.schedule_clock = max(self.schedule_clock, elapsed + self.epoch_overhead)
            self.lr = p.schedule.apply(p.optimizer, t.lr, s.iteration, self.schedule_clock)
            loss = train_step(p.train_model, images, labels, p.loss_fn, p.optimizer, p.scaler, self.device, self.precision, t.grad_clip)
            s.loss_sum += loss
            s.iteration += 1
            s.epoch_iteration += 1
            self.tracking.step(s.iteration, loss, self.lr)
            self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad, s.iteration)
            self.bar.update(1)
            self._steps_in_epoch += 1
            self._elapsed_in_epoch = time.perf_counter() - began
            if t.checkpoint_interval and s.iteration % t.checkpoint_interval == 0 and s.epoch_iteration < t.iterations_per_epoch:
                self._save("last")
        return self._steps_in_epoch

    def _end_epoch(self, epoch_start: float, steps: int) -> dict[str, Any]:
        """Validate, record, write metrics and curves, save ``last.pt`` (and ``best.pt``), log.
        ``steps``: iterations this process trained in the epoch (fewer when resumed in it or out of time)."""
        s = self.state
        self._check_finite()
        iterations = max(1, s.epoch_iteration)  # an epoch cut short by the time budget has fewer
        train_loss = float(mean_over_ranks(s.loss_sum)) / iterations  # one host sync per epoch
        train_seconds = time.perf_counter() - epoch_start
        end_start = time.perf_counter()
        val = validate(self.parts.model, self.dataset, self.parts.val_names, self.cfg, self.parts.patch,
                       self.device, self.precision)
        s.epoch += 1
        s.epoch_iteration = 0
        s.loss_sum = torch.zeros((), device=self.device)
        record = {"epoch": s.epoch, "iteration": s.iteration, "epoch_iterations": iterations, "train_loss": train_loss,
                  "lr": self.lr, "epoch_seconds": train_seconds,
                  "seconds_per_iteration": train_seconds / steps if steps else None,
                  "val_seconds": time.perf_counter() - epoch_start - train_seconds,
                  "elapsed_seconds": self._elapsed(), **{f"val_{k}": v for k, v in val.items()}}
        s.history.append(record)
        improved = math.isfinite(val["dice_mean"]) and val["dice_mean"] > s.best_dice
        self.epoch_overhead = max(self.epoch_overhead, time.perf_counter() - end_start)
        self.time_up = self.time_up or self._out_of_time(self._clock())  # decided before saving: last.pt says whether it is done
        if improved:
            s.best_dice, s.best_epoch = val["dice_mean"], s.epoch
        # metrics first: a crash before last.pt re-runs this epoch, and resuming truncates metrics to last.pt.
        write_metrics(self.out, s.history)
        self._save(*(("best", "last") if improved else ("last",)))  # best before last: see _save
        self.epoch_overhead = time.perf_counter() - end_start
        self.bar.set_postfix(loss=f"{train_loss:.3f}", dice=f"{val['dice_mean']:.3f}")
        log.info("epoch %s  loss %.4f  val Dice %.4f  (%.1f s, %s it)%s", self._epoch_text(), train_loss,
                 val["dice_mean"], train_seconds, iterations, "  best" if improved else "")
        return record

    def _epoch_text(self) -> str:
        t, s = self.cfg.train, self.state
        if t.time_limit is None:
            return f"{s.epoch}/{t.epochs}"
        return f"{s.epoch}{f'/{t.epochs}' if t.epochs else ''} ({self._elapsed():.0f}/{t.time_limit:.0f} s)"

    # ------------------------------------------------------------------ saving and stopping

    def _save(self, *names: str) -> None:
        """Write the checkpoint(s) ``names`` after checking the weights are finite. Best before
        last: a crash in between re-runs this epoch and rewrites both."""
        self._check_finite()
        if not is_main_process():
            return
        checkpoint = self._checkpoint()
        for name in names:
            save_checkpoint(self.out / "checkpoints" / f"{name}.pt", checkpoint)
        self.state.last_saved = (self.state.epoch, self.state.iteration)

    def _stop_if_requested(self) -> None:
        # Under torchrun every rank must stop at the same iteration, whichever of them got the signal.
        if any_rank(self.stop.signum is not None):
            self._save_and_stop(self.stop.signum or signal.SIGTERM)

    def _save_and_stop(self, signum: int) -> NoReturn:
        """The one way a signal ends a run: save ``last.pt`` unless it already holds this point, then raise."""
        s = self.state
        if s.last_saved != (s.epoch, s.iteration):
            self._save("last")
        raise interrupted(signum, self.out, s.epoch, s.iteration, s.epoch_iteration)

    def _check_finite(self) -> None:
        """Raise TrainingError if a loss or weight went NaN/Inf (one host sync; at epoch ends and saves only)."""
        bad = int(first_over_ranks(self.first_bad))
        weights_ok = bad < 0 and bool(torch.stack([torch.isfinite(v).all() for v in self.parts.model.state_dict().values()
                                                   if v.is_floating_point()]).all())
        if bad < 0 and weights_ok:
            return
        t, s = self.cfg.train, self.state
        at = bad if bad >= 0 else s.iteration
        raise numerical_fault(at, t.iterations_per_epoch, t.lr * self.parts.schedule.factor(at - 1), self.precision, t.lr,
                              self.out, s.last_saved, bad >= 0)

    def _checkpoint(self) -> dict[str, Any]:
        p = self.parts
        checkpoint = {
            "config": config_to_dict(self.cfg), "metadata": p.metadata, "model": p.model.state_dict(),
            "optimizer": p.optimizer.state_dict(), "scheduler": p.schedule.state_dict(), "scaler": p.scaler.state_dict(),
            "sampler": p.sampler.state_dict(), "rng": capture_rng_state(),
            **self.state.to_checkpoint(self._elapsed(), self._finished()),
        }
        checkpoint["resume"].update({"split": {"train": p.train_names, "val": p.val_names},
                                     "data_dir": str(self.data_dir), "precision": self.precision,
                                     "world_size": current_world().world_size})
        return checkpoint

    def _finished(self) -> bool:
        s = self.state
        return self.time_up or (s.epoch >= self.cfg.train.epoch_limit and s.epoch_iteration == 0)

    # ------------------------------------------------------------------ run files and logs

    def _elapsed(self) -> float:
        return self.state.elapsed_before + time.perf_counter() - self.start

    def _write_run_files(self, extra: dict[str, str]) -> None:
        p = self.parts
        if p.train_names == p.val_names:
            log.warning("validating on the training case(s) themselves (data.val_fraction is 0 or there is one case)")
        if is_main_process():
            atomic_write_text(self.out / "config.yaml", dump_config(self.cfg))
            atomic_write_text(self.out / "split.json", json.dumps({"train": p.train_names, "val": p.val_names}, indent=2))
            for name, text in extra.items():
                atomic_write_text(self.out / name, text)
        m, d = self.cfg.model, self.dataset
        log.info(
            "training %dD U-Net (%s skips, %s padding, %s params) on %d cases (%d train / %d val), %d classes, "
            "patch %s, device %s, precision %s%s%s",
            d.spatial_dims, m.skip, m.padding, f"{count_parameters(p.model):,}", len(d.cases), len(p.train_names),
            len(p.val_names), d.num_classes, p.patch, self.device, self.precision,
            "" if p.memory_format == torch.contiguous_format else ", channels_last", _world_text(),
        )

    def _log_resumed(self) -> None:
        s, t = self.state, self.cfg.train
        if self.parts.schedule.timed:  # a changed --time or --epochs: decay on, never back up
            self.parts.schedule.reschedule_timed(s.iteration, s.elapsed_before, self.max_iterations, t.time_limit)
        else:
            self.parts.schedule.reschedule(s.iteration, self.max_iterations)
        if self.resume is not None and self.resume.precision not in (None, self.precision):
            log.warning("this run trained with %s precision and continues with %s: results will differ from an "
                        "uninterrupted run", self.resume.precision, self.precision)
        saved_world = self.resume.checkpoint["resume"].get("world_size", 1) if self.resume else 1
        if saved_world != current_world().world_size:
            log.warning("this run trained with %d process(es) and continues with %d: the global batch is the same, "
                        "but sums are reduced in another order, so results are no longer bit-identical",
                        saved_world, current_world().world_size)
        log.info("resuming %s in epoch %d%s after iteration %d%s", self.out, s.epoch + 1, f"/{t.epochs}" if t.epochs else "",
                 s.iteration, f", {s.elapsed_before:.0f} of {t.time_limit:.0f} s spent" if t.time_limit else "")


def _world_text() -> str:
    world = current_world()
    if not world.distributed:
        return ""
    share = "each rank takes its share of the global batch"
    return f", world size {world.world_size} ({share}; rank 0 writes the run folder)"
