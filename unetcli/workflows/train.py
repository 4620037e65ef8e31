"""``unet train`` and the configuration every training command starts from: the user's config
file, ``--set`` and flags over the defaults, then the plan (unless ``--no-plan``), keeping every
key the user gave."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unetcli.config import ConfigSources, RunConfig, dump_yaml, parse_set_option
from unetcli.errors import ConfigError
from unetcli.planning.apply import NETWORK_KEYS, planned_run_config, short_run_reason
from unetcli.planning.plan_file import CONFIGURATIONS, plan_to_dict
from unetcli.training.distributed import launched_by_torchrun
from unetcli.training.resume import RESUME_KEYS, resume_training
from unetcli.training.trainer import TrainResult, train

log = logging.getLogger("unetcli")


@dataclass(frozen=True)
class PlanChoice:
    """How a training command is planned: ``plan_file`` (an edited ``plans.yaml``), ``preset``
    (plain | resenc-m | resenc-l), ``no_plan`` (the fixed built-in network)."""

    plan_file: Path | None = None
    preset: str | None = None
    no_plan: bool = False


def planned_config(data: Path, sources: ConfigSources, choice: PlanChoice) -> tuple[RunConfig, dict[str, str], set[str]]:
    """The run config (planned unless ``no_plan``), the plan as a run file, and the keys the user gave.
    A ``sources.config`` that names a plan configuration (2d, 3d_fullres, 3d_lowres) picks it.
    A short 3D run on thick slices, planned from the data with no configuration, preset or network
    of the user's, trains the fixed network (:func:`unetcli.planning.rules.prefers_fixed_network`)."""
    named = sources.config is not None and str(sources.config) in CONFIGURATIONS
    configuration = str(sources.config) if named else None
    if named:
        sources = ConfigSources(None, sources.sets, sources.flags, sources.defaults)
    if choice.no_plan and (choice.plan_file or configuration or choice.preset):
        raise ConfigError("--no-plan cannot be combined with --plan, --preset or a plan configuration (--config 2d/3d_*)")
    cfg, explicit = sources.resolve(), sources.explicit_keys()
    if choice.no_plan:
        return cfg, {}, explicit
    planned, saved, fresh, name = planned_run_config(data, cfg, explicit, choice.plan_file, configuration, choice.preset or "plain")
    if fresh is not None and configuration is None and choice.preset is None and not explicit & NETWORK_KEYS:
        spacing = cfg.data.target_spacing if "data.target_spacing" in explicit else None
        reason = short_run_reason(fresh.config_for(name), cfg.train, spacing, use_estimate=not launched_by_torchrun())
        if reason:
            log.info("plan: not used: %s (--config %s trains the plan's network anyway)", reason, name)
            return cfg, {}, explicit
    cfg = planned
    log.info("plan: configuration %s from %s: %s", name, saved.source, saved.config_values(name))
    values = plan_to_dict(fresh) if fresh is not None else {"default": saved.default, "configurations": {
        n: {"config": c} for n, c in saved.configurations.items()}}
    return cfg, {"plans.yaml": dump_yaml({"used": name, "source": saved.source, **values}, flow_lists=True)}, explicit


def train_new_run(data: Path | None, sources: ConfigSources, choice: PlanChoice, out: Path, overwrite: bool,
                  progress: bool) -> TrainResult:
    if data is None:
        raise ConfigError("missing the DATA folder to train on",
                          hint="unet train DATA [--out RUN]; or continue a run: unet train --resume RUN")
    cfg, run_files, _ = planned_config(data, sources, choice)
    return train(data, cfg, out, overwrite=overwrite, progress=progress, run_files=run_files)


RESUME_FLAGS = {"train.epochs": "--epochs", "train.time_limit": "--time", "train.device": "--device",
                "train.precision": "--precision", "train.num_threads": "--num-threads", "train.trackers": "--log-to"}
"""The options of ``unet train`` that a resumed run may take (their config keys are in RESUME_KEYS)."""


def resume_run(run: Path, data: Path | None, refused_options: Sequence[str], sets: Sequence[str],
               flags: dict[str, Any], progress: bool) -> TrainResult:
    """Continue ``run``; ``refused_options`` are the options given that would change its config."""
    parsed = dict(parse_set_option(item) for item in sets)
    refused = list(refused_options) + [f"--set {key}" for key in parsed if key not in RESUME_KEYS]
    if refused:
        may = ", ".join(RESUME_FLAGS.values()) + " and --set " + ", ".join(k for k in RESUME_KEYS if k not in RESUME_FLAGS)
        raise ConfigError(f"{', '.join(refused)} cannot be used with --resume: a resumed run keeps the config stored in its checkpoint",
                          hint=f"with --resume only {may} may change; to change anything else, start a new run (--out)")
    overrides = {**parsed, **{key: flags.get(key) for key in RESUME_FLAGS}}
    return resume_training(run, data, overrides, progress=progress)
