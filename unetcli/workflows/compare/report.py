"""``unet compare``, the report: the runs' scores read back, the variant statistics, ``report.md``.

Statistics: the unit of the paired test is the held-out case. A variant's per-case value is the
mean over seeds; :func:`unetcli.evaluation.stats.compare_results` then gives the bootstrap CI
over cases and the paired Wilcoxon test of each variant against ``concat``. ``mean ± std`` in
the table is over seeds, of each run's mean over cases (sample std, ddof=1).
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.errors import DataError
from unetcli.evaluation.cases import find_cases
from unetcli.evaluation.stats import Comparison, compare_results, format_p_value
from unetcli.evaluation.summary import EvalResult
from unetcli.checkpoint import load_checkpoint, resolve_checkpoint
from unetcli.workflows.compare.study import RunSpec, Study

REPORT_METRICS = ("dice", "hd95", "nsd")
METRIC_TITLES = {"dice": "Dice", "hd95": "HD95", "nsd": "NSD"}


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


@dataclass
class StudyScores:
    """Everything the report and its figures are made from, read back from the finished runs."""

    per_run: dict[str, dict[int, EvalResult]]
    """variant -> seed -> the run's scores."""
    averaged: dict[str, EvalResult]
    """variant -> per-case values averaged over seeds; the reference variant first."""
    comparison: Comparison
    histories: dict[str, list[list[dict[str, Any]]]]
    """variant -> per seed, the run's ``metrics.jsonl`` records."""
    variants: dict[str, VariantStats]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return math.nan, math.nan
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else math.nan


def metric_digits(metric: str) -> int:
    """Decimals a metric is shown with (HD95, a distance, with 2)."""
    return 2 if metric == "hd95" else 3


def _cell(mean: float, std: float, low: float, high: float, digits: int, n: int, n_cases: int) -> str:
    """``mean ± std [low, high]``; ``(n=k/N)`` when only k of the N cases have a finite value."""
    if math.isnan(mean):
        return "–"
    spread = "–" if math.isnan(std) else f"{std:.{digits}f}"
    text = f"{mean:.{digits}f} ± {spread} [{low:.{digits}f}, {high:.{digits}f}]"
    return text + (f" (n={n}/{n_cases})" if n < n_cases else "")


def result_table(plan: Study, comp: Comparison, stats: dict[str, VariantStats]) -> str:
    """The markdown results table: per variant, parameters, time per epoch and each metric's cell (see :func:`_cell`)."""
    header = ["variant", "parameters", "s / epoch"] + [METRIC_TITLES[m] for m in REPORT_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in comp.runs:
        s = stats[variant]
        cells = [f"{variant}{' (ref)' if variant == comp.reference else ''}", f"{s.parameters:,}",
                 f"{s.epoch_seconds[0]:.1f} ± {s.epoch_seconds[1]:.1f}"]
        for m in REPORT_METRICS:
            e = comp.stats[variant]["foreground"][m]
            mean_s, std_s = s.seed_stats[m]
            cells.append(_cell(mean_s, std_s, e["ci_low"], e["ci_high"], metric_digits(m), int(e["n"]), comp.n_cases))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(comp: Comparison) -> str:
    """Markdown: per variant, the paired difference to the reference with its CI, and the Wilcoxon p."""
    header = ["variant − " + comp.reference]
    for m in REPORT_METRICS:
        header += [f"Δ {METRIC_TITLES[m]} [95 % CI]", "p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant in comp.runs[1:]:
        cells = [variant]
        for m in REPORT_METRICS:
            e = comp.stats[variant]["foreground"][m]
            d = metric_digits(m)
            cells += ["–" if math.isnan(e.get("diff", math.nan)) else
                      f"{e['diff']:+.{d}f} [{e['diff_ci_low']:+.{d}f}, {e['diff_ci_high']:+.{d}f}]",
                      f"{format_p_value(e.get('p_value', math.nan))} (n={e.get('n_pairs', 0)})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_seed_table(stats: dict[str, VariantStats]) -> str:
    """Markdown: every run's mean over the held-out cases."""
    header = ["variant", "seed"] + [METRIC_TITLES[m] for m in REPORT_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, s in stats.items():
        for seed, values in s.per_run.items():
            cells = ["–" if math.isnan(values[m]) else f"{values[m]:.{metric_digits(m)}f}" for m in REPORT_METRICS]
            lines.append("| " + " | ".join([variant, str(seed), *cells]) + " |")
    return "\n".join(lines)


def _variant_stats(plan: Study, variant: str, per_seed: dict[int, EvalResult],
                   histories: list[list[dict[str, Any]]], state: dict[str, Any]) -> VariantStats:
    runs = {s: {m: _nanmean(per_seed[s].foreground_values(m)) for m in REPORT_METRICS} for s in plan.seeds}
    epoch_means = [float(np.mean([r["epoch_seconds"] for r in h])) for h in histories if h]
    records = [state["runs"][RunSpec(variant, s).name] for s in plan.seeds]
    return VariantStats(variant, int(records[0].get("parameters", 0)), _mean_std(epoch_means),
                        {m: _mean_std([runs[s][m] for s in plan.seeds]) for m in REPORT_METRICS}, runs)


def read_scores(plan: Study, out: Path, state: dict[str, Any]) -> StudyScores:
    """Every finished run's scores and training history, the seed averages and their comparison."""
    truth = plan.data.test_labels
    per_run = {v: {s: load_eval(out / "runs" / RunSpec(v, s).name, truth) for s in plan.seeds} for v in plan.variants}
    order = [plan.reference] + [v for v in plan.variants if v != plan.reference]
    averaged = {v: seed_average(list(per_run[v].values()), v) for v in order}
    comp = compare_results([averaged[v] for v in order])
    histories = {v: [_history(out / "runs" / RunSpec(v, s).name) for s in plan.seeds] for v in plan.variants}
    stats = {v: _variant_stats(plan, v, per_run[v], histories[v], state) for v in order}
    return StudyScores(per_run, averaged, comp, histories, stats)


def build_report(plan: Study, out: Path, scores: StudyScores, overlay_cases: list[str]) -> Report:
    """The report's contents; ``overlay_cases``: the cases drawn in ``overlays/``."""
    reference = next(iter(scores.averaged))
    table = result_table(plan, scores.comparison, scores.variants)
    conventions = scores.per_run[reference][plan.seeds[0]].summary.get("conventions", {})
    first = load_checkpoint(resolve_checkpoint(out / "runs" / RunSpec(reference, plan.seeds[0]).name))
    t = first["config"]["train"]
    resolved = (f"batch {t['batch_size']}, patch {t['patch_size']} (whole images unless set), precision "
                f"{first.get('resume', {}).get('precision', t['precision'])}")
    return Report(scores.comparison, scores.variants, overlay_cases, table,
                  conventions if isinstance(conventions, dict) else {}, resolved)


def report_markdown(plan: Study, report: Report) -> str:
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


def results_record(report: Report) -> dict[str, Any]:
    """The ``results`` section of ``study.json``."""
    return {
        "reference": report.comparison.reference,
        "variants": {v: {"parameters": s.parameters, "epoch_seconds_mean": s.epoch_seconds[0],
                         "epoch_seconds_std": s.epoch_seconds[1],
                         "seed_mean_std": {m: list(s.seed_stats[m]) for m in REPORT_METRICS},
                         "per_seed": {str(k): v2 for k, v2 in s.per_run.items()}}
                     for v, s in report.variants.items()},
        "comparison": report.comparison.as_dict(),
        "overlay_cases": report.overlay_cases,
    }
