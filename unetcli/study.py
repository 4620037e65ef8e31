"""``unet compare``: a skip-connection study on the user's own data, in one command.

Every variant (``concat``, ``add``, ``none``, ``valid-crop``) is trained with the same config,
budget, train/validation split and seeds; each run predicts the held-out cases and is scored.
The study folder ``DIR`` holds:

- ``runs/{variant}_seed{s}/``: a normal run folder plus ``predictions/`` and ``eval/``
  (``metrics.csv``, ``summary.json``); a run counts as finished once ``eval/summary.json`` exists
  (and ``study.json`` says this plan started it);
- ``study.json``: the plan (variants, seeds, data, config) and every run's status, duration,
  parameter count and thread count; the variant statistics once the study is complete;
- ``report.md`` with ``comparison.png`` (bars with CIs), ``comparison.csv``, ``curves.png``
  (validation Dice per epoch, mean over seeds with a min-max band) and ``overlays/CASE.png``
  (one column per variant, plus a zoom) for the cases where the variants differ most in surface Dice.

Statistics: the unit of the paired test is the held-out case. A variant's per-case value is the
mean over seeds; :func:`unetcli.evaluation.compare.compare_results` then gives the bootstrap CI
over cases and the paired Wilcoxon test of each variant against ``concat``. ``mean ± std`` in
the table is over seeds, of each run's mean over cases (sample std, ddof=1).

Rerunning the same command skips finished runs; a run left half-trained continues from its
``checkpoints/last.pt`` (``resume_training``), or is trained again from scratch if that fails.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.atomic import atomic_write_text, atomic_write_with
from unetcli.config import RunConfig, apply_overrides, config_from_dict, config_to_dict
from unetcli.errors import ConfigError, DataError, Interrupted, OutputError, TrainingError, UnetCliError
from unetcli.evaluation.compare import Comparison, comparison_csv_text, compare_results, write_comparison_chart
from unetcli.evaluation.report import EvalResult, evaluate, find_cases, json_safe, resolve_label_names, write_reports
from unetcli.inference.predict import predict
from unetcli.training.checkpoint import load_checkpoint, resolve_checkpoint
from unetcli.training.trainer import resume_training, train

log = logging.getLogger("unetcli")

VARIANTS: dict[str, dict[str, str]] = {
    "concat": {"model.skip": "concat", "model.padding": "same"},
    "add": {"model.skip": "add", "model.padding": "same"},
    "none": {"model.skip": "none", "model.padding": "same"},
    "valid-crop": {"model.skip": "concat", "model.padding": "valid"},
}
"""Variant name -> the config keys it sets; everything else is the same for all variants."""
DEFAULT_VARIANTS = "concat,add,none,valid-crop"
REFERENCE = "concat"
REPORT_METRICS = ("dice", "hd95", "nsd")
METRIC_TITLES = {"dice": "Dice", "hd95": "HD95", "nsd": "NSD"}
N_OVERLAY_CASES = 3
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
STUDY_VERSION = 1


# --------------------------------------------------------------------------- the plan


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
        from unetcli.demo import DEMOS, demo_data_dir

        spec, root = DEMOS["2d"], demo_data_dir("2d")
        names = json.loads((root / "labels.json").read_text(encoding="utf-8"))
        return StudyData(root / spec.train, root / spec.test_images, root / spec.test_labels,
                         [names[str(i)] for i in range(len(names))])
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
class StudyPlan:
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


def make_plan(variants: Sequence[str], n_seeds: int, cfg: RunConfig, data: StudyData) -> StudyPlan:
    """Seeds ``train.seed .. train.seed + n_seeds - 1``; the split seed stays fixed for all runs."""
    if n_seeds < 1:
        raise ConfigError(f"--seeds {n_seeds} must be at least 1")
    cfg = copy.deepcopy(cfg)
    if data.label_names and not cfg.data.label_names:
        cfg.data.label_names = list(data.label_names)
    if cfg.data.split_seed is None:
        cfg.data.split_seed = cfg.train.seed
    base = cfg.train.seed
    return StudyPlan(list(variants), [base + i for i in range(n_seeds)], data, cfg)


# --------------------------------------------------------------------------- running


def _fmt_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60:02d}:{seconds % 60:02d}"


def _write_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / "study.json", json.dumps(json_safe(state), indent=2) + "\n")


def _load_state(out: Path, plan: StudyPlan, overwrite: bool) -> dict[str, Any]:
    """The study's record: continue it if the plan matches, refuse if not (unless ``overwrite``)."""
    fingerprint = plan.fingerprint()
    fresh = {"version": STUDY_VERSION, "plan": fingerprint,
             "runs": {s.name: {"variant": s.variant, "seed": s.seed, "status": "pending"} for s in plan.runs()}}
    path = out / "study.json"
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder", hint="choose another --out")
    if path.is_file():
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            if not overwrite:
                raise OutputError(f"{path}: not readable ({exc})", hint="pass --overwrite to start the study again") from exc
            return fresh
        if overwrite:
            return fresh
        if not isinstance(state, dict) or state.get("plan") != fingerprint:
            old = state.get("plan", {}) if isinstance(state, dict) else {}
            differs = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
            raise OutputError(f"{out}: holds a study with another plan (differs in: {', '.join(differs) or 'format'})",
                              hint="rerun with the same options to continue it, choose another --out, "
                                   "or pass --overwrite to train every run again")
        for spec in plan.runs():
            state["runs"].setdefault(spec.name, fresh["runs"][spec.name])
        return state
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: folder is not empty and holds no study.json", hint="choose another --out or pass --overwrite")
    return fresh


def _eval_labels(meta: dict[str, Any]) -> list[int] | None:
    """The label values predictions are scored on (as ``unet eval`` reads them: 0/255 PNG masks as 0/1)."""
    values = meta.get("label_values")
    if not isinstance(values, list):
        return None
    labels = [int(v) for v in values if int(v) != 0]
    if meta.get("file_format", "png") == "png" and labels == [255]:
        labels = [1]
    return labels or None


def _trained_state(run_dir: Path) -> str:
    """``"finished"``, ``"partial"`` (a resumable ``last.pt``) or ``"none"``."""
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return "none"
    try:
        resume = load_checkpoint(last).get("resume")
    except UnetCliError as exc:
        log.warning("%s: %s; training that run again", last, exc.message)
        return "none"
    if not isinstance(resume, dict):
        return "none"
    return "finished" if resume.get("finished") else "partial"


def execute_run(spec: RunSpec, cfg: RunConfig, data: StudyData, run_dir: Path, fresh_start: bool,
                progress: bool) -> None:
    """Train one run (from scratch, or on from its checkpoint unless ``fresh_start``), predict the
    held-out cases, score them."""
    (run_dir / "eval" / "summary.json").unlink(missing_ok=True)  # the finished-marker goes last
    trained = "none" if fresh_start else _trained_state(run_dir)
    if trained == "partial":
        log.info("%s: continuing the half-trained run from checkpoints/last.pt", spec.name)
        try:
            resume_training(run_dir, data.train, {"train.device": cfg.train.device, "train.num_threads": cfg.train.num_threads,
                                                  "train.num_workers": cfg.train.num_workers}, progress=progress)
            trained = "finished"
        except UnetCliError as exc:
            if isinstance(exc, (Interrupted, TrainingError)):
                raise
            log.warning("%s: cannot continue (%s); training it again from scratch", spec.name, exc.message)
            trained = "none"
    if trained != "finished":
        train(data.train, copy.deepcopy(cfg), run_dir, overwrite=True, progress=progress)
    predict(run_dir, data.test_images, run_dir / "predictions", device_name=cfg.train.device, overwrite=True,
            progress=progress)
    meta = load_checkpoint(resolve_checkpoint(run_dir))["metadata"]
    result = evaluate(run_dir / "predictions", data.test_labels, labels=_eval_labels(meta),
                      label_names=resolve_label_names(run=run_dir))
    write_reports(result, run_dir / "eval")


@dataclass
class StudyResult:
    out: Path
    report: Path
    comparison: Comparison
    table: str
    """The markdown result table (as in ``report.md``)."""
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def run_study(plan: StudyPlan, out: Path, overwrite: bool = False, progress: bool = True) -> StudyResult:
    """Run every unfinished run of ``plan`` into ``out/runs/``, then write the report.

    A run is finished when its ``eval/summary.json`` exists and ``study.json`` says this plan
    started it (so that runs of an earlier plan, left by an interrupted ``--overwrite``, are not
    taken for finished ones); a started, unfinished run continues from its checkpoint.
    """
    state = _load_state(out, plan, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    _write_state(out, state)
    specs = plan.runs()

    def started(spec: RunSpec) -> bool:
        return state["runs"][spec.name].get("status") in ("running", "finished")

    def finished(spec: RunSpec) -> bool:
        return started(spec) and (out / "runs" / spec.name / "eval" / "summary.json").is_file()

    todo = sum(1 for spec in specs if not finished(spec))
    ran: list[str] = []
    skipped: list[str] = []
    for index, spec in enumerate(specs, 1):
        run_dir = out / "runs" / spec.name
        record = state["runs"][spec.name]
        if finished(spec):
            skipped.append(spec.name)
            log.info("run %d/%d (%s, seed %d): finished earlier, skipping", index, len(specs), spec.variant, spec.seed)
            if record.get("status") != "finished":
                record.update(_run_record(run_dir, None))
                _write_state(out, state)
            continue
        done = [float(r["seconds"]) for r in state["runs"].values() if r.get("status") == "finished" and r.get("seconds")]
        eta = _fmt_duration(float(np.mean(done)) * (todo - len(ran))) if done else "--:--"
        log.info("run %d/%d (%s, seed %d) ... ETA %s", index, len(specs), spec.variant, spec.seed, eta)
        fresh_start = not started(spec)
        record["status"] = "running"
        _write_state(out, state)
        start = time.perf_counter()
        try:
            execute_run(spec, plan.run_config(spec), plan.data, run_dir, fresh_start, progress)
        except Interrupted as exc:
            finished_runs = sum(1 for r in state["runs"].values() if r.get("status") == "finished")
            raise Interrupted(f"study interrupted in run {index}/{len(specs)} ({spec.name}); {finished_runs} run(s) "
                              f"finished, a checkpoint of {spec.name} is saved", exc.signum,
                              hint="rerun the same `unet compare` command (without --overwrite) to continue: finished "
                                   f"runs are skipped and {spec.name} continues from its checkpoint") from exc
        record.update(_run_record(run_dir, time.perf_counter() - start))
        _write_state(out, state)
        ran.append(spec.name)
    report = write_report(plan, out, state)
    return StudyResult(out, out / "report.md", report.comparison, report.table, ran, skipped)


def _run_record(run_dir: Path, seconds: float | None) -> dict[str, Any]:
    from unetcli.models import build_model, count_parameters

    cfg = config_from_dict(load_checkpoint(resolve_checkpoint(run_dir))["config"])
    record: dict[str, Any] = {"status": "finished", "parameters": count_parameters(build_model(cfg.model))}
    if seconds is not None:
        import torch

        record.update(seconds=round(seconds, 2), torch_threads=torch.get_num_threads())
    return record


# --------------------------------------------------------------------------- reading results


def load_eval(run_dir: Path, truth: Path) -> EvalResult:
    """A finished run's scores, read back from ``eval/metrics.csv`` (no re-scoring)."""
    path = run_dir / "eval" / "metrics.csv"
    by_key: dict[tuple[str, str], dict[str, object]] = {}
    metrics: list[str] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            key = (row["case"], row["class"])
            entry = by_key.setdefault(key, {"case": row["case"], "class": row["class"], "label": row["label"]})
            entry[row["metric"]] = float(row["value"]) if row["value"] else math.nan
            if row["metric"] not in metrics:
                metrics.append(row["metric"])
    rows = list(by_key.values())
    cases = list(dict.fromkeys(str(r["case"]) for r in rows))
    classes = list(dict.fromkeys(str(r["class"]) for r in rows))
    groups = {str(r["class"]): [int(v) for v in str(r["label"]).split("+")] for r in rows}
    kind, pairs = find_cases(run_dir / "predictions", truth)
    summary = json.loads((run_dir / "eval" / "summary.json").read_text(encoding="utf-8"))
    return EvalResult(rows, summary, metrics, classes, cases, [p for p in pairs if p.name in cases], kind, groups,
                      {c: None for c in cases}, run_dir.name)


def seed_average(results: Sequence[EvalResult], name: str) -> EvalResult:
    """One result whose per-case, per-class values are the mean over ``results`` (seeds; NaN ignored)."""
    first = results[0]
    for r in results[1:]:
        if r.cases != first.cases or r.classes != first.classes:
            raise DataError(f"{r.name}: not scored on the same cases and classes as {first.name}")
    rows = []
    for row in first.rows:
        averaged: dict[str, object] = {"case": row["case"], "class": row["class"], "label": row["label"]}
        for m in first.metrics:
            values = [float(r.values(m, str(row["class"]))[first.cases.index(str(row["case"]))]) for r in results]
            finite = [v for v in values if math.isfinite(v)]
            averaged[m] = float(np.mean(finite)) if finite else math.nan
        rows.append(averaged)
    return EvalResult(rows, {}, list(first.metrics), list(first.classes), list(first.cases), list(first.pairs),
                      first.kind, dict(first.groups), dict(first.spacings), name)


def _nanmean(values: np.ndarray) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------- the report


@dataclass
class VariantStats:
    variant: str
    parameters: int
    epoch_seconds: tuple[float, float]
    """Training time per epoch (iterations only): mean and std over seeds of each run's mean."""
    seed_stats: dict[str, tuple[float, float]]
    """metric -> (mean, std) over seeds of each run's foreground mean over cases."""
    per_run: dict[int, dict[str, float]]


@dataclass
class Report:
    comparison: Comparison
    variants: dict[str, VariantStats]
    overlay_cases: list[str]
    table: str
    conventions: dict[str, Any]
    """The scoring conventions of the runs (``eval/summary.json``): spacing, NSD tolerance, empty masks."""
    resolved: str
    """What the first run resolved from the config (batch, patch, precision)."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def _digits(metric: str) -> int:
    return 2 if metric == "hd95" else 3


def _cell(mean: float, std: float, low: float, high: float, digits: int, n: int, n_cases: int) -> str:
    """``mean ± std [low, high]``; ``(n=k/N)`` when only k of the N cases have a finite value."""
    if math.isnan(mean):
        return "–"
    spread = "–" if math.isnan(std) else f"{std:.{digits}f}"
    text = f"{mean:.{digits}f} ± {spread} [{low:.{digits}f}, {high:.{digits}f}]"
    return text + (f" (n={n}/{n_cases})" if n < n_cases else "")


def _p(p: float) -> str:
    return "–" if p is None or math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def result_table(plan: StudyPlan, comp: Comparison, stats: dict[str, VariantStats]) -> str:
    header = ["variant", "parameters", "s / epoch"] + [METRIC_TITLES[m] for m in REPORT_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in comp.runs:
        s = stats[variant]
        cells = [f"{variant}{' (ref)' if variant == comp.reference else ''}", f"{s.parameters:,}",
                 f"{s.epoch_seconds[0]:.1f} ± {s.epoch_seconds[1]:.1f}"]
        for m in REPORT_METRICS:
            e = comp.stats[variant]["foreground"][m]
            mean_s, std_s = s.seed_stats[m]
            cells.append(_cell(mean_s, std_s, e["ci_low"], e["ci_high"], _digits(m), int(e["n"]), comp.n_cases))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(comp: Comparison) -> str:
    header = ["variant − " + comp.reference]
    for m in REPORT_METRICS:
        header += [f"Δ {METRIC_TITLES[m]} [95 % CI]", "p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in comp.runs[1:]:
        cells = [variant]
        for m in REPORT_METRICS:
            e = comp.stats[variant]["foreground"][m]
            d = _digits(m)
            cells += ["–" if math.isnan(e.get("diff", math.nan)) else
                      f"{e['diff']:+.{d}f} [{e['diff_ci_low']:+.{d}f}, {e['diff_ci_high']:+.{d}f}]",
                      f"{_p(e.get('p_value', math.nan))} (n={e.get('n_pairs', 0)})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(stats: dict[str, VariantStats]) -> str:
    header = ["variant", "seed"] + [METRIC_TITLES[m] for m in REPORT_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, s in stats.items():
        for seed, values in s.per_run.items():
            cells = ["–" if math.isnan(values[m]) else f"{values[m]:.{_digits(m)}f}" for m in REPORT_METRICS]
            lines.append("| " + " | ".join([variant, str(seed), *cells]) + " |")
    return "\n".join(lines)


def write_curves(plan: StudyPlan, out: Path, histories: dict[str, list[list[dict[str, Any]]]]) -> Path:
    """Validation Dice (and training loss) per epoch: each variant's mean over seeds, min-max band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax_dice, ax_loss = fig.subplots(1, 2)
    for i, variant in enumerate(plan.variants):
        for ax, key in ((ax_dice, "val_dice_mean"), (ax_loss, "train_loss")):
            runs = histories[variant]
            n = min(len(h) for h in runs)
            values = np.array([[float(r.get(key, math.nan)) for r in h[:n]] for h in runs], dtype=np.float64)
            epochs = np.arange(1, n + 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, low, high = np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)
            ax.plot(epochs, mean, marker=".", color=f"C{i}", label=variant)
            if len(runs) > 1:
                ax.fill_between(epochs, low, high, color=f"C{i}", alpha=0.2, linewidth=0)
    ax_dice.set(xlabel="epoch", ylabel="mean foreground Dice", title="Validation Dice (mean over seeds, band: min-max)")
    ax_loss.set(xlabel="epoch", ylabel="CE + Dice", title="Training loss")
    for ax in (ax_dice, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = out / "curves.png"
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def pick_overlay_cases(averaged: dict[str, EvalResult], n: int = N_OVERLAY_CASES) -> list[str]:
    """The cases where the variants' seed-averaged surface Dice (then HD95) spreads the most."""
    first = next(iter(averaged.values()))

    def spread(metric: str) -> np.ndarray:
        stack = np.stack([r.foreground_values(metric) for r in averaged.values()])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nan_to_num(np.nanmax(stack, 0) - np.nanmin(stack, 0), nan=-1.0)

    nsd, hd95 = spread("nsd") if "nsd" in first.metrics else np.zeros(len(first.cases)), spread("hd95")
    order = sorted(range(len(first.cases)), key=lambda i: (-nsd[i], -hd95[i], first.cases[i]))
    return [first.cases[i] for i in order[:n]]


def _zoom_box(disagreement: np.ndarray, fraction: float = 0.35) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)``: the square window (``fraction`` of the shorter side) holding the most
    disagreement between predictions and reference."""
    from scipy.ndimage import uniform_filter

    height, width = disagreement.shape
    size = max(8, int(round(min(height, width) * fraction)))
    density = uniform_filter(disagreement.astype(np.float64), size=size, mode="constant")
    r, c = np.unravel_index(int(np.argmax(density)), density.shape)
    r0 = int(np.clip(r - size // 2, 0, max(height - size, 0)))
    c0 = int(np.clip(c - size // 2, 0, max(width - size, 0)))
    return r0, min(r0 + size, height), c0, min(c0 + size, width)


def _draw_contours(ax: Any, masks: list[np.ndarray], colour: str, width: float = 0.8) -> None:
    """Each mask's outline; padded so that a region touching the image border is closed."""
    for mask in masks:
        if mask.any():
            rows, cols = mask.shape
            ax.contour(np.arange(-1, cols + 1), np.arange(-1, rows + 1), np.pad(mask, 1).astype(np.float32),
                       levels=[0.5], colors=[colour], linewidths=width)


def render_case_grid(case: str, results: dict[str, EvalResult], image_dir: Path | None, path: Path,
                     seed: int) -> Path:
    """One column per variant (the run of ``seed``): the whole case, then a zoom on the window where the
    variants disagree most with the reference; reference contours green, predictions magenta."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    from unetcli.evaluation.overlays import PREDICTION_COLOUR, REFERENCE_COLOUR, _normalise, _pick_slice, _read_background
    from unetcli.evaluation.report import read_pair

    variants, preds, truth_masks, shape, spacing, first = [], [], [], (), None, next(iter(results.values()))
    for variant, result in results.items():
        pair = next(p for p in result.pairs if p.name == case)
        pred, truth, spacing = read_pair(pair, result.kind)
        groups = list(result.groups.values())
        variants.append(variant)
        preds.append([np.isin(pred, g) for g in groups])
        truth_masks, shape = [np.isin(truth, g) for g in groups], truth.shape
    pair = next(p for p in first.pairs if p.name == case)
    background = _read_background(image_dir, pair, first.kind, shape)
    background = np.zeros(shape, np.float32) if background is None else background
    origin, aspect, where = "upper", (spacing[0] / spacing[1] if spacing else 1.0), ""
    if len(shape) == 3:
        z = _pick_slice([m for masks in preds for m in masks], truth_masks * len(preds))
        where = f", slice {z} (last axis)"
        background = background[:, :, z].T
        preds = [[m[:, :, z].T for m in masks] for masks in preds]
        truth_masks = [m[:, :, z].T for m in truth_masks]
        origin, aspect = "lower", (spacing[1] / spacing[0] if spacing else 1.0)
    disagreement = sum(p ^ t for masks in preds for p, t in zip(masks, truth_masks))
    r0, r1, c0, c1 = _zoom_box(np.asarray(disagreement))
    height, width = background.shape
    panel = 3.6  # inches per column
    ratios = [height * aspect / width, (r1 - r0) * aspect / (c1 - c0)]
    fig = Figure(figsize=(len(variants) * panel, panel * sum(ratios) + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(variants), squeeze=False, gridspec_kw={"height_ratios": ratios})
    image = _normalise(background)
    for j, (variant, result, pred_masks) in enumerate(zip(variants, results.values(), preds)):
        whole, zoom = axes[0, j], axes[1, j]
        for ax, line in ((whole, 0.8), (zoom, 1.5)):
            ax.imshow(image, cmap="gray", origin=origin, aspect=aspect, interpolation="nearest")
            _draw_contours(ax, truth_masks, REFERENCE_COLOUR, line)
            _draw_contours(ax, pred_masks, PREDICTION_COLOUR, line)
        whole.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="yellow", linewidth=1))
        zoom.set_xlim(c0 - 0.5, c1 - 0.5)
        zoom.set_ylim((r1 - 0.5, r0 - 0.5) if origin == "upper" else (r0 - 0.5, r1 - 0.5))
        i = result.cases.index(case)
        scores = ", ".join(f"{METRIC_TITLES[m]} {result.foreground_values(m)[i]:.{_digits(m)}f}" for m in REPORT_METRICS)
        whole.set_title(f"{variant}\n{scores}", fontsize=9)
        for ax in (whole, zoom):
            ax.set_axis_off()
    axes[0, -1].legend(handles=[Line2D([], [], color=REFERENCE_COLOUR, label="reference"),
                                Line2D([], [], color=PREDICTION_COLOUR, label="prediction")],
                       loc="lower right", fontsize=7, framealpha=0.6)
    fig.suptitle(f"{case} (seed {seed}{where}); bottom row: the yellow box enlarged", fontsize=10)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def build_report(plan: StudyPlan, out: Path, state: dict[str, Any]) -> Report:
    truth = plan.data.test_labels
    per_run = {v: {s: load_eval(out / "runs" / RunSpec(v, s).name, truth) for s in plan.seeds} for v in plan.variants}
    order = [plan.reference] + [v for v in plan.variants if v != plan.reference]
    averaged = {v: seed_average(list(per_run[v].values()), v) for v in order}
    comp = compare_results([averaged[v] for v in order])
    histories = {v: [_history(out / "runs" / RunSpec(v, s).name) for s in plan.seeds] for v in plan.variants}
    stats: dict[str, VariantStats] = {}
    for v in order:
        runs = {s: {m: _nanmean(per_run[v][s].foreground_values(m)) for m in REPORT_METRICS} for s in plan.seeds}
        epoch_means = [float(np.mean([r["epoch_seconds"] for r in h])) for h in histories[v] if h]
        records = [state["runs"][RunSpec(v, s).name] for s in plan.seeds]
        stats[v] = VariantStats(v, int(records[0].get("parameters", 0)), _mean_std(epoch_means),
                                {m: _mean_std([runs[s][m] for s in plan.seeds]) for m in REPORT_METRICS}, runs)
    cases = pick_overlay_cases(averaged)
    (out / "overlays").mkdir(exist_ok=True)
    first_seed = {v: per_run[v][plan.seeds[0]] for v in order}
    for case in cases:
        render_case_grid(case, first_seed, plan.data.test_images, out / "overlays" / f"{case}.png", plan.seeds[0])
    atomic_write_text(out / "comparison.csv", comparison_csv_text(comp))
    write_comparison_chart(comp, out / "comparison.png", REPORT_METRICS)
    write_curves(plan, out, histories)
    table = result_table(plan, comp, stats)
    conventions = per_run[order[0]][plan.seeds[0]].summary.get("conventions", {})
    first = load_checkpoint(resolve_checkpoint(out / "runs" / RunSpec(order[0], plan.seeds[0]).name))
    t = first["config"]["train"]
    resolved = (f"batch {t['batch_size']}, patch {t['patch_size']} (whole images unless set), precision "
                f"{first.get('resume', {}).get('precision', t['precision'])}")
    return Report(comp, stats, cases, table, conventions if isinstance(conventions, dict) else {}, resolved)


def report_markdown(plan: StudyPlan, report: Report) -> str:
    cfg, comp = plan.config, report.comparison
    spacing = (f"Distance spacing: {report.conventions.get('spacing', 'see runs/*/eval/summary.json')}; "
               f"NSD tolerance {report.conventions.get('nsd_tolerance_mm', 1.0)}.")
    budget = (f"{cfg.train.epochs} epochs × {cfg.train.iterations_per_epoch} iterations, {report.resolved}, "
              f"lr {cfg.train.lr:g} ({cfg.train.warmup_iterations} warm-up iterations, {cfg.train.schedule}), "
              f"features {cfg.model.features}, validation fraction {cfg.data.val_fraction} (split seed {plan.split_seed})")
    lines = [
        "# Skip-connection study", "",
        f"Variants: {', '.join(plan.variants)} (`valid-crop` = concat skips with unpadded convolutions and "
        f"centre-cropped skips, as in the original U-Net). Seeds: {', '.join(map(str, plan.seeds))}. "
        "Every variant has the same data, split, budget and seeds.", "",
        f"- training data: `{plan.data.train}`; held-out cases: `{plan.data.test_images}` scored against "
        f"`{plan.data.test_labels}` ({comp.n_cases} cases)",
        f"- budget: {budget}", "",
        "## Results", "",
        report.table, "",
        f"Metric cells: mean ± std over seeds (of each run's mean over the held-out cases) "
        f"[95 % bootstrap CI over the {comp.n_cases} cases of the seed-averaged per-case values]; "
        "(n=k/N): only k of the N cases had a finite value (an empty predicted or reference mask leaves HD95 undefined "
        "and out of the mean). "
        "Dice and NSD (normalised surface Dice): higher is better; HD95 (95th-percentile Hausdorff distance): "
        f"lower is better. All are foreground means (per case, the mean over classes). {spacing} "
        "s / epoch: training iterations only (no validation), mean ± std over seeds, on the machine that ran the study.", "",
        f"## Paired tests against {comp.reference}", "",
        paired_table(comp), "",
        f"Δ = variant − {comp.reference} per held-out case (each case averaged over seeds), mean with 95 % bootstrap CI; "
        "p: two-sided Wilcoxon signed-rank test on the paired per-case values (zero differences dropped). "
        f"{(len(plan.variants) - 1) * len(REPORT_METRICS)} tests in this table: read single p-values below 0.05 with "
        "that in mind. n: cases where both values are finite (HD95 is undefined when a mask is empty). "
        "The unit is the held-out case: a small p says these trained models differ consistently across the cases, "
        "not that other seeds would rank the variants the same way; for that, compare the per-seed table below.", "",
        "## Per seed", "",
        per_seed_table(report.variants), "",
        "Each run's mean over the held-out cases. Differences between seeds of one variant show how much "
        "of a gap between variants the training noise alone can make.", "",
        "## Figures", "",
        "![Foreground means with 95 % bootstrap CIs](comparison.png)", "",
        "![Validation Dice per epoch](curves.png)", "",
        f"### Overlays (seed {plan.seeds[0]})", "",
        "The held-out cases where the variants' surface Dice differs most; reference contours green, "
        "prediction magenta, one panel per variant.", "",
    ]
    for case in report.overlay_cases:
        lines += [f"![{case}](overlays/{case}.png)", ""]
    lines += ["Per-run details: `runs/VARIANT_seedS/` (config.yaml, metrics.jsonl, curves.png, predictions/, "
              "eval/metrics.csv); all variant statistics: `comparison.csv`, `study.json`.", ""]
    return "\n".join(lines)


def write_report(plan: StudyPlan, out: Path, state: dict[str, Any]) -> Report:
    report = build_report(plan, out, state)
    text = report_markdown(plan, report)
    state["results"] = {
        "reference": report.comparison.reference,
        "variants": {v: {"parameters": s.parameters, "epoch_seconds_mean": s.epoch_seconds[0],
                         "epoch_seconds_std": s.epoch_seconds[1],
                         "seed_mean_std": {m: list(s.seed_stats[m]) for m in REPORT_METRICS},
                         "per_seed": {str(k): v2 for k, v2 in s.per_run.items()}}
                     for v, s in report.variants.items()},
        "comparison": report.comparison.as_dict(),
        "overlay_cases": report.overlay_cases,
    }
    _write_state(out, state)
    atomic_write_text(out / "report.md", text)
    return report
