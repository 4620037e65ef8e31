"""``plans.yaml``: a plan on disk, readable and hand-editable.

Each configuration's ``config`` block holds config keys only (``data``, ``model``, ``train``), so
it is a valid (partial) ``unet train --config`` file too; ``estimate`` is for people and ignored
when read back.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from unetcli.atomic import atomic_write_text
from unetcli.config import config_from_dict, dump_yaml, yaml_problem
from unetcli.errors import ConfigError, OutputError
from unetcli.planning.planner import ConfigurationPlan, Plan

PLAN_FORMAT = 1
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


@dataclass
class SavedPlan:
    """A plan as ``unet train`` uses it: config keys per configuration."""

    default: str
    configurations: dict[str, dict[str, Any]]
    source: str
    """Where it came from (a file, or "planned from DATA"), for the log and the run folder."""

    def config_values(self, name: str | None) -> dict[str, Any]:
        chosen = name or self.default
        if chosen not in self.configurations:
            raise ConfigError(f"{self.source}: no configuration '{chosen}' (it has {', '.join(self.configurations)})",
                              hint=f"pass --config {' or --config '.join(self.configurations)}")
        return copy.deepcopy(self.configurations[chosen])


def estimate(c: ConfigurationPlan) -> dict[str, Any]:
    return {"spacing": c.spacing, "median_shape": c.median_shape, "normalization": c.normalization,
            "parameters": c.parameters, "memory_gb": c.memory_gb, "seconds_per_step": c.seconds_per_step,
            "notes": c.notes}


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    return {
        "unetcli_plan": PLAN_FORMAT, "default": plan.default, "preset": plan.preset, "budget": plan.budget,
        "configurations": {name: {"config": c.to_config(), "estimate": estimate(c)} for name, c in plan.configurations.items()},
        "fingerprint": plan.fingerprint,
    }


def saved_plan(plan: Plan, source: str) -> SavedPlan:
    return SavedPlan(plan.default, {n: c.to_config() for n, c in plan.configurations.items()}, source)


def check_plan_output(path: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file unless ``overwrite``, and never one that is not a plan
    (a config, an image): a typo in ``--out`` must not destroy an input."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a folder", hint="give a file name, e.g. --out plans.yaml")
    if not path.exists():
        return
    if not overwrite:
        raise OutputError(f"{path}: already exists", hint="pass --overwrite to replace it, or choose another --out")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
        is_plan = isinstance(values, dict) and "unetcli_plan" in values
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        is_plan = False
    if not is_plan:
        raise OutputError(f"{path}: exists and is not a plan written by unet plan; not replacing it", hint="choose another --out")


def write_plan(plan: Plan, path: Path, header: str) -> None:
    text = dump_yaml(plan_to_dict(plan), flow_lists=True)
    atomic_write_text(path, f"# {header}\n# Edit a configuration's config block and pass it back: unet train DATA --plan {path.name}\n{text}")


def read_plan(path: Path) -> SavedPlan:
    """Read and validate ``plans.yaml`` (each configuration must be a valid config)."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read plan file {path}: {exc.strerror or exc}", hint="pass a plans.yaml written by unet plan") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"plan file {path} is not UTF-8 text (byte {exc.start})", hint="pass a plans.yaml written by unet plan") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"plan file {path} is not valid YAML{yaml_problem(exc)}", hint="pass a plans.yaml written by unet plan") from exc
    if not isinstance(values, dict) or not isinstance(values.get("configurations"), dict):
        raise ConfigError(f"{path} is not a plan: it has no 'configurations' mapping",
                          hint="write one with `unet plan DATA --out plans.yaml`; a config file goes to --config")
    version = values.get("unetcli_plan", PLAN_FORMAT)
    if version != PLAN_FORMAT:
        raise ConfigError(f"{path}: plan format {version!r} is not supported by this unetcli (it reads format {PLAN_FORMAT})",
                          hint="write the plan again with `unet plan DATA --out plans.yaml`, or use the unetcli version that wrote it")
    configurations = {}
    for name, entry in values["configurations"].items():
        config = entry.get("config") if isinstance(entry, dict) else None
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: configuration '{name}' has no 'config' mapping")
        try:
            config_from_dict(copy.deepcopy(config))
        except ConfigError as exc:
            raise ConfigError(f"{path}: configuration '{name}': {exc.message}", exc.hint) from exc
        configurations[str(name)] = config
    default = values.get("default") or next(iter(configurations), None)
    if default not in configurations:
        raise ConfigError(f"{path}: default configuration '{default}' is not among {list(configurations)}")
    return SavedPlan(str(default), configurations, str(path))
