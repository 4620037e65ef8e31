"""From a fingerprint and a budget to configurations (``2d``, ``3d_fullres``, ``3d_lowres``), each a
set of config keys (``data.*``, ``model.*``, ``train.*``) that ``unet train`` applies."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from unetcli.planning import rules
from unetcli.data.spacing import fullres_spacing, out_of_plane_axis
from unetcli.models.unet import resolve_blocks
from unetcli.planning.budget import Budget
from unetcli.planning.fingerprint import Fingerprint

PRESETS: dict[str, dict[str, Any]] = {
    "plain": {"encoder": "plain"},
    "resenc-m": {"encoder": "residual"},
    "resenc-l": {"encoder": "residual", "memory_scale": 3.0},
}
"""Network presets: ``resenc-l`` plans with 3x the memory budget of ``resenc-m`` (nnU-Net's L preset
targets 24 GB where M targets 8 GB), so it gets larger patches on the same data."""


@dataclass
class ConfigurationPlan:
    name: str
    spatial_dims: int
    spacing: list[float]
    median_shape: list[int]
    patch: list[int]
    batch_size: int
    features: list[int]
    kernel_sizes: list[list[int]]
    strides: list[list[int]]
    normalization: list[str]
    encoder: str
    blocks_per_level: list[int] | None
    memory_gb: float
    seconds_per_step: float | None
    parameters: int
    slice_axis: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_config(self) -> dict[str, dict[str, Any]]:
        """The configuration as config keys: a plan is also a (partial) config."""
        mri = [n for n in self.normalization if n != "ct"]
        data: dict[str, Any] = {"normalization": mri[0] if mri else "zscore"}
        if self.spatial_dims == 3 or self.slice_axis is not None:
            data["target_spacing"] = self.full_spacing
        if self.slice_axis is not None:
            data["slice_axis"] = self.slice_axis
        model: dict[str, Any] = {"spatial_dims": self.spatial_dims, "features": self.features,
                                 "kernel_sizes": self.kernel_sizes, "strides": self.strides,
                                 "norm": "instance", "encoder": self.encoder}
        if self.encoder == "residual":
            model["blocks_per_level"] = self.blocks_per_level
        return {"data": data, "model": model, "train": {"patch_size": self.patch, "batch_size": self.batch_size}}

    full_spacing: list[float] = field(default_factory=list)
    """3D spacing the volumes are resampled to (for ``2d`` on 3D data: the in-plane spacing plus the slice axis')."""


@dataclass
class Plan:
    fingerprint: dict[str, Any]
    budget: str
    preset: str
    configurations: dict[str, ConfigurationPlan]
    default: str

    def config_for(self, name: str | None) -> ConfigurationPlan:
        return self.configurations[name or self.default]


def _network(topology: rules.Topology, spatial_dims: int, in_channels: int, num_classes: int,
             encoder: str) -> tuple[rules.Network, list[int] | None]:
    levels = topology.levels
    features = rules.features_per_level(levels, spatial_dims)
    if encoder == "residual":
        blocks = resolve_blocks(levels, None)
        convs = [2 * b + (1 if i == 0 else 0) for i, b in enumerate(blocks)]
        return rules.Network(features, topology.kernel_sizes, topology.strides, in_channels, num_classes, convs, 1), blocks
    return rules.Network(features, topology.kernel_sizes, topology.strides, in_channels, num_classes, [2] * levels, 2), None


def plan_configuration(name: str, spacing: list[float], median_shape: list[int], dataset_voxels: float,
                       in_channels: int, num_classes: int, budget: Budget, encoder: str) -> ConfigurationPlan:
    """Topology for the largest patch (shaped like 1/spacing, at most the median image) that the
    budget fits at batch 2, shrinking the axis with the largest patch/median ratio one pooling
    step at a time; then the batch the budget fits, capped at 5 % of the dataset."""
    dims = len(spacing)
    topo = rules.topology(spacing, rules.initial_patch(spacing, median_shape))
    net, blocks = _network(topo, dims, in_channels, num_classes, encoder)
    notes = []
    while not budget.fits(net, topo.patch, rules.MIN_BATCH):
        axis = rules.shrink_axis(topo.patch, median_shape)
        if topo.patch[axis] <= 2 * rules.MIN_FEATURE_EDGE:
            notes.append("the budget is too small even for the smallest patch")
            break
        # Shrink by the pooling multiple of the smaller patch, not the current one: a patch of 256
        # must be divisible by 64, but 224 (7 x 32) is valid too and would otherwise be skipped.
        trial = list(topo.patch)
        trial[axis] -= topo.multiple[axis]
        step = rules.topology(spacing, trial).multiple[axis]
        smaller = list(topo.patch)
        smaller[axis] = max(topo.patch[axis] - step, 1)
        topo = rules.topology(spacing, smaller)
        net, blocks = _network(topo, dims, in_channels, num_classes, encoder)
    batch = rules.batch_size(budget.largest_batch(net, topo.patch), topo.patch, dataset_voxels)
    seconds = budget.seconds(net, topo.patch, batch)
    return ConfigurationPlan(
        name=name, spatial_dims=dims, spacing=[round(s, 4) for s in spacing], median_shape=list(median_shape),
        patch=topo.patch, batch_size=batch, features=net.features, kernel_sizes=topo.kernel_sizes,
        strides=topo.strides, normalization=[], encoder=encoder, blocks_per_level=blocks,
        memory_gb=round(budget.memory(net, topo.patch, batch) / 1e9, 2),
        seconds_per_step=None if seconds is None else round(seconds, 2), parameters=rules.parameter_count(net),
        notes=notes,
    )


def _slice_axis(spacing: list[float], median_shape: list[int]) -> int:
    """``2d`` on volumes: slices across the out-of-plane axis, else axial (RAS axis 2)."""
    axis = out_of_plane_axis(spacing, median_shape)
    return 2 if axis is None else axis


def make_plan(fp: Fingerprint, budget: Budget, num_classes: int, preset: str = "plain") -> Plan:
    """Every configuration the data calls for, and the default one (``3d_fullres`` for volumes)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}")
    encoder = PRESETS[preset]["encoder"]
    scale = PRESETS[preset].get("memory_scale", 1.0)
    if scale != 1.0 and budget.memory_bytes is not None:
        budget = Budget(budget.bytes_per_element, budget.memory_bytes * scale, budget.step_seconds,
                        budget.flops_per_second, f"{budget.description} x {scale:g} ({preset})")
    elif scale != 1.0 and budget.step_seconds is not None:
        budget = Budget(budget.bytes_per_element, None, budget.step_seconds * scale, budget.flops_per_second,
                        f"{budget.description} x {scale:g} ({preset})")
    in_channels = len(fp.intensity)
    norm = [rules.normalization(m, fp.cropped_fraction) for m in fp.modalities]
    configs: dict[str, ConfigurationPlan] = {}
    if fp.spatial_dims == 2:
        configs["2d"] = _plan_2d_images(fp, budget, in_channels, num_classes, encoder)
    else:
        spacing = fullres_spacing(fp.spacings, fp.cropped_shapes)
        shapes = [rules.shape_at_spacing(c.cropped_shape, c.spacing, spacing) for c in fp.cases]
        median = [int(v) for v in np.median(np.asarray(shapes), axis=0)]
        voxels = float(sum(math.prod(s) for s in shapes))
        configs["2d"] = _plan_2d_slices(spacing, median, voxels, budget, in_channels, num_classes, encoder)
        full = plan_configuration("3d_fullres", spacing, median, voxels, in_channels, num_classes, budget, encoder)
        full.full_spacing = spacing
        configs["3d_fullres"] = full
        low = _plan_lowres(full, voxels, budget, in_channels, num_classes, encoder)
        if low is not None:
            configs["3d_lowres"] = low
    for c in configs.values():
        c.normalization = norm
    summary = {"cases": len(fp.cases), "spatial_dims": fp.spatial_dims, "channels": fp.channel_names,
               "modalities": fp.modalities, "cropped_fraction": round(fp.cropped_fraction, 3),
               "median_spacing": [round(float(v), 4) for v in np.median(np.asarray(fp.spacings), axis=0)],
               "intensity": fp.intensity, "class_fractions": fp.class_fractions}
    return Plan(summary, budget.description, preset, configs, "2d" if fp.spatial_dims == 2 else "3d_fullres")


def _plan_2d_images(fp: Fingerprint, budget: Budget, in_channels: int, num_classes: int, encoder: str) -> ConfigurationPlan:
    shapes = np.asarray(fp.cropped_shapes)
    median = [int(v) for v in np.median(shapes, axis=0)]
    plan = plan_configuration("2d", [1.0, 1.0], median, float(shapes.prod(axis=1).sum()), in_channels, num_classes,
                              budget, encoder)
    plan.full_spacing = [1.0, 1.0]
    return plan


def _plan_2d_slices(spacing: list[float], median: list[int], voxels: float, budget: Budget, in_channels: int,
                    num_classes: int, encoder: str) -> ConfigurationPlan:
    axis = _slice_axis(spacing, median)
    in_plane = [a for a in range(3) if a != axis]
    plan = plan_configuration("2d", [spacing[a] for a in in_plane], [median[a] for a in in_plane], voxels,
                              in_channels, num_classes, budget, encoder)
    plan.slice_axis, plan.full_spacing = axis, spacing
    return plan


def _plan_lowres(full: ConfigurationPlan, voxels: float, budget: Budget, in_channels: int, num_classes: int,
                 encoder: str) -> ConfigurationPlan | None:
    """A coarser spacing at which the patch covers at least a quarter of the median image; only
    when full resolution covers less and the coarser images are at most half as large."""
    if math.prod(full.patch) / math.prod(full.median_shape) >= rules.LOWRES_COVERAGE:
        return None
    spacing = list(full.spacing)
    for _ in range(200):
        spacing = rules.lowres_spacing_step(spacing)
        median = rules.shape_at_spacing(full.median_shape, full.spacing, spacing)
        ratio = math.prod(median) / math.prod(full.median_shape)
        low = plan_configuration("3d_lowres", spacing, median, voxels * ratio, in_channels, num_classes, budget, encoder)
        if math.prod(low.patch) / math.prod(median) >= rules.LOWRES_COVERAGE:
            break
    if math.prod(full.median_shape) / math.prod(low.median_shape) < 2:
        return None
    low.full_spacing = low.spacing
    return low
