"""``unet compare``, the plan: which variants and seeds are trained on which data, with which config.

Every variant (``concat``, ``add``, ``none``, ``valid-crop``) is trained with the same config,
budget, train/validation split and seeds; only its :data:`VARIANTS` keys and the seed differ.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unetcli.config import RunConfig, apply_overrides, config_to_dict
from unetcli.errors import ConfigError, DataError
from unetcli.workflows.demo import DEMOS, demo_data_dir, demo_label_names

VARIANTS: dict[str, dict[str, str]] = {
    "concat": {"model.skip": "concat", "model.padding": "same"},
    "add": {"model.skip": "add", "model.padding": "same"},
    "none": {"model.skip": "none", "model.padding": "same"},
    "valid-crop": {"model.skip": "concat", "model.padding": "valid"},
}
"""Variant name -> the config keys it sets; everything else is the same for all variants."""
DEFAULT_VARIANTS = "concat,add,none,valid-crop"
REFERENCE = "concat"
DEMO_OVERRIDES: dict[str, object] = {
    "model.features": [16, 32, 64, 128], "train.epochs": 5, "train.iterations_per_epoch": 20,
    "train.warmup_iterations": 20,
}
"""``unet compare --demo`` budget: 100 steps of batch 8 per run. 4 variants x 3 seeds took 14.9 min
with one thread on a shared, loaded 2-core machine (13.5 min CPU); estimated 8-12 min on 2 quiet
cores (per-step CPU time relative to concat: add 0.8, none 0.75, valid-crop 1.3)."""
PLAN_IGNORED_KEYS = (("train", "device"), ("train", "num_workers"), ("train", "num_threads"),
                     ("train", "checkpoint_interval"))
"""Config keys left out of the plan check, so that a study may continue elsewhere. The thread count
can change the floating-point results (runs are reproducible for a fixed count); each run records its own."""


def parse_variants(text: str) -> list[str]:
    """``"concat,add"`` -> ``["concat", "add"]``; unknown, repeated or fewer than two names are refused."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"--skip: unknown variant(s) {', '.join(repr(n) for n in unknown)}; "
                          f"choose from {', '.join(VARIANTS)}", hint=f"e.g. --skip {DEFAULT_VARIANTS}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--skip '{text}' names a variant twice")
    if len(names) < 2:
        raise ConfigError(f"--skip '{text}': a comparison needs at least two variants", hint="e.g. --skip concat,none")
    return names


@dataclass(frozen=True)
class StudyData:
    """Where a study trains (``train``) and what it predicts and scores (``test_images`` vs ``test_labels``)."""

    train: Path
    test_images: Path
    test_labels: Path
    label_names: list[str] | None = None


def _test_pair(folder: Path) -> tuple[Path, Path] | None:
    for images, labels in (("images", "masks"), ("imagesTs", "labelsTs")):
        if (folder / images).is_dir() and (folder / labels).is_dir():
            return folder / images, folder / labels
    return None


def resolve_study_data(data: Path | None, test: Path | None = None, demo: bool = False) -> StudyData:
    """``DATA/train`` + ``DATA/test``, or ``DATA`` (nnU-Net, with ``imagesTs`` + ``labelsTs``), or ``DATA`` + ``--test``."""
    if demo:
        if data is not None or test is not None:
            raise ConfigError("--demo uses the shipped demo data: do not pass DATA or --test")
        spec, root = DEMOS["2d"], demo_data_dir("2d")
        return StudyData(root / spec.train, root / spec.test_images, root / spec.test_labels, demo_label_names("2d"))
    if data is None:
        raise ConfigError("missing the DATA folder", hint="unet compare DATA [--test TEST] --out DIR, or unet compare --demo")
    if not data.is_dir():
        raise DataError(f"{data}: data folder not found")
    if test is not None:
        pair = _test_pair(test)
        if pair is None:
            raise DataError(f"{test}: --test needs images/ + masks/ (or imagesTs/ + labelsTs/) inside")
        return StudyData(data, *pair)
    if (data / "train").is_dir() and (data / "test").is_dir():
        pair = _test_pair(data / "test")
        if pair is None:
            raise DataError(f"{data / 'test'}: needs images/ + masks/ (or imagesTs/ + labelsTs/) inside")
        return StudyData(data / "train", *pair)
    if (data / "imagesTs").is_dir() and (data / "labelsTs").is_dir():
        return StudyData(data, data / "imagesTs", data / "labelsTs")
    raise DataError(f"{data}: no held-out cases found (no train/ + test/, no imagesTs/ + labelsTs/)",
                    hint="pass --test DIR with images/ + masks/, or lay DATA out as DATA/train and DATA/test")


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.variant}_seed{self.seed}"


@dataclass
class Study:
    variants: list[str]
    seeds: list[int]
    data: StudyData
    config: RunConfig
    """The shared config; each run sets its variant's keys, ``train.seed`` and ``data.split_seed``."""

    @property
    def reference(self) -> str:
        return REFERENCE if REFERENCE in self.variants else self.variants[0]

    @property
    def split_seed(self) -> int:
        return self.config.data.split_seed if self.config.data.split_seed is not None else self.config.train.seed

    def runs(self) -> list[RunSpec]:
        """Variant by variant (all seeds of one variant, then the next)."""
        return [RunSpec(v, s) for v in self.variants for s in self.seeds]

    def run_config(self, spec: RunSpec) -> RunConfig:
        return apply_overrides(self.config, {**VARIANTS[spec.variant], "train.seed": spec.seed,
                                             "data.split_seed": self.split_seed})

    def fingerprint(self) -> dict[str, Any]:
        """What must match for a rerun to continue the study (JSON-ready)."""
        cfg = config_to_dict(self.config)
        for section, key in PLAN_IGNORED_KEYS:
            cfg[section].pop(key, None)
        return json.loads(json.dumps({
            "variants": self.variants, "seeds": self.seeds, "split_seed": self.split_seed,
            "train_data": str(self.data.train.resolve()), "test_images": str(self.data.test_images.resolve()),
            "test_labels": str(self.data.test_labels.resolve()), "config": cfg,
        }))


def make_study(variants: Sequence[str], n_seeds: int, cfg: RunConfig, data: StudyData) -> Study:
    """Seeds ``train.seed .. train.seed + n_seeds - 1``; the split seed stays fixed for all runs."""
    if n_seeds < 1:
        raise ConfigError(f"--seeds {n_seeds} must be at least 1")
    cfg = copy.deepcopy(cfg)
    if data.label_names and not cfg.data.label_names:
        cfg.data.label_names = list(data.label_names)
    if cfg.data.split_seed is None:
        cfg.data.split_seed = cfg.train.seed
    base = cfg.train.seed
    return Study(list(variants), [base + i for i in range(n_seeds)], data, cfg)
