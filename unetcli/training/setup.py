"""Everything a training run is built from, resolved before its first step: the model config
completed from the data, the network, the patch and batch size, the split, the sampler, the loss,
the optimiser, the learning-rate schedule and the checkpoint metadata that ``predict`` needs."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from unetcli.config import RunConfig
from unetcli.data.augment import IntensityAugmentation, resolve_augmentation
from unetcli.data.dataset import expand_to_cases, split_cases
from unetcli.data.sampling import PatchSampler
from unetcli.data.spatial import is_thick_slice
from unetcli.data.types import Dataset
from unetcli.errors import ConfigError
from unetcli.models import SegmentationNetwork, build_model
from unetcli.runtime import grad_scaler, memory_format, resolve_channels_last
from unetcli.training.distributed import check_batch_divides, sync_batch_norm, wrap_for_training
from unetcli.training.init_weights import initialise_from
from unetcli.training.losses import DeepSupervisionLoss, DiceCELoss, RegionDiceBCELoss
from unetcli.training.schedule import LRSchedule

log = logging.getLogger("unetcli")

PATCH_VOXEL_BUDGET = 96**3
"""Default 3D patches hold at most this many voxels (memory and speed on CPUs and small GPUs)."""


@dataclass
class TrainComponents:
    """The parts of one run; ``config`` is the resolved config saved with the run."""

    config: RunConfig
    model: SegmentationNetwork
    """The network itself: what validation, checkpoints and prediction use."""
    train_model: torch.nn.Module
    """What the training step calls: ``model`` wrapped in DistributedDataParallel under torchrun."""
    memory_format: torch.memory_format
    patch: list[int]
    train_names: list[str]
    val_names: list[str]
    sampler: PatchSampler
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: Any
    """torch's GradScaler (:func:`unetcli.runtime.grad_scaler`)."""
    metadata: dict[str, Any]


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.Optimizer:
    t = cfg.train
    fused = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if t.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay, **fused)
    return torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, **fused)


def resolve_model_config(cfg: RunConfig, dataset: Dataset) -> RunConfig:
    """A copy of ``cfg`` with the model's dims, channels and classes (and the data's class names) taken from the data."""
    cfg = copy.deepcopy(cfg)
    m = cfg.model
    for key, value in (("spatial_dims", dataset.spatial_dims), ("in_channels", dataset.in_channels),
                       ("out_channels", dataset.num_classes)):
        current = getattr(m, key)
        if current is not None and current != value:
            raise ConfigError(f"model.{key} is {current} but the data has {value}",
                              hint=f"remove model.{key} from the config to take it from the data")
        setattr(m, key, value)
    if dataset.regions is None and dataset.ignore_index is None:
        # The stored classes are the outputs; with regions or an ignore label they differ, and the
        # data's dataset.json (read again on resume) stays the one place that declares them.
        cfg.data.num_classes = dataset.num_classes
        cfg.data.label_names = dataset.label_names
    return cfg


def make_loss(cfg: RunConfig, dataset: Dataset, model: SegmentationNetwork | None = None) -> torch.nn.Module:
    """Softmax Dice + CE over classes, or sigmoid Dice + BCE over regions; the ignore label left out of both;
    over every output of a deep-supervised ``model`` (``train.deep_supervision``)."""
    t = cfg.train
    loss: torch.nn.Module
    if dataset.regions is not None:
        loss = RegionDiceBCELoss(dataset.regions, dice_weight=t.dice_weight, bce_weight=t.ce_weight,
                                 ignore_index=dataset.ignore_index)
    else:
        loss = DiceCELoss(include_background=t.dice_include_background, dice_weight=t.dice_weight, ce_weight=t.ce_weight,
                          ignore_index=dataset.ignore_index)
    strides = getattr(model, "level_strides", None)
    return DeepSupervisionLoss(loss, strides()) if t.deep_supervision and strides is not None else loss


def resolve_patch_size(cfg: RunConfig, dataset: Dataset, model: SegmentationNetwork) -> list[int]:
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
        # Up to one pooling step above the largest image is fine (images are padded to the patch, and
        # a planned patch is the median image padded to what the network takes); more is a mistake.
        if all(p > s for p, s in zip(patch, model.valid_input_size(spatial))):
            raise ConfigError(
                f"train.patch_size {patch} is larger than every image (largest {spatial})",
                hint="use a patch no larger than the images, or leave train.patch_size unset",
            )
        fixed = list(model.valid_input_size(patch))
        if fixed != patch:
            log.info("patch size %s rounded up to %s, a size the network takes", patch, fixed)
        return fixed
    if dataset.spatial_dims == 3:
        return default_patch_3d([c.image.shape[1:] for c in dataset.cases], model)
    return list(model.input_size_for_output(spatial))


def default_patch_3d(shapes: list[tuple[int, ...]], model: SegmentationNetwork, budget: int = PATCH_VOXEL_BUDGET) -> list[int]:
    """nnU-Net-like default: the median case shape, shrunk along its longest axis (in steps of
    what that axis must be a multiple of) until it fits ``budget``."""
    patch = [int(v) for v in np.median(np.asarray(shapes), axis=0)]
    step = model.size_multiple
    while int(np.prod(patch)) > budget:
        axis = int(np.argmax(patch))
        patch[axis] = max(step[axis], patch[axis] - step[axis])
    return list(model.input_size_for_output(patch))


def grid_spacing(dataset: Dataset) -> list[float] | None:
    """Voxel spacing (mm) per spatial axis of the grid the cases were resampled to (the target
    spacing; without the slice axis for 2D-on-3D); ``None`` for PNG data (square pixels)."""
    preprocessing = dataset.preprocessing
    if not preprocessing or "target_spacing" not in preprocessing:
        return None
    spacing = [float(s) for s in preprocessing["target_spacing"]]
    if preprocessing.get("slice_axis") is not None:
        del spacing[int(preprocessing["slice_axis"])]
    return spacing


def default_batch_size(cfg: RunConfig, spatial_dims: int) -> int:
    return cfg.train.batch_size or (8 if spatial_dims == 2 else 2)


def default_num_workers(cfg: RunConfig) -> int:
    if cfg.train.num_workers is not None:
        return cfg.train.num_workers
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(4, cores // 2)


def build_components(cfg: RunConfig, dataset: Dataset, layout: str, device: torch.device, precision: str,
                     split: tuple[list[str], list[str]] | None = None, resumed: bool = False) -> TrainComponents:
    """Build a run's parts from ``cfg`` (not modified) and the loaded data.

    The order matters for reproducibility: the network's initial weights are the first draw from
    torch's generator after seeding. ``split`` (a resumed run's own, or a cross-validation fold)
    replaces the seeded split; a ``resumed`` run restores its weights instead of ``train.init``.
    """
    cfg = resolve_model_config(cfg, dataset)
    t = cfg.train
    model = build_model(cfg.model, deep_supervision=t.deep_supervision)
    if t.init and not resumed:
        initialise_from(model, t.init, cfg.model)
    sync_batch_norm(model, device)
    patch = resolve_patch_size(cfg, dataset, model)
    t.patch_size = patch
    t.batch_size = default_batch_size(cfg, dataset.spatial_dims)
    spacing = grid_spacing(dataset)
    resolve_augmentation(t, dataset.spatial_dims, thick_slices=is_thick_slice(spacing))
    check_batch_divides(t.batch_size)
    case_names = [c.name for c in dataset.cases]
    if split is not None:
        train_names, val_names = (expand_to_cases(names, case_names) for names in split)
    else:
        train_names, val_names = split_cases(case_names, cfg.data.val_fraction,
                                             t.seed if cfg.data.split_seed is None else cfg.data.split_seed)
    model.to(device)
    fmt = memory_format(dataset.spatial_dims, resolve_channels_last(t.channels_last, device))
    model.to(memory_format=fmt)
    train_model = wrap_for_training(model, device, frozen_parts=t.freeze_encoder_epochs > 0)
    by_name = {c.name: c for c in dataset.cases}
    sampler = PatchSampler(
        [by_name[n] for n in train_names], patch, t.batch_size, num_classes=dataset.num_classes,
        margin=model.margin, foreground_fraction=t.foreground_fraction, flips=t.flips, rotate90=t.rotate90,
        rotate_scale_prob=t.rotate_scale_prob, intensity_jitter=t.intensity_jitter,
        intensity=IntensityAugmentation.from_config(t),
        seed=t.seed, foreground=dataset.regions, ignore_index=dataset.ignore_index,
        elastic_prob=t.elastic_prob, spacing=spacing,
    )
    metadata = {
        "spatial_dims": dataset.spatial_dims, "in_channels": dataset.in_channels, "num_classes": dataset.num_classes,
        "label_values": dataset.label_values, "label_names": dataset.label_names, "channel_names": dataset.channel_names,
        "normalization": cfg.data.normalization, "foreground_mask": cfg.data.foreground_mask, "patch_size": patch, "layout": layout,
        "file_format": dataset.file_format, "preprocessing": dataset.preprocessing,
        "regions": dataset.regions, "ignore_index": dataset.ignore_index,
    }
    return TrainComponents(
        config=cfg, model=model, train_model=train_model, memory_format=fmt, patch=patch, train_names=train_names, val_names=val_names,
        sampler=sampler,
        loss_fn=make_loss(cfg, dataset, model),
        optimizer=make_optimizer(model, cfg, device),
        schedule=LRSchedule.new(t.schedule, t.epoch_limit * t.iterations_per_epoch, t.warmup_iterations, t.time_limit),
        scaler=grad_scaler(device, precision),
        metadata=metadata,
    )
