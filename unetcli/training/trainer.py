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
from unetcli.models import count_parameters
from unetcli.runtime import autocast, configure_cpu_allocator, configure_threads, resolve_device, resolve_precision, seed_everything
from unetcli.checkpoint import capture_rng_state, restore_rng_state, save_checkpoint
from unetcli.training.distributed import (any_rank, collective_timeout, current_world, first_over_ranks, join_world, leave_world,
                                          mean_over_ranks, rank_share, report_failure)
from unetcli.training.init_weights import set_encoder_trainable
from unetcli.training.interrupts import StopRequest, interrupted, numerical_fault
from unetcli.training.run_folder import claim_run_dir, is_main_process, run_log_file, write_metrics
from unetcli.training.setup import TrainComponents, build_components, default_num_workers
from unetcli.training.state import ResumePoint, TrainState
from unetcli.training.validation import validate

log = logging.getLogger("unetcli")

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    run_dir: Path
    best_dice: float
    best_epoch: int
    epochs: int
    seconds: float
    parameters: int
    config: RunConfig | None = None
    """The resolved config the run trained with (what ``config.yaml`` holds)."""


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
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

    # ------------------------------------------------------------------ the loop

    def run(self, progress: bool = True, on_epoch: EpochCallback | None = None) -> TrainResult:
        t, s = self.cfg.train, self.state
        with self.stop, tqdm(total=self.parts.plan.total, initial=s.iteration, disable=not progress, unit="it",
                             dynamic_ncols=True, leave=False) as self.bar:
            self.parts.model.train()
            batches = self._batches()
            while s.epoch < t.epochs:
                epoch_start = time.perf_counter()
                if t.freeze_encoder_epochs:  # fine-tuning: the encoder learns only after the first epochs
                    set_encoder_trainable(self.parts.model, s.epoch >= t.freeze_encoder_epochs)
                self._train_epoch(batches)
                self._stop_if_requested()  # before validation, which can take a while
                record = self._end_epoch(epoch_start)
                if on_epoch is not None:
                    on_epoch(record)
                self._stop_if_requested()
        seconds = time.perf_counter() - self.start
        log.info("done in %.0f s; best val Dice %.4f at epoch %d; run folder %s", seconds, s.best_dice, s.best_epoch, self.out)
        return TrainResult(self.out, s.best_dice, s.best_epoch, t.epochs, seconds, count_parameters(self.parts.model), self.cfg)

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self.parts.sampler
        batches = iterate_batches(sampler, sampler.position, self.parts.plan.total, default_num_workers(self.cfg),
                                  pin_memory=self.device.type == "cuda")
        if self.resume is not None:
            # After creating the batch iterator, which draws its worker seed from torch's generator,
            # exactly as the uninterrupted run did before the state was saved.
            restore_rng_state(self.resume.checkpoint["rng"])
        return batches

    def _train_epoch(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> None:
        t, s, p = self.cfg.train, self.state, self.parts
        while s.epoch_iteration < t.iterations_per_epoch:
            self._stop_if_requested()
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
            p.plan.apply(p.optimizer, t.lr, s.iteration)
            loss = train_step(p.train_model, images, labels, p.loss_fn, p.optimizer, p.scaler, self.device, self.precision, t.grad_clip)
            s.loss_sum += loss
            s.iteration += 1
            s.epoch_iteration += 1
            self.first_bad = torch.where(torch.isfinite(loss) | (self.first_bad >= 0), self.first_bad, s.iteration)
            self.bar.update(1)
            if t.checkpoint_interval and s.iteration % t.checkpoint_interval == 0 and s.epoch_iteration < t.iterations_per_epoch:
                self._save("last")

    def _end_epoch(self, epoch_start: float) -> dict[str, Any]:
        """Validate, record, write metrics and curves, save ``last.pt`` (and ``best.pt``), log."""
        t, s = self.cfg.train, self.state
        self._check_finite()
        train_loss = float(mean_over_ranks(s.loss_sum)) / t.iterations_per_epoch  # one host sync per epoch
        train_seconds = time.perf_counter() - epoch_start
        val = validate(self.parts.model, self.dataset, self.parts.val_names, self.cfg, self.parts.patch,
                       self.device, self.precision)
        s.epoch += 1
        s.epoch_iteration = 0
        s.loss_sum = torch.zeros((), device=self.device)
        record = {"epoch": s.epoch, "iteration": s.iteration, "train_loss": train_loss,
                  "lr": t.lr * self.parts.plan.factor(s.iteration - 1), "epoch_seconds": train_seconds,
                  "val_seconds": time.perf_counter() - epoch_start - train_seconds,
                  "elapsed_seconds": self._elapsed(), **{f"val_{k}": v for k, v in val.items()}}
        s.history.append(record)
        improved = math.isfinite(val["dice_mean"]) and val["dice_mean"] > s.best_dice
        if improved:
            s.best_dice, s.best_epoch = val["dice_mean"], s.epoch
        # metrics first: a crash before last.pt re-runs this epoch, and resuming truncates metrics to last.pt.
        write_metrics(self.out, s.history)
        self._save(*(("best", "last") if improved else ("last",)))  # best before last: see _save
        self.bar.set_postfix(loss=f"{train_loss:.3f}", dice=f"{val['dice_mean']:.3f}")
        log.info("epoch %d/%d  loss %.4f  val Dice %.4f  (%.1f s)%s", s.epoch, t.epochs, train_loss,
                 val["dice_mean"], train_seconds, "  best" if improved else "")
        return record

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
        raise numerical_fault(at, t.iterations_per_epoch, t.lr * self.parts.plan.factor(at - 1), self.precision, t.lr,
                              self.out, s.last_saved, bad >= 0)

    def _checkpoint(self) -> dict[str, Any]:
        p = self.parts
        checkpoint = {
            "config": config_to_dict(self.cfg), "metadata": p.metadata, "model": p.model.state_dict(),
            "optimizer": p.optimizer.state_dict(), "scheduler": p.plan.state_dict(), "scaler": p.scaler.state_dict(),
            "sampler": p.sampler.state_dict(), "rng": capture_rng_state(),
            **self.state.to_checkpoint(self._elapsed(), self.cfg.train.epochs),
        }
        checkpoint["resume"].update({"split": {"train": p.train_names, "val": p.val_names},
                                     "data_dir": str(self.data_dir), "precision": self.precision,
                                     "world_size": current_world().world_size})
        return checkpoint

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
        self.parts.plan.replan(s.iteration, t.epochs * t.iterations_per_epoch)  # a changed --epochs: decay on, never back up
        if self.resume is not None and self.resume.precision not in (None, self.precision):
            log.warning("this run trained with %s precision and continues with %s: results will differ from an "
                        "uninterrupted run", self.resume.precision, self.precision)
        saved_world = self.resume.checkpoint["resume"].get("world_size", 1) if self.resume else 1
        if saved_world != current_world().world_size:
            log.warning("this run trained with %d process(es) and continues with %d: the global batch is the same, "
                        "but sums are reduced in another order, so results are no longer bit-identical",
                        saved_world, current_world().world_size)
        log.info("resuming %s in epoch %d/%d after iteration %d", self.out, s.epoch + 1, t.epochs, s.iteration)


def _world_text() -> str:
    world = current_world()
    if not world.distributed:
        return ""
    share = "each rank takes its share of the global batch"
    return f", world size {world.world_size} ({share}; rank 0 writes the run folder)"
