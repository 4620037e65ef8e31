"""Comparing runs scored on the same cases: bootstrap CIs, paired tests, the comparison table, CSV and chart.

Used by ``unet eval PRED_A PRED_B ... --truth TRUTH`` and by ``unet compare`` (the variants' seed averages).

Statistics (all per metric, for the foreground and for every class):

* the value of a case is its score for the class; its *foreground* value is the mean over the
  classes scored in that case (classes absent from both masks are skipped), so every case has
  one number per metric and the runs can be paired case by case;
* mean over cases (NaN cases left out; ``n`` counts the rest) with a 95 % bootstrap confidence
  interval: 10,000 resamples of the cases with replacement (seeded), percentile method. The same
  resampled case indices are used for every run, metric and class;
* the first run is the reference run; for every other run: the mean paired difference
  (other - reference, over the cases where both are finite) with its bootstrap CI, and the
  two-sided Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) on the paired per-case values:
  zero differences dropped; exact p-value for up to 50 differences without ties, else the
  normal approximation with tie correction. When every paired difference is 0 the p-value is
  reported as 1.0.

Outputs: ``comparison.csv`` (long: run, class, metric, mean, CI, n, and the paired difference,
its CI and p for non-reference runs), the ``comparison`` section of ``summary.json``, a rich
table and ``comparison.png`` (a bar per run with CI error bars, one panel per metric).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from unetcli.atomic import atomic_write_text, atomic_write_with
from unetcli.errors import DataError
from unetcli.evaluation.summary import DISTANCE_METRICS, EvalResult

FOREGROUND = "foreground"
CHART_METRICS = ("dice", "hd95", "assd", "nsd")
TABLE_METRICS = ("dice", "hd95", "assd", "nsd")
N_BOOTSTRAP = 10_000
SEED = 0
CONFIDENCE = 0.95


@dataclass
class Comparison:
    runs: list[str]
    metrics: list[str]
    classes: list[str]  # FOREGROUND first, then the classes
    n_cases: int
    stats: dict[str, dict[str, dict[str, dict[str, float]]]]  # run -> class -> metric -> numbers
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def unit(self) -> str:
        return str(self.settings.get("distance_unit", "mm"))

    @property
    def reference(self) -> str:
        return self.runs[0]

    def as_dict(self) -> dict[str, object]:
        return {"reference_run": self.reference, "runs": self.runs, "cases": self.n_cases,
                "settings": self.settings, "stats": self.stats}


def bootstrap_indices(n: int, n_boot: int = N_BOOTSTRAP, seed: int = SEED) -> np.ndarray:
    """``(n_boot, n)`` case indices drawn with replacement (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_mean_ci(values: np.ndarray, indices: np.ndarray, confidence: float = CONFIDENCE,
                      chunk: int = 2000) -> tuple[float, float, float, int]:
    """``(mean, low, high, n)`` of ``values`` (NaN ignored) with a percentile bootstrap CI."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    n = int(finite.sum())
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = float(values[finite].mean())
    if n == 1:
        return mean, mean, mean, 1
    # Resampled means with NaN cases skipped: sum of finite values / number of finite values.
    filled = np.where(finite, values, 0.0)
    means = []
    for start in range(0, len(indices), chunk):
        idx = indices[start:start + chunk]
        counts = finite[idx].sum(axis=1)
        sums = filled[idx].sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            means.append(sums / counts)
    boot = np.concatenate(means)
    boot = boot[np.isfinite(boot)]  # a resample that drew only NaN cases
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [alpha, 1.0 - alpha])
    return mean, float(low), float(high), n


def paired_test(reference: np.ndarray, other: np.ndarray) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p-value on the cases where both are finite, and that count."""
    from scipy.stats import wilcoxon

    ok = np.isfinite(reference) & np.isfinite(other)
    n = int(ok.sum())
    diff = other[ok] - reference[ok]
    if n == 0:
        return math.nan, 0
    if not np.any(diff != 0):
        return 1.0, n
    # Zero differences are dropped ("wilcox" zero method). Exact null distribution for up to 50
    # untied differences, else the normal approximation with tie correction (as R's wilcox.test);
    # scipy's "auto" would run a slow permutation test when there are ties.
    nonzero = diff[diff != 0]
    method = "exact" if nonzero.size <= 50 and np.unique(np.abs(nonzero)).size == nonzero.size else "approx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(wilcoxon(nonzero, method=method).pvalue), n
        except ValueError:
            return math.nan, n


def _case_values(result: EvalResult, metric: str, cls: str) -> np.ndarray:
    return result.foreground_values(metric) if cls == FOREGROUND else result.values(metric, cls)


def compare_results(results: Sequence[EvalResult], n_boot: int = N_BOOTSTRAP, seed: int = SEED,
                    confidence: float = CONFIDENCE) -> Comparison:
    """Bootstrap CIs of every run's means and paired tests of each run against the first."""
    if len(results) < 2:
        raise DataError("comparing runs needs at least two prediction folders")
    cases = results[0].cases
    for result in results[1:]:
        if result.cases != cases:
            missing = sorted(set(cases) ^ set(result.cases))
            raise DataError(f"{result.name}: not scored on the same cases as {results[0].name} ({', '.join(missing[:10])})")
    runs = [r.name for r in results]
    metrics = list(results[0].metrics)
    classes = [FOREGROUND, *results[0].classes]
    indices = bootstrap_indices(len(cases), n_boot, seed)
    stats: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for result in results:
        stats[result.name] = {}
        for cls in classes:
            stats[result.name][cls] = {}
            for m in metrics:
                mean, low, high, n = bootstrap_mean_ci(_case_values(result, m, cls), indices, confidence)
                entry: dict[str, float] = {"mean": mean, "ci_low": low, "ci_high": high, "n": n}
                if result is not results[0]:
                    ref_values = _case_values(results[0], m, cls)
                    values = _case_values(result, m, cls)
                    diff = values - ref_values  # NaN where either is NaN
                    d_mean, d_low, d_high, _ = bootstrap_mean_ci(diff, indices, confidence)
                    p, n_pairs = paired_test(ref_values, values)
                    entry.update({"diff": d_mean, "diff_ci_low": d_low, "diff_ci_high": d_high,
                                  "p_value": p, "n_pairs": n_pairs})
                stats[result.name][cls][m] = entry
    settings = {"bootstrap_resamples": n_boot, "seed": seed, "confidence": confidence, "ci_method": "percentile",
                "test": "two-sided Wilcoxon signed-rank on paired per-case values (zero differences dropped)",
                "foreground": "per case, mean over the classes scored in that case; then the mean over cases",
                "difference": "other run - reference run, per case",
                "distance_unit": results[0].distance_unit}
    return Comparison(runs, metrics, classes, len(cases), stats, settings)


# --------------------------------------------------------------------------- outputs


def comparison_csv_text(comp: Comparison) -> str:
    columns = ["run", "class", "metric", "mean", "ci_low", "ci_high", "n",
               "diff_vs_reference", "diff_ci_low", "diff_ci_high", "p_value", "n_pairs"]
    keys = ["mean", "ci_low", "ci_high", "n", "diff", "diff_ci_low", "diff_ci_high", "p_value", "n_pairs"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for run in comp.runs:
        for cls in comp.classes:
            for m in comp.metrics:
                entry = comp.stats[run][cls][m]
                cells = []
                for key in keys:
                    value = entry.get(key)
                    if value is None or (isinstance(value, float) and math.isnan(value)):
                        cells.append("")
                    else:
                        cells.append(str(value) if isinstance(value, int) else repr(float(value)))
                writer.writerow([run, cls, m, *cells])
    return buffer.getvalue()


def write_comparison_chart(comp: Comparison, path: Path, metrics: Sequence[str] = CHART_METRICS) -> Path:
    """One panel per metric: the foreground mean of every run with its CI as an error bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = [m for m in metrics if m in comp.metrics]
    fig = Figure(figsize=(3.2 * max(len(shown), 1), 3.6 + 0.12 * len(comp.runs)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(shown), 1), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(comp.runs))]
    x = np.arange(len(comp.runs))
    for ax, m in zip(axes, shown):
        entries = [comp.stats[run][FOREGROUND][m] for run in comp.runs]
        means = np.array([e["mean"] for e in entries], dtype=float)
        low = np.array([e["ci_low"] for e in entries], dtype=float)
        high = np.array([e["ci_high"] for e in entries], dtype=float)
        heights = np.nan_to_num(means)
        err = np.vstack([np.nan_to_num(means - low), np.nan_to_num(high - means)])
        ax.bar(x, heights, color=colours, yerr=err, capsize=5, edgecolor="black", linewidth=0.5)
        for xi, e, top in zip(x[1:], entries[1:], high[1:]):
            p = e.get("p_value", math.nan)
            if isinstance(p, float) and not math.isnan(p):
                ax.annotate(f"p={p:.2g}", (xi, float(np.nan_to_num(top))), xytext=(0, 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=8)
        ax.set_xticks(x, comp.runs, rotation=30 if len(comp.runs) > 2 else 0, ha="right" if len(comp.runs) > 2 else "center")
        ax.set_title(m + (f" ({comp.unit})" if m in DISTANCE_METRICS else "") + (" ↓" if m in DISTANCE_METRICS else " ↑"))
        if m in ("dice", "iou", "nsd", "precision", "recall"):
            ax.set_ylim(0, 1.1)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Foreground mean over {comp.n_cases} cases, {int(CONFIDENCE * 100)}% bootstrap CI; "
                 f"p: Wilcoxon vs {comp.reference}", fontsize=9)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    return path


def write_comparison(comp: Comparison, out_dir: Path) -> tuple[Path, Path]:
    """Write ``comparison.csv`` and ``comparison.png`` into ``out_dir``."""
    csv_path = out_dir / "comparison.csv"
    atomic_write_text(csv_path, comparison_csv_text(comp))
    return csv_path, write_comparison_chart(comp, out_dir / "comparison.png")


def format_p_value(p: float) -> str:
    """``0.012``, ``<0.001``, or ``–`` when there is no p-value."""
    if p is None or math.isnan(p):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def comparison_table(comp: Comparison, metrics: Sequence[str] = TABLE_METRICS, cls: str = FOREGROUND) -> Table:
    """Per run: mean [95% CI] per metric; under it, the paired difference to the reference and p."""
    shown = [m for m in metrics if m in comp.metrics]
    table = Table(title=f"{cls} mean [{int(CONFIDENCE * 100)}% bootstrap CI], {comp.n_cases} cases; "
                        f"Δ and Wilcoxon p vs {comp.reference}")
    table.add_column("run", overflow="fold")
    for m in shown:
        table.add_column(m + (f" ({comp.unit})" if m in DISTANCE_METRICS else ""), justify="right", min_width=14, no_wrap=True)
    digits = {m: (2 if m in DISTANCE_METRICS or m == "volume_difference" else 3) for m in shown}
    for run in comp.runs:
        cells = []
        for m in shown:
            e = comp.stats[run][cls][m]
            d = digits[m]
            text = "–" if e["n"] == 0 else f"{e['mean']:.{d}f}\n[{e['ci_low']:.{d}f}, {e['ci_high']:.{d}f}]"
            if "diff" in e and e["n"]:
                text += f"\nΔ {e['diff']:+.{d}f}\np {format_p_value(e['p_value'])}"
            cells.append(text)
        table.add_row(f"{run}{' (ref)' if run == comp.reference else ''}", *cells, end_section=True)
    return table
