"""``unet cv``: train every fold, predict its held-out cases, score all out-of-fold predictions
together, choose the postprocessing on them.

The folder ``CV`` holds ``cv.json`` (data, folds, the resolved config every fold trains with),
``splits.json``, ``fold_k/`` (a normal run folder plus ``oof/``, the predictions of its validation
cases), ``oof/`` (all out-of-fold predictions), ``metrics.csv`` + ``summary.json`` (their scores),
``folds.json`` (per fold), ``postprocessing.json`` (the choice ``unet predict CV`` applies).
Rerunning the same command continues: finished folds are skipped, a half-trained fold continues
from its ``last.pt``. Out-of-fold predictions and the ensemble use each fold's last checkpoint (the
best-by-validation one was chosen on those very cases).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import logging
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unetcli.atomic import atomic_write_text, output_folder, read_written_json, real_path
from unetcli.config import ConfigSources, RunConfig, config_from_dict, config_to_dict
from unetcli.data.dataset import discover_dataset
from unetcli.data.types import DatasetFiles
from unetcli.errors import CheckpointError, ConfigError, OutputError
from unetcli.evaluation.labels import metadata_eval_options
from unetcli.evaluation.scoring import evaluate
from unetcli.evaluation.stats import Comparison, compare_results, comparison_csv_text
from unetcli.evaluation.summary import EvalResult, write_json, write_reports
from unetcli.inference.ensemble import CV_FILE
from unetcli.inference.predict import predict
from unetcli.inference.quality_report import is_quality_file
from unetcli.checkpoint import load_checkpoint
from unetcli.runlock import LOCK_NAME, RunLock, live_holder
from unetcli.tracking import cv_group, log_cv_summary
from unetcli.training.resume import resume_training, run_progress
from unetcli.training.trainer import train
from unetcli.workflows.cv.quality import fit_cv_quality
from unetcli.workflows.cv.selection import choose_postprocessing, class_dice, fold_summaries, pooled_with_ci
from unetcli.workflows.cv.splits import Fold, kfold_splits, read_splits
from unetcli.workflows.train import PlanChoice, planned_config

log = logging.getLogger("unetcli")

CV_VERSION = 1
RUNTIME_KEYS = ("train.num_threads", "train.device", "train.num_workers", "train.trackers")
"""May differ between the processes and reruns of one cross-validation (--log-to: where it is tracked)."""


@dataclass
class CVOptions:
    folds: int = 5
    seed: int = 0
    group_by: str | None = None
    splits_file: Path | None = None
    only_fold: int | None = None
    # False in the fold processes of ``--parallel``: the parent scores once, after all of them,
    # so that two folds finishing together do not both rewrite CV/oof.
    score: bool = True

    def check(self, parallel: int | None = None) -> None:
        """The options' own consistency, before any planning or training."""
        if self.splits_file is None and self.folds < 2:
            raise ConfigError(f"--folds must be at least 2, got {self.folds}")
        if self.only_fold is not None and (self.only_fold < 0 or (self.splits_file is None and self.only_fold >= self.folds)):
            raise ConfigError(f"--fold {self.only_fold} is not a fold of this cross-validation (0..{self.folds - 1})")
        if parallel is not None and parallel < 1:
            raise ConfigError(f"--parallel must be at least 1, got {parallel}")
        if self.group_by is not None and self.splits_file is not None:
            raise ConfigError("--group-by cannot be combined with --splits: the splits file fixes the folds",
                              hint="keep a patient's scans together in the splits file itself, or drop --splits")


@dataclass
class CVResult:
    out: Path
    trained: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    oof: EvalResult | None = None
    """Scores of all out-of-fold predictions (None until every fold is done)."""
    folds: list[dict[str, Any]] = field(default_factory=list)
    postprocessing: dict[str, Any] | None = None
    pooled: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per class and ``mean``: out-of-fold mean Dice with a 95 % bootstrap CI."""


def _load_or_start(out: Path, data: Path, cfg: RunConfig, explicit: set[str], splits: list[Fold],
                   overwrite: bool) -> tuple[RunConfig, dict[str, Any]]:
    """The cross-validation's record: a new one, or the existing one when this command continues it."""
    path = out / CV_FILE
    fresh = {"version": CV_VERSION, "data": str(data.resolve()), "folds": len(splits), "config": config_to_dict(cfg)}
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder", hint="choose another --out")
    if path.is_file() and not overwrite:
        state = read_written_json(path, "cross-validation record", hint="pass --overwrite to start it again, or choose another --out")
        try:
            stored = config_from_dict(state["config"])
        except (KeyError, TypeError, ConfigError) as exc:
            raise CheckpointError(f"{path}: cross-validation record is damaged (no valid 'config')",
                                  hint="pass --overwrite to start it again, or choose another --out") from exc
        old, new = config_to_dict(stored), config_to_dict(cfg)
        differs = [k for k in sorted(explicit) if _get(old, k) != _get(new, k) and k not in RUNTIME_KEYS]
        for key in RUNTIME_KEYS:  # where and how fast a fold runs is this process's business
            section, name = key.split(".")
            setattr(getattr(stored, section), name, getattr(getattr(cfg, section), name))
        if state.get("data") != fresh["data"] or state.get("folds") != len(splits):
            differs = ["data folder or number of folds", *differs]
        if differs:
            raise OutputError(f"{out}: holds a cross-validation with other settings (differs in: {', '.join(differs)})",
                              hint="rerun with the same options to continue it, choose another --out, or pass --overwrite")
        _check_same_splits(out, splits)
        return stored, state
    if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
        if not overwrite:
            raise OutputError(f"{out}: folder is not empty and holds no {CV_FILE}", hint="choose another --out or pass --overwrite")
        if not path.is_file():  # only ever remove what an earlier `unet cv` wrote
            raise OutputError(f"{out}: is not a cross-validation folder; not replacing it", hint="choose another --out")
        _clear_cv_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(fresh, indent=1))
    return cfg, fresh


def _clear_cv_folder(out: Path) -> None:
    """``--overwrite``: remove an earlier cross-validation, but never one that a live process still
    trains or predicts into (its folds' locks), and keep this process's own lock."""
    for lock in sorted(out.rglob(LOCK_NAME)):
        holder = live_holder(lock.parent) if lock.parent != out else None
        if holder is not None:
            raise OutputError(f"{out}: {lock.parent.relative_to(out)} is being trained by another process (PID "
                              f"{holder.get('pid')}, since {holder.get('since')}); not replacing it",
                              hint="wait for it to finish or stop it, or choose another --out")
    for child in out.iterdir():
        if child.name != LOCK_NAME:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()


_HELD: set[Path] = set()
"""Cross-validation folders whose lock this process holds (the lock is taken once per command)."""


@contextlib.contextmanager
def cv_folder_lock(out: Path, options: CVOptions, overwrite: bool) -> Iterator[None]:
    """Hold ``CV/.lock`` for the block, so that two ``unet cv`` commands never write one folder and
    ``--overwrite`` never deletes one that another process is using. A single-fold process
    (``--fold k``, e.g. one of ``--parallel``'s) takes its fold's lock only, and refuses a folder
    whose lock another command (not its parent) holds. A folder this block created and left
    empty is removed again."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder", hint="choose another --out")
    key = real_path(out)
    if key in _HELD:
        yield
        return
    if options.only_fold is not None and not overwrite:
        holder = live_holder(out) if out.is_dir() else None
        if holder is not None and holder.get("pid") != os.getppid():
            raise OutputError(f"{out} is being written by another unet cv (PID {holder.get('pid')}, since {holder.get('since')})",
                              hint="wait for it to finish, or choose another --out")
        yield
        return
    with output_folder(out, "cross-validation folder", hint="choose a writable --out"):
        _HELD.add(key)
        try:
            with RunLock(out):
                yield
        finally:
            _HELD.discard(key)


def _get(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part, {}) if isinstance(values, dict) else {}
    return values


def _check_same_splits(out: Path, splits: list[Fold]) -> None:
    path = out / "splits.json"
    hint = "rerun with the options that made this folder, or pass --overwrite"
    if path.is_file() and read_written_json(path, "record of the folds", hint).get("folds") != splits:
        raise OutputError(f"{path}: the folds differ from this command's (another --seed, --group-by or --splits?)",
                          hint="rerun with the options that made this folder, or pass --overwrite")


def fold_time_budget(total: float | None, per_fold: float | None, folds: int, only_fold: int | None,
                     parallel: int | None, configurations: int = 1) -> float | None:
    """Seconds of training per fold: ``per_fold``, or the whole cross-validation's ``total`` shared out
    over the folds of every configuration (folds run ``parallel`` at a time share a slot; a single
    ``--fold`` run takes its share, as if every fold ran on its own machine one after another)."""
    if total is not None and per_fold is not None:
        raise ConfigError("--time and --time-per-fold cannot be combined", hint="give the whole budget (--time) or each fold's (--time-per-fold)")
    if total is None:
        return per_fold
    slots = math.ceil(max(1, folds) / max(1, parallel or 1)) if only_fold is None else max(1, folds)
    return total / (slots * max(1, configurations))


def make_splits(files: DatasetFiles, options: CVOptions) -> list[Fold]:
    names = [c.name for c in files.cases]
    if options.splits_file is not None:
        return read_splits(options.splits_file, names)
    return kfold_splits(names, options.folds, options.seed, options.group_by)


def _link_inputs(files: DatasetFiles, names: list[str], folder: Path) -> Path:
    """A folder of links to the image files of ``names`` (the input of one fold's prediction)."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    wanted = set(names)
    for case in files.cases:
        if case.name in wanted:
            for image in case.images:
                (folder / image.name).symlink_to(image.resolve())
    return folder


def run_fold(k: int, fold: Fold, data: Path, files: DatasetFiles, cfg: RunConfig, out: Path, progress: bool,
             run_files: dict[str, str]) -> bool:
    """Train fold ``k`` (or continue it) and predict its validation cases; False when it was done."""
    run_dir = out / f"fold_{k}"
    done = run_dir / "oof" / ".complete"
    state = run_progress(run_dir)
    if state == "finished" and done.is_file():
        return False
    done.unlink(missing_ok=True)  # the fold is (re)trained or (re)predicted: not done until both are
    if state == "partial":
        log.info("fold %d: continuing from checkpoints/last.pt", k)
        resume_training(run_dir, data, {"train.device": cfg.train.device, "train.num_threads": cfg.train.num_threads,
                                        "train.trackers": cfg.train.trackers}, progress=progress)
    elif state == "none":
        log.info("fold %d: training on %d cases, validating on %d", k, len(fold["train"]), len(fold["val"]))
        train(data, copy.deepcopy(cfg), run_dir, overwrite=True, progress=progress, run_files=run_files,
              split=(fold["train"], fold["val"]))
    inputs = _link_inputs(files, fold["val"], run_dir / "oof_inputs")
    predict(run_dir / "checkpoints" / "last.pt", inputs, run_dir / "oof", device_name=cfg.train.device, overwrite=True,
            progress=progress)
    shutil.rmtree(inputs)
    done.write_text("")
    return True


def prepare_cv(data: Path, cfg: RunConfig, out: Path, options: CVOptions, explicit: set[str] | None = None,
               overwrite: bool = False) -> list[int]:
    """Write ``cv.json`` and ``splits.json`` (so that processes started for single folds continue
    this cross-validation) and return the folds not finished yet."""
    files = discover_dataset(data)
    splits = make_splits(files, options)
    with cv_folder_lock(out, options, overwrite):
        _load_or_start(out, data, cfg, explicit or set(), splits, overwrite)
        _write_splits(out, splits, options)
        with cv_group(cfg.train.trackers, out, data.resolve().name):  # the parent run exists before the fold processes start
            pass
    return [k for k in range(len(splits))
            if not (run_progress(out / f"fold_{k}") == "finished" and (out / f"fold_{k}" / "oof" / ".complete").is_file())]


def _write_splits(out: Path, splits: list[Fold], options: CVOptions) -> None:
    write_json(out / "splits.json", {"folds": splits, "seed": options.seed, "group_by": options.group_by,
                                     "source": str(options.splits_file) if options.splits_file else "k-fold"})


def run_cv(data: Path, cfg: RunConfig, out: Path, options: CVOptions, explicit: set[str] | None = None,
           overwrite: bool = False, progress: bool = True, run_files: dict[str, str] | None = None) -> CVResult:
    files = discover_dataset(data)
    splits = make_splits(files, options)
    if options.only_fold is not None and not 0 <= options.only_fold < len(splits):
        raise ConfigError(f"--fold {options.only_fold} is not a fold of this cross-validation (0..{len(splits) - 1})")
    with cv_folder_lock(out, options, overwrite):
        cfg, _ = _load_or_start(out, data, cfg, explicit or set(), splits, overwrite)
        _write_splits(out, splits, options)
        result = CVResult(out)
        with cv_group(cfg.train.trackers, out, data.resolve().name):  # one tracked run per fold, grouped
            for k, fold in enumerate(splits):
                if options.only_fold is not None and k != options.only_fold:
                    continue
                ran = run_fold(k, fold, data, files, cfg, out, progress, run_files or {})
                (result.trained if ran else result.skipped).append(k)
            if options.score and all((out / f"fold_{k}" / "oof" / ".complete").is_file() for k in range(len(splits))):
                _score(out, files, splits, result)
                log_cv_summary(cfg.train.trackers, out, data.resolve().name, result.pooled, result.folds)
    return result


def _score(out: Path, files: DatasetFiles, splits: list[Fold], result: CVResult) -> None:
    """All out-of-fold predictions together, per fold, and the postprocessing choice."""
    oof = out / "oof"
    if oof.exists():
        shutil.rmtree(oof)
    oof.mkdir()
    for k in range(len(splits)):
        for path in sorted((out / f"fold_{k}" / "oof").iterdir()):
            if not path.name.startswith(".") and not is_quality_file(path):  # the folds' quality rows are joined below
                shutil.copy2(path, oof / path.name)
    truth = files.cases[0].label.parent  # type: ignore[union-attr]
    meta = load_checkpoint(out / "fold_0" / "checkpoints" / "last.pt")["metadata"]
    options = metadata_eval_options(meta, out / "fold_0")
    result.oof = evaluate(oof, truth, **options)
    write_reports(result.oof, out)
    result.folds = fold_summaries(result.oof, splits)
    write_json(out / "folds.json", result.folds)
    result.postprocessing = choose_postprocessing(oof, truth, out / "postprocessing", result.oof, meta, options)
    write_json(out / "postprocessing.json", result.postprocessing["choice"])
    result.pooled = pooled_with_ci(result.oof)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    summary["cross_validation"] = {"folds": result.folds, "dice_with_95ci": result.pooled,
                                   "postprocessing": result.postprocessing,
                                   "quality_model": fit_cv_quality(out, len(splits), result.oof)}
    write_json(out / "summary.json", summary)


def pair_ensembles(data: Path, out: Path, names: list[str], options: CVOptions, device: str,
                   progress: bool) -> dict[str, EvalResult]:
    """Every pair of configurations as an ensemble, on the same folds: fold k's two models predict
    fold k's held-out cases together (:func:`~unetcli.inference.predict.predict` with both), and all
    these out-of-fold predictions are scored like a configuration's (``out/ensembles/A+B/``)."""
    files = discover_dataset(data)
    splits = make_splits(files, options)
    meta = load_checkpoint(out / names[0] / "fold_0" / "checkpoints" / "last.pt")["metadata"]
    truth = files.cases[0].label.parent  # type: ignore[union-attr]
    scored = {}
    for a, b in itertools.combinations(names, 2):
        folder = out / "ensembles" / f"{a}+{b}"
        if not (folder / "oof" / ".complete").is_file():
            log.info("ensemble %s + %s: predicting the out-of-fold cases", a, b)
            for k, fold in enumerate(splits):
                inputs = _link_inputs(files, fold["val"], folder / "inputs")
                models = [out / name / f"fold_{k}" / "checkpoints" / "last.pt" for name in (a, b)]
                predict(models, inputs, folder / "oof", device_name=device, overwrite=True, progress=progress)
                shutil.rmtree(inputs)
            (folder / "oof" / ".complete").write_text("")
        scored[f"{a}+{b}"] = evaluate(folder / "oof", truth, **metadata_eval_options(meta, out / names[0] / "fold_0"))
        write_reports(scored[f"{a}+{b}"], folder)
    return scored


@dataclass
class ConfigurationsResult:
    results: dict[str, CVResult]
    comparison: Comparison | None = None
    winner: str | None = None


def run_cv_configurations(data: Path, configs: dict[str, tuple[RunConfig, dict[str, str]]], out: Path, options: CVOptions,
                          explicit: set[str] | None = None, overwrite: bool = False,
                          progress: bool = True) -> ConfigurationsResult:
    """Cross-validate each configuration on the same folds (``out/NAME/``), then compare them on their
    out-of-fold predictions: the winner is the highest pooled mean foreground Dice, each other one's
    difference to it comes with a bootstrap CI and a paired Wilcoxon test over cases."""
    results = {name: run_cv(data, cfg, out / name, options, explicit, overwrite, progress, files)
               for name, (cfg, files) in configs.items()}
    done = {name: r.oof for name, r in results.items() if r.oof is not None}
    if len(done) < len(results) or len(done) < 2:
        return ConfigurationsResult(results)
    done.update(pair_ensembles(data, out, list(done), options, configs[next(iter(configs))][0].train.device, progress))
    winner = max(done, key=lambda n: class_dice(done[n])["mean"])  # type: ignore[arg-type]
    ordered = [winner] + [n for n in done if n != winner]
    for name in ordered:
        done[name].name = name  # type: ignore[union-attr]
    comparison = compare_results([done[n] for n in ordered])  # type: ignore[misc]
    write_json(out / "comparison.json", {"winner": winner, "how": "highest out-of-fold mean foreground Dice; the "
                                         "others' differences are paired over cases against it", **comparison.as_dict()})
    atomic_write_text(out / "comparison.csv", comparison_csv_text(comparison))
    return ConfigurationsResult(results, comparison, winner)


def cv_configurations(data: Path, out: Path, configs: str, sources: ConfigSources, choice: PlanChoice,
                      options: dict[str, Any], overwrite: bool, progress: bool) -> Any:
    """``unet cv --configs 2d,3d_fullres``: each plan configuration cross-validated on the same folds
    into ``out/NAME/``, then compared (:func:`run_cv_configurations`)."""
    names = [n.strip() for n in configs.split(",") if n.strip()]
    if len(names) < 2 or len(set(names)) < len(names):
        raise ConfigError(f"--configs '{configs}' needs two or more different plan configurations",
                          hint="e.g. --configs 2d,3d_fullres")
    planned, explicit = {}, set()
    for name in names:
        named = ConfigSources(Path(name), sources.sets, sources.flags, sources.defaults)
        cfg, run_files, explicit = planned_config(data, named, choice)
        planned[name] = (cfg, run_files)
    seed = next(iter(planned.values()))[0].train.seed
    return run_cv_configurations(data, planned, out, CVOptions(seed=seed, **options), explicit, overwrite, progress)
