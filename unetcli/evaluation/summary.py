"""Scores of one run: the result object, its summary, ``metrics.csv`` / ``summary.json`` and the terminal table.

Outputs (written atomically)
----------------------------
- ``metrics.csv``: long form, one row per case, class and metric: ``case, class, label, metric,
  value``; ``label`` is the label value, or ``1+2+3`` for a region; NaN is an empty cell.
- ``summary.json``: per class and metric ``{mean, std, median, n}`` (``std`` is the population
  standard deviation, ``n`` the number of cases that entered the mean); per class
  ``cases_absent_in_both``, ``cases_one_mask_empty`` (split into ``cases_prediction_empty`` and
  ``cases_reference_empty``); ``foreground_mean`` (per metric, the mean over classes of the
  class means); the ``conventions`` used (:func:`conventions`); the spacings met.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from unetcli.atomic import atomic_write_text
from unetcli.evaluation.cases import CasePair

DEFAULT_TABLE_METRICS = ("dice", "hd95", "assd", "nsd")
DISTANCE_METRICS = ("hd", "hd95", "assd")


@dataclass
class EvalResult:
    rows: list[dict[str, object]]
    """One dict per case and class: case, class, label, then one value per metric."""
    summary: dict[str, object]
    metrics: list[str]
    classes: list[str]
    cases: list[str] = field(default_factory=list)
    pairs: list[CasePair] = field(default_factory=list)
    kind: str = "png"  # "png" or "nifti"
    groups: dict[str, list[int]] = field(default_factory=dict)  # class name -> label values
    spacings: dict[str, tuple[float, ...] | None] = field(default_factory=dict)  # case -> spacing used
    name: str = ""  # the run's name (prediction folder name)

    @property
    def distance_unit(self) -> str:
        """"mm" for NIfTI or a given spacing, "px" for PNG masks scored in pixel units."""
        return "mm" if self.kind == "nifti" or any(sp is not None for sp in self.spacings.values()) else "px"

    def values(self, metric: str, cls: str) -> np.ndarray:
        """Per-case values of ``metric`` for class ``cls``, in ``cases`` order (NaN kept)."""
        by_case = {r["case"]: float(r[metric]) for r in self.rows if r["class"] == cls}  # type: ignore[arg-type]
        return np.array([by_case[c] for c in self.cases], dtype=np.float64)

    def foreground_values(self, metric: str) -> np.ndarray:
        """Per case, the mean of ``metric`` over the classes scored in that case (NaN if none)."""
        stack = np.stack([self.values(metric, c) for c in self.classes])
        out = np.full(stack.shape[1], np.nan)
        finite = np.isfinite(stack).any(axis=0)
        out[finite] = np.nanmean(stack[:, finite], axis=0)
        return out


# --------------------------------------------------------------------------- the summary


def _stats(values: Iterable[float]) -> dict[str, float | int]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "median": float(np.median(arr)), "n": int(arr.size)}


def conventions(tolerance_mm: float, keep_empty: bool, kind: str = "png",
                spacing_given: Sequence[float] | None = None) -> dict[str, object]:
    """The conventions behind the numbers, as written into ``summary.json``."""
    if spacing_given:
        spacing_text = f"given: {list(spacing_given)} mm per array axis"
    elif kind == "nifti":
        spacing_text = "from each reference's NIfTI affine (voxel size along each array axis X, Y, Z), mm"
    else:
        spacing_text = "1 per axis (pixel units; pass --spacing ROW,COL for mm)"
    return {
        "both_empty": ("Dice/IoU/precision/recall/NSD 1, HD/HD95/ASSD/volume difference 0, included in means (--keep-empty)"
                       if keep_empty else "every metric NaN, excluded from means (n counts the cases that entered)"),
        "one_empty": "Dice/IoU/NSD 0; HD, HD95, ASSD NaN (never inf), excluded from their means and counted in "
                     "cases_one_mask_empty; precision NaN if the prediction is empty, recall NaN if the reference is",
        "distances": "mm, between surface voxel centres; surface = voxels removed by one face-connected erosion "
                     "(as MONAI); HD95 = max of the two directed 95th percentiles; ASSD = mean of the pooled "
                     "distances of both directions; NSD counts distances <= tolerance",
        "volume_difference": "(|P| - |T|) x voxel volume in mm^3, signed (positive = over-segmentation)",
        "spacing": spacing_text,
        "nsd_tolerance_mm": tolerance_mm,
        "std": "population standard deviation (ddof=0) over the cases that entered the mean",
        "foreground_mean": "per metric, the mean over classes of the class means",
    }


def _class_summary(cls_rows: list[dict[str, object]], metrics: list[str],
                   pairs: Sequence[tuple[int, int]]) -> dict[str, object]:
    """One class: its label, the statistics of every metric, and how many cases had empty masks."""
    entry: dict[str, object] = {"label": cls_rows[0]["label"] if cls_rows else ""}
    entry.update({m: _stats(float(r[m]) for r in cls_rows) for m in metrics})  # type: ignore[arg-type]
    entry["cases_absent_in_both"] = sum(1 for p, t in pairs if p == 0 and t == 0)
    entry["cases_prediction_empty"] = sum(1 for p, t in pairs if p == 0 and t > 0)
    entry["cases_reference_empty"] = sum(1 for p, t in pairs if p > 0 and t == 0)
    entry["cases_one_mask_empty"] = entry["cases_prediction_empty"] + entry["cases_reference_empty"]  # type: ignore[operator]
    return entry


def summarise(rows: list[dict[str, object]], classes: list[str], metrics: list[str],
              counts: Mapping[str, Sequence[tuple[int, int]]] | None = None, tolerance_mm: float = 1.0,
              keep_empty: bool = False, kind: str = "png", spacing_given: Sequence[float] | None = None,
              spacings: Sequence[tuple[float, ...] | None] = ()) -> dict[str, object]:
    """Mean, std, median, n per class and metric; empty-mask counts; foreground mean; conventions.

    ``counts``: per class, one ``(prediction voxels, reference voxels)`` per case.
    """
    per_class = {cls: _class_summary([r for r in rows if r["class"] == cls], metrics,
                                     list(counts.get(cls, [])) if counts else [])
                 for cls in classes}
    foreground = {}
    for m in metrics:
        means = [per_class[c][m]["mean"] for c in classes]  # type: ignore[index]
        finite = [v for v in means if not math.isnan(v)]
        foreground[m] = float(np.mean(finite)) if finite else math.nan
    seen = sorted({tuple(round(float(s), 6) for s in sp) for sp in spacings if sp is not None})
    return {
        "cases": len({r["case"] for r in rows}),
        "classes": per_class,
        "foreground_mean": foreground,
        "conventions": conventions(tolerance_mm, keep_empty, kind, spacing_given),
        "spacings_mm": [list(s) for s in seen[:20]],
    }


# --------------------------------------------------------------------------- writing


def json_safe(value: object) -> object:
    """NaN/inf -> None (JSON null), numpy scalars -> Python numbers, tuples -> lists."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, value: object) -> Path:
    """``value`` as indented JSON (NaN as null), written atomically."""
    atomic_write_text(path, json.dumps(json_safe(value), indent=2) + "\n")
    return path


def metrics_csv_text(result: EvalResult) -> str:
    """The long-form CSV: ``case, class, label, metric, value`` (NaN is an empty cell)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["case", "class", "label", "metric", "value"])
    for row in result.rows:
        for m in result.metrics:
            value = float(row[m])  # type: ignore[arg-type]
            writer.writerow([row["case"], row["class"], row["label"], m, "" if math.isnan(value) else repr(value)])
    return buffer.getvalue()


def write_reports(result: EvalResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``metrics.csv`` (long form) and ``summary.json`` into ``out_dir``."""
    csv_path = out_dir / "metrics.csv"
    atomic_write_text(csv_path, metrics_csv_text(result))
    return csv_path, write_json(out_dir / "summary.json", result.summary)


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def summary_table(result: EvalResult, metrics: Sequence[str] = DEFAULT_TABLE_METRICS) -> Table:
    """Mean ± std per class (and the foreground mean) for the terminal."""
    shown = [m for m in metrics if m in result.metrics]
    title = f"{result.summary['cases']} case(s): mean ± std"
    if result.name:
        title = f"{result.name}: {title}"
    table = Table(title=title)
    table.add_column("class", no_wrap=True)
    for m in shown:
        table.add_column(m + (f" ({result.distance_unit})" if m in DISTANCE_METRICS else ""), justify="right", no_wrap=True)
    table.add_column("n", justify="right")
    classes = result.summary["classes"]
    one_empty = 0
    for cls in result.classes:
        stats = classes[cls]  # type: ignore[index]
        cells = [f"{stats[m]['mean']:.3f}±{stats[m]['std']:.3f}" if stats[m]["n"] else "–" for m in shown]
        table.add_row(cls, *cells, str(stats[shown[0]]["n"] if shown else ""))
        one_empty += int(stats["cases_one_mask_empty"])
    fg = result.summary["foreground_mean"]
    table.add_row("[bold]foreground mean[/bold]", *[f"[bold]{_fmt(fg[m])}[/bold]" for m in shown], "", end_section=True)  # type: ignore[index]
    if one_empty:
        table.caption = (f"{one_empty} case/class pair(s) with exactly one empty mask: Dice 0, distances NaN "
                         "(left out of the distance means; see summary.json)")
    return table
