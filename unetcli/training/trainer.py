"""The training loop: seeded batches, CE + Dice, validation Dice every epoch, checkpoints, logs.

Everything a run writes lives in its folder:
``config.yaml``, ``split.json``, ``checkpoints/{last,best}.pt``, ``metrics.jsonl``,
``curves.png`` and ``log.txt``. Writing goes through :func:`is_main_process`-guarded
helpers so that the same loop can later run under ``torchrun`` with rank 0 alone writing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from unetcli.atomic import atomic_write_text, ensure_writable_folder
from unetcli.config import RunConfig, apply_overrides, config_from_dict, config_to_dict, dump_config
from unetcli.data.dataset import discover_dataset, load_dataset, split_cases
from unetcli.data.types import Dataset
from unetcli.data.sampling import PatchSampler, iterate_batches
from unetcli.errors import CheckpointError, ConfigError, DataError, Interrupted, ModelError, OutputError, TrainingError
from unetcli.evaluation.metrics import dice
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.models import build_model, count_parameters
from unetcli.runtime import (autocast, configure_cpu_allocator, configure_threads, memory_format, resolve_channels_last, resolve_device,
                             resolve_precision, seed_everything)
from unetcli.runlock import LOCK_NAME, RunLock
from unetcli.training.checkpoint import (
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    state_dict_problem,
)
from unetcli.training.curves import plot_curves
from unetcli.training.losses import DiceCELoss
from unetcli.training.schedule import LRPlan, lr_factor  # noqa: F401 - lr_factor is re-exported (scripts use it)

log = logging.getLogger("unetcli")


@dataclass
class TrainResult:
    run_dir: Path
    best_dice: float
    best_epoch: int
    epochs: int
    seconds: float
    parameters: int


def is_main_process() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def make_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay, **fused)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, **fused)


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


def resolve_patch_size(cfg: RunConfig, dataset: Dataset, model: nn.Module) -> list[int]:
    """The network input size: the configured patch, or the largest image (plus valid-padding
    context), rounded up to a size the network takes."""
    spatial = np.max([c.image.shape[1:] for c in dataset.cases], axis=0).tolist()
    if cfg.train.patch_size is not None:
        patch = list(cfg.train.patch_size)
        if len(patch) != dataset.spatial_dims:
            raise ConfigError(
                f"train.patch_size {patch} has {len(patch)} axes but the data is {dataset.spatial_dims}D",
                hint=f"give {dataset.spatial_dims} numbers",
            )
        if all(p > s for p, s in zip(patch, spatial)):
            raise ConfigError(
                f"train.patch_size {patch} is larger than every image (largest {spatial})",
                hint="use a patch no larger than the images, or leave train.patch_size unset",
            )
        fixed = [model.valid_input_size(p) for p in patch]  # type: ignore[operator]
        if fixed != patch:
            log.info("patch size %s rounded up to %s, a size the network takes", patch, fixed)
        return fixed
    if dataset.spatial_dims == 3:
        return default_patch_3d([c.image.shape[1:] for c in dataset.cases], model)
    return [model.input_size_for_output(s) for s in spatial]  # type: ignore[operator]


PATCH_VOXEL_BUDGET = 96**3
"""Default 3D patches hold at most this many voxels (memory and speed on CPUs and small GPUs)."""


def default_patch_3d(shapes: list[tuple[int, ...]], model: nn.Module, budget: int = PATCH_VOXEL_BUDGET) -> list[int]:
    """nnU-Net-like default: the median case shape, shrunk along its longest axis until it fits ``budget``."""
    patch = [int(v) for v in np.median(np.asarray(shapes), axis=0)]
    while int(np.prod(patch)) > budget:
        axis = int(np.argmax(patch))
        patch[axis] = max(model.size_multiple, patch[axis] - model.size_multiple)  # type: ignore[attr-defined]
    return [model.input_size_for_output(p) for p in patch]  # type: ignore[operator]


def default_batch_size(cfg: RunConfig, spatial_dims: int) -> int:
    return cfg.train.batch_size or (8 if spatial_dims == 2 else 2)


def default_num_workers(cfg: RunConfig) -> int:
    if cfg.train.num_workers is not None:
        return cfg.train.num_workers
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


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
def _claim_run_dir(out: Path, overwrite: bool) -> Iterator[None]:
    """Create ``out``, hold its lock for the block, and refuse to mix runs in one folder."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder", hint="choose another --out")
    created = not out.exists()
    ensure_writable_folder(out, "run folder", hint="choose a writable --out")
    with RunLock(out):
        try:
            _prepare_run_dir(out, overwrite)
        except PermissionError as exc:
            raise OutputError(f"{out}: cannot write into the run folder ({exc.strerror})", hint="choose a writable --out") from exc
        try:
            yield
        except (ConfigError, DataError, ModelError):
            if created and not (out / "checkpoints" / "last.pt").exists():
                # Refused before training: leave no half-made folder that a corrected rerun would find "not empty".
                shutil.rmtree(out, ignore_errors=True)
            raise


def _check_enough_cases(dataset: Dataset, cfg: RunConfig, data_dir: Path) -> None:
    if len(dataset.cases) < 2 and cfg.data.val_fraction > 0:
        raise DataError(
            f"{data_dir}: only 1 case ({dataset.cases[0].name if dataset.cases else 'none'}); training needs at least 2, "
            "one to train on and one to validate on",
            hint="add cases, or pass --set data.val_fraction=0 to validate on the training case itself",
        )


def _attach_log_file(out: Path) -> logging.Handler:
    handler = logging.FileHandler(out / "log.txt", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def validate(model: nn.Module, dataset: Dataset, names: list[str], cfg: RunConfig, patch: list[int],
             device: torch.device, precision: str) -> dict[str, float]:
    """Mean Dice per foreground class over the validation cases (whole images, sliding window)."""
    model.eval()
    by_name = {c.name: c for c in dataset.cases}
    scores = np.full((len(names), dataset.num_classes - 1), np.nan)
    for i, name in enumerate(names):
        case = by_name[name]
        pred = sliding_window_predict(
            model, case.image, patch, dataset.num_classes, overlap=cfg.infer.overlap,
            window_batch_size=cfg.infer.windows_per_batch(dataset.spatial_dims), gaussian=cfg.infer.gaussian,
            margin=getattr(model, "margin", 0), device=device, precision=precision, output="labels",
        ).numpy()
        for k in range(1, dataset.num_classes):
            scores[i, k - 1] = dice(pred == k, case.label == k)
    model.train()
    with np.errstate(all="ignore"):
        per_class = np.nanmean(scores, axis=0) if len(names) else np.full(dataset.num_classes - 1, np.nan)
    result = {f"dice_{dataset.label_names[k]}": float(per_class[k - 1]) for k in range(1, dataset.num_classes)}
    result["dice_mean"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return result


def train(data_dir: Path, cfg: RunConfig, out: Path, overwrite: bool = False,
          progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None,
          resume: dict[str, Any] | None = None) -> TrainResult:
    """Train a U-Net on ``data_dir`` and write the run folder ``out``. Returns the best epoch's figures.

    ``resume`` is a checkpoint loaded by :func:`resume_training` (which holds the run's lock): the
    loop then continues from it instead of starting afresh.
    """
    start = time.perf_counter()
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
        if resume is None:
            stack.enter_context(_claim_run_dir(out, overwrite))
        handler = _attach_log_file(out) if is_main_process() else None
        try:
            return _train(dataset, files.layout, cfg, out, device, precision, start, progress, on_epoch,
                          resume=resume, data_dir=Path(data_dir).resolve())
        except OSError as exc:  # e.g. a full disk: files already written are intact (atomic writes)
            raise OutputError(f"{exc.filename or out}: {exc.strerror or exc}",
                              hint=f"check the free space and permissions of {out}; its last checkpoint is intact") from exc
        finally:
            if handler is not None:
                log.removeHandler(handler)
                handler.close()


def _resolve_model_config(cfg: RunConfig, dataset: Dataset) -> None:
    m = cfg.model
    for key, value in (("spatial_dims", dataset.spatial_dims), ("in_channels", dataset.in_channels),
                       ("out_channels", dataset.num_classes)):
        current = getattr(m, key)
        if current is not None and current != value:
            raise ConfigError(f"model.{key} is {current} but the data has {value}",
                              hint=f"remove model.{key} from the config to take it from the data")
        setattr(m, key, value)
    cfg.data.num_classes = dataset.num_classes
    cfg.data.label_names = dataset.label_names


def _train(dataset: Dataset, layout: str, cfg: RunConfig, out: Path, device: torch.device, precision: str,
           start: float, progress: bool, on_epoch: Callable[[dict[str, Any]], None] | None,
           resume: dict[str, Any] | None = None, data_dir: Path | None = None) -> TrainResult:
    t = cfg.train
    _resolve_model_config(cfg, dataset)
    model = build_model(cfg.model)
    patch = resolve_patch_size(cfg, dataset, model)
    cfg.train.patch_size = patch
    train_names, val_names = split_cases([c.name for c in dataset.cases], cfg.data.val_fraction,
                                         t.seed if cfg.data.split_seed is None else cfg.data.split_seed)
    if resume is not None:
        train_names, val_names = _resumed_split(resume, dataset, data_dir)
    if train_names == val_names:
        log.warning("validating on the training case(s) themselves (data.val_fraction is 0 or there is one case)")
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    atomic_write_text(out / "split.json", json.dumps({"train": train_names, "val": val_names}, indent=2))

    model.to(device)
    fmt = memory_format(dataset.spatial_dims, resolve_channels_last(t.channels_last, device))
    model.to(memory_format=fmt)
    n_params = count_parameters(model)
    log.info(
        "training %dD U-Net (%s skips, %s padding, %s params) on %d cases (%d train / %d val), %d classes, "
        "patch %s, device %s, precision %s%s",
        dataset.spatial_dims, cfg.model.skip, cfg.model.padding, f"{n_params:,}", len(dataset.cases),
        len(train_names), len(val_names), dataset.num_classes, patch, device, precision,
        "" if fmt == torch.contiguous_format else ", channels_last",
    )
    by_name = {c.name: c for c in dataset.cases}
    cfg.train.batch_size = default_batch_size(cfg, dataset.spatial_dims)
    sampler = PatchSampler(
        [by_name[n] for n in train_names], patch, cfg.train.batch_size, num_classes=dataset.num_classes,
        margin=model.margin, foreground_fraction=t.foreground_fraction, flips=t.flips, rotate90=t.rotate90,
        rotate_scale_prob=t.rotate_scale_prob, intensity_jitter=t.intensity_jitter, gamma_prob=t.gamma_prob,
        noise_prob=t.noise_prob, seed=t.seed,
    )
    loss_fn = DiceCELoss(include_background=t.dice_include_background, dice_weight=t.dice_weight, ce_weight=t.ce_weight)
    optimizer = make_optimizer(model, cfg, device)
    total = t.epochs * t.iterations_per_epoch
    plan = LRPlan.new(t.schedule, total, t.warmup_iterations)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    metadata = {
        "spatial_dims": dataset.spatial_dims, "in_channels": dataset.in_channels, "num_classes": dataset.num_classes,
        "label_values": dataset.label_values, "label_names": dataset.label_names, "channel_names": dataset.channel_names,
        "normalization": cfg.data.normalization, "patch_size": patch, "layout": layout,
        "file_format": dataset.file_format, "preprocessing": dataset.preprocessing,
    }

    ckpt_dir = out / "checkpoints"
    ipe = t.iterations_per_epoch
    # Where the run stands: completed epochs, global iterations, iterations into the current epoch.
    epoch = iteration = epoch_iteration = 0
    loss_sum = torch.zeros((), device=device)
    best_dice, best_epoch = -1.0, 0
    history: list[dict[str, Any]] = []
    elapsed_before = 0.0
    last_saved: list[int] | None = None  # [epoch, iteration] of the newest checkpoint on disk
    if resume is not None:
        source = resume.get("_path", ckpt_dir / "last.pt")
        try:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            sampler.load_state_dict(resume["sampler"])
            plan = LRPlan.from_state_dict(resume["scheduler"])
            if resume.get("scaler") and scaler.is_enabled():
                scaler.load_state_dict(resume["scaler"])
            state = resume["resume"]
            epoch, iteration = int(resume["epoch"]), int(resume["iteration"])
            epoch_iteration = int(state["epoch_iteration"])
            loss_sum = state["loss_sum"].to(device=device, dtype=torch.float32)
            best_dice, best_epoch = float(resume["best_dice"]), int(resume["best_epoch"])
            history = [dict(r) for r in state["history"]]
            elapsed_before = float(state.get("elapsed_seconds", 0.0))
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{source}: its training state does not fit the model and optimiser its config describes "
                                  f"({state_dict_problem(exc)})",
                                  hint="the checkpoint may come from another unetcli version; start a new run") from exc
        plan.replan(iteration, total)  # a changed --epochs: decay from the current rate, never back up
        last_saved = [epoch, iteration]
        if resume.get("resume", {}).get("precision") not in (None, precision):
            log.warning("this run trained with %s precision and continues with %s: results will differ from an "
                        "uninterrupted run", resume["resume"]["precision"], precision)
        log.info("resuming %s in epoch %d/%d after iteration %d", out, epoch + 1, t.epochs, iteration)
    if is_main_process():
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def checkpoint_state() -> dict[str, Any]:
        return {
            "config": config_to_dict(cfg), "metadata": metadata, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": plan.state_dict(), "scaler": scaler.state_dict(),
            "epoch": epoch, "iteration": iteration, "best_dice": best_dice, "best_epoch": best_epoch,
            "sampler": sampler.state_dict(), "rng": capture_rng_state(),
            "resume": {
                "epoch_iteration": epoch_iteration, "loss_sum": loss_sum.detach().to("cpu", copy=True),
                "history": history, "split": {"train": train_names, "val": val_names},
                "data_dir": str(data_dir) if data_dir is not None else None, "precision": precision,
                "elapsed_seconds": elapsed_before + time.perf_counter() - start,
                "finished": epoch >= t.epochs and epoch_iteration == 0,
            },
        }

    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first iteration (1-based) with a non-finite loss

    def check_finite() -> None:
        """Raise TrainingError if a loss or weight went NaN/Inf (one host sync; at epoch ends and saves only)."""
        bad = int(first_bad)
        weights_ok = bad < 0 and bool(torch.stack([torch.isfinite(v).all() for v in model.state_dict().values()
                                                   if v.is_floating_point()]).all())
        if bad < 0 and weights_ok:
            return
        at = bad if bad >= 0 else iteration
        raise _numerical_fault(at, ipe, t.lr * plan.factor(at - 1), precision, t.lr, out, last_saved, bad >= 0)

    def save(*names: str) -> None:
        nonlocal last_saved
        check_finite()
        if not is_main_process():
            return
        state = checkpoint_state()
        for name in names:  # best before last: a crash in between re-runs this epoch and rewrites both
            save_checkpoint(ckpt_dir / f"{name}.pt", state)
        last_saved = [epoch, iteration]

    def interrupted(signum: int) -> Interrupted:
        where = (f"at the end of epoch {epoch}" if epoch_iteration == 0
                 else f"in epoch {epoch + 1} after iteration {iteration}")
        return Interrupted(
            f"training interrupted by {signal.Signals(signum).name} {where}; checkpoint saved to {ckpt_dir / 'last.pt'}; "
            f"resume with: unet train --resume {shlex.quote(str(out))}", signum)

    bar = tqdm(total=plan.total, initial=iteration, disable=not progress, unit="it", dynamic_ncols=True, leave=False)
    model.train()
    batches = iterate_batches(sampler, sampler.position, plan.total, default_num_workers(cfg), pin_memory=device.type == "cuda")
    if resume is not None:
        # After creating the batch iterator, which draws its worker seed from torch's generator,
        # exactly as the uninterrupted run did before the state was saved.
        restore_rng_state(resume["rng"])
    interval = t.checkpoint_interval
    try:
        with _StopRequest() as stop:
            while epoch < t.epochs:
                epoch_start = time.perf_counter()
                while epoch_iteration < ipe:
                    if stop.signum is not None:
                        save("last")
                        raise interrupted(stop.signum)
                    try:
                        images, labels = next(batches)
                    except Exception:
                        if stop.signum is None:
                            raise
                        save("last")  # a batch worker got the signal too; this iteration has not started
                        raise interrupted(stop.signum) from None
                    sampler.position += 1
                    images = images.to(device, non_blocking=True)
                    images = images.contiguous(memory_format=fmt)
                    labels = labels.to(device, non_blocking=True)
                    plan.apply(optimizer, t.lr, iteration)
                    loss = train_step(model, images, labels, loss_fn, optimizer, scaler, device, precision, t.grad_clip)
                    loss_sum += loss
                    iteration += 1
                    epoch_iteration += 1
                    # Remember the first non-finite loss on the device: no host sync per step.
                    first_bad = torch.where(torch.isfinite(loss) | (first_bad >= 0), first_bad, iteration)
                    bar.update(1)
                    if interval and iteration % interval == 0 and epoch_iteration < ipe:
                        save("last")
                if stop.signum is not None:  # before validation, which can take a while
                    save("last")
                    raise interrupted(stop.signum)
                check_finite()
                train_loss = float(loss_sum) / ipe  # one host sync per epoch
                train_seconds = time.perf_counter() - epoch_start
                val = validate(model, dataset, val_names, cfg, patch, device, precision)
                epoch += 1
                epoch_iteration = 0
                loss_sum = torch.zeros((), device=device)
                record = {"epoch": epoch, "iteration": iteration, "train_loss": train_loss,
                          "lr": t.lr * plan.factor(iteration - 1), "epoch_seconds": train_seconds,
                          "val_seconds": time.perf_counter() - epoch_start - train_seconds,
                          "elapsed_seconds": elapsed_before + time.perf_counter() - start,
                          **{f"val_{k}": v for k, v in val.items()}}
                history.append(record)
                improved = math.isfinite(val["dice_mean"]) and val["dice_mean"] > best_dice
                if improved:
                    best_dice, best_epoch = val["dice_mean"], epoch
                if is_main_process():
                    # metrics first: a crash before last.pt re-runs this epoch, and resuming truncates metrics to last.pt.
                    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
                    plot_curves(history, out / "curves.png")
                save(*(("best", "last") if improved else ("last",)))
                bar.set_postfix(loss=f"{train_loss:.3f}", dice=f"{val['dice_mean']:.3f}")
                log.info("epoch %d/%d  loss %.4f  val Dice %.4f  (%.1f s)%s", epoch, t.epochs, train_loss,
                         val["dice_mean"], train_seconds, "  best" if improved else "")
                if on_epoch is not None:
                    on_epoch(record)
                if stop.signum is not None:
                    raise interrupted(stop.signum)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    log.info("done in %.0f s; best val Dice %.4f at epoch %d; run folder %s", seconds, best_dice, best_epoch, out)
    return TrainResult(out, best_dice, best_epoch, t.epochs, seconds, n_params)


# --------------------------------------------------------------------------- interrupts, faults, resume


class _StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a flag the loop checks between iterations, so that it
    can save a checkpoint and stop cleanly. A second Ctrl-C stops at once (the last checkpoint on
    disk stays intact: checkpoints are written atomically). Handlers are installed only in the
    main thread and the previous ones are restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        with contextlib.suppress(OSError):
            os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint, then stopping "
                        "(Ctrl-C again stops at once)\n".encode())

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def _numerical_fault(at: int, ipe: int, lr_at: float, precision: str, base_lr: float, out: Path,
                     last_saved: list[int] | None, loss: bool) -> TrainingError:
    what = "the loss became NaN or infinite" if loss else "the weights became NaN or infinite"
    epoch = (at - 1) // ipe + 1
    ckpt = out / "checkpoints" / "last.pt"
    if last_saved is None:
        kept = "no checkpoint had been saved yet"
    else:
        kept = f"the last good checkpoint {ckpt} (epoch {last_saved[0]}, iteration {last_saved[1]}) is kept"
    if precision != "fp32":
        cause = f"likely cause: overflow in {precision} arithmetic or a learning rate too high ({lr_at:.3g} at that step)"
    else:
        cause = f"likely cause: a learning rate too high ({lr_at:.3g} at that step) for this model and data"
    lower = f"a lower --lr (e.g. --lr {base_lr / 10:.3g})"
    if precision == "fp32":
        hint = f"train again with {lower}"
    else:
        hint = f"train again with --precision fp32 or {lower}"
        if last_saved:
            hint += f", or continue from the last good checkpoint in fp32: unet train --resume {shlex.quote(str(out))} --precision fp32"
    return TrainingError(f"{what} at iteration {at} (epoch {epoch}); training stopped and {kept}; {cause}", hint=hint)


RESUME_KEYS = ("train.epochs", "train.device", "train.precision", "train.num_threads", "train.num_workers",
               "train.checkpoint_interval")
"""Config keys a resumed run may change: none of them alters the model, the data or the optimisation
(except --epochs, whose schedule change is re-planned; and --precision, which changes the arithmetic)."""


def resume_training(run: Path, data_dir: Path | None = None, overrides: dict[str, Any] | None = None,
                    progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
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
    with RunLock(run):
        _remove_stale_temp_files(run)
        path = run / "checkpoints" / "last.pt"
        if not path.is_file():
            raise CheckpointError(f"{path}: not found; the run stopped before its first checkpoint",
                                  hint=f"start it again: unet train DATA --out {shlex.quote(str(run))} --overwrite")
        state = load_checkpoint(path)
        if not isinstance(state.get("resume"), dict) or "rng" not in state:
            raise CheckpointError(f"{path}: holds no resume state (written by an older unetcli)",
                                  hint="predict with it, or start a new run")
        try:
            cfg = config_from_dict(state["config"])
        except ConfigError as exc:
            raise CheckpointError(f"{path}: its config is not valid for unetcli here ({exc.message})",
                                  hint="use the unetcli version that wrote it") from exc
        planned = cfg.train.epochs
        cfg = apply_overrides(cfg, overrides)
        done, partial = int(state["epoch"]), int(state["resume"]["epoch_iteration"])
        if cfg.train.epochs <= done:
            if cfg.train.epochs == planned == done and not partial:
                raise ConfigError(f"{run}: training already finished all {done} epochs",
                                  hint=f"to train it longer, pass more epochs: unet train --resume {shlex.quote(str(run))} --epochs {2 * done}")
            raise ConfigError(f"--epochs {cfg.train.epochs} is not more than the {done} epoch(s) {run} has already trained",
                              hint=f"pass --epochs larger than {done}")
        stored = state["resume"].get("data_dir")
        data = Path(data_dir) if data_dir is not None else Path(stored) if stored else None
        if data is None:
            raise DataError(f"{path}: does not record its data folder", hint="pass it: unet train DATA --resume RUN")
        if not data.is_dir():
            raise DataError(f"{data}: the run's data folder is not there any more",
                            hint=f"pass its new location: unet train DATA --resume {shlex.quote(str(run))}")
        return train(data, cfg, run, progress=progress, on_epoch=on_epoch, resume={**state, "_path": path})


_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9.]+)?$")
"""Temporary files of :func:`unetcli.atomic.atomic_path` (``.NAME.XXXXXXXX.tmp.SUFFIX``)."""


def _remove_stale_temp_files(run: Path) -> None:
    """Half-written files of a killed run (its lock is ours now, so nobody is writing them)."""
    for folder in (run, run / "checkpoints"):
        for path in folder.glob(".*.tmp*") if folder.is_dir() else []:
            if _TEMP_NAME.match(path.name) and path.is_file():
                log.info("removing %s, left half-written by the interrupted run", path)
                path.unlink(missing_ok=True)


def _resumed_split(resume: dict[str, Any], dataset: Dataset, data_dir: Path | None) -> tuple[list[str], list[str]]:
    """The run's own train/val split, after checking the data folder still holds exactly those cases."""
    split = resume["resume"]["split"]
    train_names, val_names = [str(n) for n in split["train"]], [str(n) for n in split["val"]]
    expected, found = set(train_names) | set(val_names), {c.name for c in dataset.cases}
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"case(s) of the run missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"case(s) not in the run: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
        raise DataError(f"{data_dir}: does not hold the cases the run was trained on ({'; '.join(parts)})",
                        hint="resume with the run's original data folder (its split is in RUN/split.json)")
    return train_names, val_names
