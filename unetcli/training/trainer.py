"""The training loop: seeded batches, CE + Dice, validation Dice every epoch, checkpoints, logs.

Everything a run writes lives in its folder:
``config.yaml``, ``split.json``, ``checkpoints/{last,best}.pt``, ``metrics.jsonl``,
``curves.png`` and ``log.txt``. Writing goes through :func:`is_main_process`-guarded
helpers so that the same loop can later run under ``torchrun`` with rank 0 alone writing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from unetcli.atomic import atomic_write_text
from unetcli.config import RunConfig, config_to_dict, dump_config
from unetcli.data.dataset import Dataset, discover_dataset, load_dataset, split_cases
from unetcli.data.sampling import PatchSampler
from unetcli.errors import ConfigError, OutputError, TrainingError
from unetcli.evaluation.metrics import dice
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.models import build_model, count_parameters
from unetcli.runtime import autocast, configure_threads, resolve_device, resolve_precision, seed_everything
from unetcli.training.checkpoint import save_checkpoint
from unetcli.training.curves import plot_curves
from unetcli.training.losses import DiceCELoss

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


def lr_factor(schedule: str, iteration: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at ``iteration`` of ``total``: linear warm-up, then poly (0.9) or cosine."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    progress = min(1.0, (iteration - warmup) / max(1, total - warmup))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def make_optimizer(model: nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay, **fused)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, **fused)


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
    return [model.input_size_for_output(s) for s in spatial]  # type: ignore[operator]


def _prepare_run_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: run folder already exists and is not empty", hint="choose another --out, or pass --overwrite")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)


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
        probs = sliding_window_predict(
            model, case.image, patch, dataset.num_classes, overlap=cfg.infer.overlap,
            window_batch_size=cfg.infer.window_batch_size, gaussian=cfg.infer.gaussian,
            margin=getattr(model, "margin", 0), device=device, precision=precision,
        )
        pred = probs.argmax(0).numpy()
        for k in range(1, dataset.num_classes):
            scores[i, k - 1] = dice(pred == k, case.label == k)
    model.train()
    with np.errstate(all="ignore"):
        per_class = np.nanmean(scores, axis=0) if len(names) else np.full(dataset.num_classes - 1, np.nan)
    result = {f"dice_{dataset.label_names[k]}": float(per_class[k - 1]) for k in range(1, dataset.num_classes)}
    result["dice_mean"] = float(np.nanmean(per_class)) if np.isfinite(per_class).any() else float("nan")
    return result


def train(data_dir: Path, cfg: RunConfig, out: Path, overwrite: bool = False,
          progress: bool = True, on_epoch: Callable[[dict[str, Any]], None] | None = None) -> TrainResult:
    """Train a U-Net on ``data_dir`` and write the run folder ``out``. Returns the best epoch's figures."""
    start = time.perf_counter()
    configure_threads(cfg.train.num_threads)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)

    files = discover_dataset(data_dir)
    dataset = load_dataset(files, cfg.data)
    _prepare_run_dir(out, overwrite)
    handler = _attach_log_file(out) if is_main_process() else None
    try:
        return _train(dataset, files.layout, cfg, out, device, precision, start, progress, on_epoch)
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
            raise ConfigError(f"model.{key} is {current} but the data has {value}", hint=f"remove model.{key} from the config to take it from the data")
        setattr(m, key, value)
    cfg.data.num_classes = dataset.num_classes
    cfg.data.label_names = dataset.label_names


def _train(dataset: Dataset, layout: str, cfg: RunConfig, out: Path, device: torch.device, precision: str,
           start: float, progress: bool, on_epoch: Callable[[dict[str, Any]], None] | None) -> TrainResult:
    t = cfg.train
    _resolve_model_config(cfg, dataset)
    model = build_model(cfg.model)
    patch = resolve_patch_size(cfg, dataset, model)
    cfg.train.patch_size = patch
    train_names, val_names = split_cases([c.name for c in dataset.cases], cfg.data.val_fraction, t.seed)
    if train_names == val_names:
        log.warning("only one case: validating on the training case itself")
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    atomic_write_text(out / "split.json", json.dumps({"train": train_names, "val": val_names}, indent=2))
    atomic_write_text(out / "metrics.jsonl", "")

    model.to(device)
    if t.channels_last and dataset.spatial_dims == 2:
        model.to(memory_format=torch.channels_last)
    n_params = count_parameters(model)
    log.info(
        "training %dD U-Net (%s skips, %s padding, %s params) on %d cases (%d train / %d val), %d classes, "
        "patch %s, device %s, precision %s",
        dataset.spatial_dims, cfg.model.skip, cfg.model.padding, f"{n_params:,}", len(dataset.cases),
        len(train_names), len(val_names), dataset.num_classes, patch, device, precision,
    )
    by_name = {c.name: c for c in dataset.cases}
    sampler = PatchSampler(
        [by_name[n] for n in train_names], patch, t.batch_size, margin=model.margin,
        flips=t.flips, rotate90=t.rotate90, intensity_jitter=t.intensity_jitter, seed=t.seed,
    )
    loss_fn = DiceCELoss(include_background=t.dice_include_background, dice_weight=t.dice_weight, ce_weight=t.ce_weight)
    optimizer = make_optimizer(model, cfg, device)
    total = t.epochs * t.iterations_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(t.schedule, it, total, t.warmup_iterations))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    metadata = {
        "spatial_dims": dataset.spatial_dims, "in_channels": dataset.in_channels, "num_classes": dataset.num_classes,
        "label_values": dataset.label_values, "label_names": dataset.label_names, "channel_names": dataset.channel_names,
        "normalization": cfg.data.normalization, "patch_size": patch, "layout": layout, "file_format": "png",
    }

    best_dice, best_epoch = -1.0, 0
    history: list[dict[str, Any]] = []
    bar = tqdm(total=total, disable=not progress, unit="it", dynamic_ncols=True, leave=False)
    model.train()
    iteration = 0
    for epoch in range(1, t.epochs + 1):
        epoch_start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(t.iterations_per_epoch):
            images, labels = sampler.next_batch()
            images = images.to(device, non_blocking=True)
            if t.channels_last and dataset.spatial_dims == 2:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, precision):
                logits = model(images)
            loss = loss_fn(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if t.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            loss_sum += loss.detach()
            iteration += 1
            bar.update(1)
        train_loss = float(loss_sum) / t.iterations_per_epoch  # one host sync per epoch
        if not math.isfinite(train_loss):
            raise TrainingError(
                f"loss became {train_loss} in epoch {epoch} (iterations {iteration - t.iterations_per_epoch + 1}..{iteration}); "
                f"the last good checkpoint is {out / 'checkpoints' / 'last.pt'}",
                hint="try --precision fp32 or a lower --lr",
            )
        train_seconds = time.perf_counter() - epoch_start
        val = validate(model, dataset, val_names, cfg, patch, device, precision)
        record = {"epoch": epoch, "iteration": iteration, "train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                  "epoch_seconds": train_seconds, "val_seconds": time.perf_counter() - epoch_start - train_seconds,
                  "elapsed_seconds": time.perf_counter() - start, **{f"val_{k}": v for k, v in val.items()}}
        history.append(record)
        improved = math.isfinite(val["dice_mean"]) and val["dice_mean"] > best_dice
        if improved:
            best_dice, best_epoch = val["dice_mean"], epoch
        if is_main_process():
            state = {
                "config": config_to_dict(cfg), "metadata": metadata, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "iteration": iteration, "best_dice": best_dice, "best_epoch": best_epoch,
                "sampler": sampler.state_dict(), "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(out / "checkpoints" / "last.pt", state)
            if improved:
                save_checkpoint(out / "checkpoints" / "best.pt", state)
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            plot_curves(history, out / "curves.png")
        bar.set_postfix(loss=f"{train_loss:.3f}", dice=f"{val['dice_mean']:.3f}")
        log.info("epoch %d/%d  loss %.4f  val Dice %.4f  (%.1f s)%s", epoch, t.epochs, train_loss,
                 val["dice_mean"], train_seconds, "  best" if improved else "")
        if on_epoch is not None:
            on_epoch(record)
    bar.close()
    seconds = time.perf_counter() - start
    log.info("done in %.0f s; best val Dice %.4f at epoch %d; run folder %s", seconds, best_dice, best_epoch, out)
    return TrainResult(out, best_dice, best_epoch, t.epochs, seconds, n_params)
