"""Plan a dataset and apply a plan's configuration to a run's config.

Precedence, lowest first: built-in defaults < the plan < ``--config`` file < ``--set`` < flags.
A key the user gave (in a config file, ``--set`` or a flag) is never replaced by the plan. The
network's shape (``features``, ``kernel_sizes``, ``strides``) is one unit: when the user gives any
of them the plan's are all left out, and so is the plan's patch (made for the plan's pooling).
Fine-tuning (``train.init``) keeps the configured network: the plan's ``model`` keys are left out.
Whenever the network is not the plan's, the plan's batch size (what fits the budget with the
plan's network) goes too, and the default batch applies.
"""

from __future__ import annotations

import math

import logging
from collections.abc import Iterable
from pathlib import Path

from unetcli.config import RunConfig, TrainConfig, apply_overrides
from unetcli.data.dataset import discover_dataset
from unetcli.errors import ConfigError
from unetcli.planning.budget import default_budget
from unetcli.planning.fingerprint import compute_fingerprint
from unetcli.planning.plan_file import SavedPlan, read_plan, saved_plan
from unetcli.planning.planner import PRESETS, ConfigurationPlan, Plan, make_plan
from unetcli.planning.rules import SHORT_THICK_SLICE_RUN, prefers_fixed_network
from unetcli.runtime import resolve_device, resolve_precision

log = logging.getLogger("unetcli")

TOPOLOGY_KEYS = ("model.features", "model.kernel_sizes", "model.strides")
ENCODER_KEYS = ("model.encoder", "model.blocks_per_level", "model.decoder_convs")
NETWORK_KEYS = frozenset({*TOPOLOGY_KEYS, *ENCODER_KEYS, "train.init"})
"""Any of these given by the user makes the network theirs, not the plan's."""


PLANNING_KEYS = ("data.crop_to_nonzero", "train.device", "train.precision", "train.num_threads")
"""The config keys ``unet plan`` itself uses; every other key is what the plan decides (or ignores)."""


def check_planning_keys(keys: Iterable[str]) -> None:
    """Refuse ``unet plan --set`` keys the planner does not use: the printed plan would silently
    differ from what the user asked for (a train key wins over the plan in ``unet train`` instead)."""
    unused = sorted(k for k in keys if k not in PLANNING_KEYS)
    if unused:
        raise ConfigError(f"--set {', '.join(unused)}: unet plan does not use {'this key' if len(unused) == 1 else 'these keys'}; "
                          "the plan chooses the network, patch, spacing and batch itself",
                          hint="pass the key to `unet train --plan plans.yaml --set ...` (it wins over the plan), or edit the "
                               f"configuration in plans.yaml; unet plan takes --set {', '.join(PLANNING_KEYS)}")


def plan_dataset(data: Path, cfg: RunConfig, memory_gb: float | None = None, step_seconds: float | None = None,
                 preset: str = "plain", remeasure: bool = False) -> Plan:
    """Fingerprint ``data`` (cached) and plan it for the device and precision ``cfg`` trains with
    (``remeasure``: this CPU's speed again, for the seconds-per-step estimates)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset '{preset}'", hint=f"use one of {', '.join(PRESETS)}")
    for option, value, unit in (("--memory", memory_gb, "GB"), ("--step-seconds", step_seconds, "seconds")):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{option} must be a positive number of {unit}, got {value}", hint=f"e.g. {option} 2")
    files = discover_dataset(data)
    fingerprint = compute_fingerprint(files, cfg.data)
    device = resolve_device(cfg.train.device)
    bytes_per_element = 4 if resolve_precision(cfg.train.precision, device) == "fp32" else 2
    budget = default_budget(device, memory_gb, step_seconds, bytes_per_element, remeasure)
    num_classes = max(int(k) for k in fingerprint.class_fractions) + 1 if fingerprint.class_fractions else 2
    return make_plan(fingerprint, budget, max(num_classes, 2), preset)


def choose_configuration(plan: SavedPlan, configuration: str | None, explicit: Iterable[str]) -> str:
    """The named configuration; else ``2d`` when the user asked for slices (``data.slice_axis``); else the default."""
    if configuration:
        return configuration
    if "data.slice_axis" in set(explicit) and "2d" in plan.configurations:
        return "2d"
    return plan.default


def apply_plan(cfg: RunConfig, plan: SavedPlan, configuration: str | None, explicit: Iterable[str]) -> tuple[RunConfig, str]:
    """``cfg`` with the chosen configuration's keys, except those the user gave."""
    explicit = set(explicit)
    name = choose_configuration(plan, configuration, explicit)
    values = plan.config_values(name)
    planned = {f"{section}.{key}": value for section, keys in values.items() for key, value in keys.items()}
    dropped = [k for k in planned if k in explicit]
    if explicit & set(TOPOLOGY_KEYS):  # the plan's patch is a multiple of the plan's pooling: it goes too
        dropped += [k for k in (*TOPOLOGY_KEYS, "train.patch_size") if k in planned and k not in explicit]
    if explicit & set(ENCODER_KEYS):
        dropped += [k for k in ENCODER_KEYS if k in planned and k not in explicit]
    if "train.init" in explicit:  # fine-tuning: the network is the pretrained one's, as configured
        dropped += [k for k in planned if k.startswith("model.") and k != "model.spatial_dims"]
    if explicit & NETWORK_KEYS and "train.batch_size" in planned:
        dropped.append("train.batch_size")  # sized for the plan's network (e.g. 2 for a 32-512 2D net, not 8 for 16-128)
    kept = {k: v for k, v in planned.items() if k not in dropped}
    if dropped:
        log.info("plan: keeping your %s", ", ".join(sorted(set(dropped))))
    try:
        return apply_overrides(cfg, kept), name
    except ConfigError as exc:
        raise ConfigError(f"{plan.source}: configuration '{name}': {exc.message}", exc.hint) from exc


def planned_run_config(data: Path, cfg: RunConfig, explicit: Iterable[str], plan_file: Path | None,
                       configuration: str | None, preset: str = "plain") -> tuple[RunConfig, SavedPlan, Plan | None, str]:
    """The config ``unet train`` runs with: ``plan_file``'s configuration, or a fresh plan of ``data``."""
    if plan_file is not None:
        saved, plan = read_plan(plan_file), None
    else:
        plan = plan_dataset(data, cfg, preset=preset)
        saved = saved_plan(plan, f"plan of {data}")
    if configuration and configuration not in saved.configurations:
        saved.config_values(configuration)  # raises, naming the configurations there are
    out, name = apply_plan(cfg, saved, configuration, explicit)
    return out, saved, plan, name


def expected_iterations(train: TrainConfig, seconds_per_step: float | None) -> float | None:
    """The iterations a run trains: epochs x iterations per epoch, or what its time budget fits at
    ``seconds_per_step`` (the plan's estimate on this CPU), whichever is fewer; None when only a
    time budget limits the run and there is no estimate (a GPU)."""
    bounds = [float(train.epochs * train.iterations_per_epoch)] if train.epochs is not None else []
    if train.time_limit is not None:
        if seconds_per_step:
            bounds.append(train.time_limit / seconds_per_step)
        elif not bounds:
            return None
    return min(bounds) if bounds else None


def short_run_reason(config: ConfigurationPlan, train: TrainConfig, spacing: list[float] | None = None,
                     use_estimate: bool = True) -> str | None:
    """Why a run should train the fixed network instead of ``config``'s (:func:`prefers_fixed_network`),
    or None when the plan's network is the better choice. ``spacing``: the grid the run trains on
    when the user set one (``data.target_spacing``), else the plan's. ``use_estimate=False`` ignores
    the step-time estimate, so that a time budget alone keeps the plan (the processes of a
    multi-process run each read their CPU's speed and must not choose different networks)."""
    spacing = spacing or config.spacing
    seconds = config.seconds_per_step if use_estimate else None
    iterations = expected_iterations(train, seconds)
    if iterations is None or not prefers_fixed_network(config.spatial_dims, spacing, iterations):
        return None
    budget = f"{iterations:,.0f} iterations"
    if train.time_limit is not None and seconds and iterations == train.time_limit / seconds:
        budget = f"about {budget} in --time {train.time_limit / 60:g}m (at the plan's estimated {seconds:.2f} s per step)"
    grid = " x ".join(f"{s:g}" for s in spacing)
    return (f"thick slices ({grid} mm) and {budget}, at most {SHORT_THICK_SLICE_RUN:,}: "
            "the fixed network trains better than the plan's in a run this short")
