"""``unet eval``: pair predictions with references, score every case and class, write reports.

Outputs (written atomically):
- ``metrics.csv``: one row per case and class, one column per metric;
- ``summary.json``: mean, std, median and n per class and metric, the foreground mean over
  classes, the conventions used and how many cases had an empty mask.

Conventions: a class absent from both masks of a case scores NaN and is left out of means
(``n`` counts the cases that entered); a class absent from one mask gets Dice 0 and NaN
distances (see :mod:`unetcli.evaluation.metrics`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.table import Table

from unetcli.atomic import atomic_write_text
from unetcli.data.png import PNG_SUFFIX, read_png_mask
from unetcli.errors import DataError
from unetcli.evaluation.metrics import METRIC_NAMES, case_metrics

DEFAULT_TABLE_METRICS = ("dice", "iou", "hd95", "nsd")


@dataclass
class EvalResult:
    rows: list[dict[str, object]]
    """One dict per case and class: case, class, label, then one value per metric."""
    summary: dict[str, object]
    metrics: list[str]
    classes: list[str]
    cases: list[str] = field(default_factory=list)


def read_label_map(path: Path) -> np.ndarray:
    """A mask as class indices; binary 0/255 masks become 0/1 (as in training)."""
    labels = read_png_mask(path)
    values = np.unique(labels)
    if 255 in values and set(values.tolist()) <= {0, 255}:
        labels = (labels == 255).astype(np.int64)
    return labels


def _files(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {path.stem: path}
    if not path.is_dir():
        raise DataError(f"{path}: not found", hint="pass a folder (or file) of PNG masks")
    files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix.lower() == PNG_SUFFIX and not p.name.startswith(".")}
    if not files:
        raise DataError(f"{path}: no .png masks found")
    return files


def match_cases(pred: Path, truth: Path) -> list[tuple[str, Path, Path]]:
    """Pair prediction and reference files by stem; every unmatched file is an error."""
    preds, truths = _files(pred), _files(truth)
    if pred.is_file() and truth.is_file():
        return [(truth.stem, pred, truth)]
    problems = [f"{preds[s]}: no reference named {s}.png in {truth}" for s in sorted(set(preds) - set(truths))]
    problems += [f"{truths[s]}: no prediction named {s}.png in {pred}" for s in sorted(set(truths) - set(preds))]
    if problems:
        raise DataError.from_problems(problems, hint="predictions and references are paired by file name")
    return [(s, preds[s], truths[s]) for s in sorted(truths)]


def evaluate(pred: Path, truth: Path, labels: Sequence[int] | None = None, label_names: Sequence[str] | None = None,
             spacing: Sequence[float] | None = None, tolerance_mm: float = 1.0,
             metrics: Sequence[str] = METRIC_NAMES) -> EvalResult:
    """Score every matched case. ``labels`` default: every non-zero label found in either mask."""
    pairs = match_cases(pred, truth)
    loaded = []
    for name, p_path, t_path in pairs:
        p, t = read_label_map(p_path), read_label_map(t_path)
        if p.shape != t.shape:
            raise DataError(f"{p_path}: size {p.shape[::-1]} differs from reference {t_path} size {t.shape[::-1]} (W x H)",
                            hint="predict at the reference's size")
        loaded.append((name, p, t))
    if labels is None:
        found = set()
        for _, p, t in loaded:
            found |= set(np.unique(p).tolist()) | set(np.unique(t).tolist())
        labels = sorted(v for v in found if v != 0)
        if not labels:
            raise DataError(f"{truth}: every mask is all background; nothing to score", hint="pass --labels to score classes anyway")
    names = {lab: (label_names[lab] if label_names and lab < len(label_names) else str(lab)) for lab in labels}
    rows: list[dict[str, object]] = []
    for name, p, t in loaded:
        scores = case_metrics(p, t, list(labels), spacing=spacing, tolerance_mm=tolerance_mm, metrics=metrics)
        for lab in labels:
            rows.append({"case": name, "class": names[lab], "label": lab, **scores[str(lab)]})
    summary = summarise(rows, [names[lab] for lab in labels], list(metrics), tolerance_mm, spacing)
    return EvalResult(rows, summary, list(metrics), [names[lab] for lab in labels], [n for n, _, _ in pairs])


def _stats(values: list[float]) -> dict[str, float | int]:
    arr = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "median": float(np.median(arr)), "n": int(arr.size)}


def summarise(rows: list[dict[str, object]], classes: list[str], metrics: list[str], tolerance_mm: float,
              spacing: Sequence[float] | None) -> dict[str, object]:
    per_class: dict[str, dict[str, object]] = {}
    for cls in classes:
        cls_rows = [r for r in rows if r["class"] == cls]
        per_class[cls] = {m: _stats([float(r[m]) for r in cls_rows]) for m in metrics}  # type: ignore[arg-type]
        if "dice" in metrics:
            per_class[cls]["cases_absent_in_both"] = sum(1 for r in cls_rows if math.isnan(float(r["dice"])))  # type: ignore[arg-type]
            per_class[cls]["cases_one_mask_empty"] = sum(1 for r in cls_rows if float(r["dice"]) == 0.0)  # type: ignore[arg-type]
    foreground = {}
    for m in metrics:
        means = [per_class[c][m]["mean"] for c in classes]  # type: ignore[index]
        finite = [v for v in means if not math.isnan(v)]
        foreground[m] = float(np.mean(finite)) if finite else math.nan
    return {
        "cases": len({r["case"] for r in rows}),
        "classes": per_class,
        "foreground_mean": foreground,
        "conventions": {
            "both_empty": "NaN, excluded from means (n counts the cases that entered)",
            "one_empty": "Dice/IoU 0; HD, HD95, ASSD NaN; NSD 0",
            "distances": "mm, between surface voxel centres, surfaces as in MONAI",
            "spacing": list(spacing) if spacing else "1 per axis (pixel units)",
            "nsd_tolerance_mm": tolerance_mm,
        },
    }


def _json_safe(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_reports(result: EvalResult, out_dir: Path) -> tuple[Path, Path]:
    """Write ``metrics.csv`` and ``summary.json`` into ``out_dir`` (NaN is an empty CSV cell / JSON null)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["case", "class", "label", *result.metrics], lineterminator="\n")
    writer.writeheader()
    for row in result.rows:
        writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    csv_path, json_path = out_dir / "metrics.csv", out_dir / "summary.json"
    atomic_write_text(csv_path, buffer.getvalue())
    atomic_write_text(json_path, json.dumps(_json_safe(result.summary), indent=2) + "\n")
    return csv_path, json_path


def summary_table(result: EvalResult, metrics: Sequence[str] = DEFAULT_TABLE_METRICS) -> Table:
    """Mean ± std per class (and the foreground mean) for the terminal."""
    shown = [m for m in metrics if m in result.metrics]
    table = Table(title=f"{result.summary['cases']} case(s): mean ± std")
    table.add_column("class", no_wrap=True)
    for m in shown:
        table.add_column(m, justify="right", no_wrap=True)
    table.add_column("n", justify="right")
    classes = result.summary["classes"]
    for cls in result.classes:
        stats = classes[cls]  # type: ignore[index]
        cells = [f"{stats[m]['mean']:.3f}±{stats[m]['std']:.3f}" if stats[m]["n"] else "–" for m in shown]
        table.add_row(cls, *cells, str(stats[shown[0]]["n"] if shown else ""))
    fg = result.summary["foreground_mean"]
    table.add_row("[bold]foreground mean[/bold]", *[f"[bold]{fg[m]:.3f}[/bold]" for m in shown], "", end_section=True)  # type: ignore[index]
    return table
