"""``unet eval``: pair predictions with references, score every case and class, write reports.

One prediction folder: ``out/metrics.csv`` + ``out/summary.json`` (:mod:`unetcli.evaluation.summary`).
Several (compare mode): the same per run in ``out/RUN/``, plus ``out/comparison.csv``,
``out/comparison.png`` and ``out/summary.json`` (:mod:`unetcli.evaluation.stats`). Optionally
overlays of the worst cases (:mod:`unetcli.evaluation.overlays`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unetcli.atomic import output_folder, real_path
from unetcli.errors import ConfigError, DataError, OutputError
from unetcli.evaluation.cases import unique_run_names
from unetcli.evaluation.labels import dataset_label_names, dataset_regions_and_ignore, metadata_label_names
from unetcli.evaluation.overlays import write_overlays
from unetcli.evaluation.quality_fit import signal_correlations
from unetcli.evaluation.scoring import evaluate_runs
from unetcli.evaluation.stats import Comparison, compare_results, write_comparison
from unetcli.evaluation.summary import EvalResult, write_json, write_reports
from unetcli.inference.quality_report import read_folder_rows


@dataclass
class EvalOutcome:
    results: list[EvalResult]
    comparison: Comparison | None = None  # in compare mode
    written: list[Path] = field(default_factory=list)
    quality: dict[str, Any] | None = None
    """How the quality estimates in PRED/predictions.csv track the real Dice (one prediction folder)."""


# --------------------------------------------------------------------------- class names


def checkpoint_label_names(run: Path) -> dict[int, str]:
    """Class names stored in the checkpoint of ``run`` (a run folder or a ``.pt`` file)."""
    # Imported here, not at the top: it imports torch, which costs start-up time and makes the
    # scoring pool use forkserver instead of fork (see unetcli.evaluation.scoring._start_method).
    from unetcli.checkpoint import load_checkpoint, resolve_checkpoint

    return metadata_label_names(load_checkpoint(resolve_checkpoint(run))["metadata"], run)


def resolve_label_names(label_names: Sequence[str] | None = None, run: Path | None = None,
                        truth: Path | None = None) -> dict[int, str] | None:
    """``--label-names`` (in label order) > ``--run``'s checkpoint > ``dataset.json`` > None."""
    if label_names:
        return {i: str(n).strip() for i, n in enumerate(label_names)}
    if run is not None:
        return checkpoint_label_names(run)
    if truth is not None:
        return dataset_label_names(truth)
    return None


def with_dataset_label_structure(truth: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Regions and the ignore label from the references' ``dataset.json`` where not given: a
    region dataset is scored per region (unless ``labels`` asks for classes), and ``ignore``
    voxels are not scored."""
    regions, ignore = dataset_regions_and_ignore(truth)
    options = dict(options)
    if regions and options.get("regions") is None and options.get("labels") is None:
        options["regions"] = regions
    if ignore is not None and options.get("ignore_label") is None:
        options["ignore_label"] = ignore
    return options


# --------------------------------------------------------------------------- the command


def _check_outputs(out: Path, inputs: Sequence[Path], names: Sequence[str], overlays: Path | None,
                   overwrite: bool) -> None:
    """Refuse, before scoring, outputs inside an input folder, and (without ``overwrite``) outputs that exist."""
    for target in [out] + ([overlays] if overlays else []):
        resolved = real_path(target)
        for inp in inputs:
            folder = real_path(inp) if inp.is_dir() else real_path(inp).parent
            if resolved == folder or folder in resolved.parents:
                raise OutputError(f"{target}: output folder is (inside) the input folder {inp}",
                                  hint="write evaluation outputs to a separate folder (--out / --overlays)")
        if target.exists() and not target.is_dir():
            raise OutputError(f"{target}: exists and is not a folder", hint="pass a folder")
    if overwrite:
        return
    existing = [out / n for n in names if (out / n).exists()]
    if existing:
        raise OutputError(f"{out}: already holds {', '.join(p.name for p in existing[:4])}",
                          hint="pass --overwrite or another --out")
    if overlays is not None and overlays.is_dir() and any(overlays.rglob("*.png")):
        raise OutputError(f"{overlays}: already holds PNG files", hint="pass --overwrite or another --overlays folder")


def _write_comparison_reports(results: list[EvalResult], truth: Path, out: Path, outcome: EvalOutcome) -> None:
    """Compare mode: every run's reports in ``out/RUN/``, the comparison and the overall ``summary.json``."""
    for result in results:
        outcome.written.extend(write_reports(result, out / result.name))
    comparison = compare_results(results)
    outcome.comparison = comparison
    outcome.written.extend(write_comparison(comparison, out))
    summary = {"reference": str(truth), "runs": {r.name: {"predictions": r.summary["run"], "reports": r.name}
                                                 for r in results},
               "cases": results[0].summary["cases"], "conventions": results[0].summary["conventions"],
               "comparison": comparison.as_dict()}
    outcome.written.append(write_json(out / "summary.json", summary))


def run_evaluation(preds: Sequence[Path], truth: Path, out: Path, *, overlays: Path | None = None,
                   worst: int = 5, image_dir: Path | None = None, overwrite: bool = False,
                   trackers: Sequence[str] = (), **options: Any) -> EvalOutcome:
    """``unet eval``: score, write the reports (and in compare mode the comparison), draw overlays.

    One prediction folder: ``out/metrics.csv`` + ``out/summary.json``. Several (compare mode):
    ``out/RUN/metrics.csv`` + ``out/RUN/summary.json`` per run, ``out/comparison.csv``,
    ``out/comparison.png`` and ``out/summary.json`` (runs, conventions, comparison). Overlays go to
    ``overlays/CASE.png`` (compare mode: ``overlays/RUN/CASE.png``). ``options`` go to
    :func:`~unetcli.evaluation.scoring.evaluate_runs`.
    """
    if worst < 1:
        raise ConfigError(f"--worst {worst} must be at least 1")
    if image_dir is not None and not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found", hint="--image-dir takes the folder of the cases' images")
    compare = len(preds) > 1
    run_names = unique_run_names(preds)
    names = ["summary.json", "comparison.csv", "comparison.png", *run_names] if compare else ["metrics.csv", "summary.json"]
    _check_outputs(out, [*preds, truth] + ([image_dir] if image_dir else []), names, overlays, overwrite)
    results = evaluate_runs(preds, truth, **with_dataset_label_structure(truth, options))
    outcome = EvalOutcome(results, quality=None if compare else quality_agreement(preds[0], results[0]))
    with output_folder(out, "output folder", hint="choose a writable --out"):  # a failed write leaves no empty folder
        if compare:
            _write_comparison_reports(results, truth, out, outcome)
        else:
            outcome.written.extend(write_reports(results[0], out))
    track_evaluation(trackers, results, truth, out)
    if overlays is not None:
        for result in results:
            outcome.written.extend(write_overlays(result, overlays / result.name if compare else overlays,
                                                  worst, image_dir))
    return outcome


def quality_agreement(pred: Path, result: EvalResult) -> dict[str, Any] | None:
    """Spearman's rho between each quality signal of ``pred/predictions.csv`` (written by ``unet
    predict``) and the real per-case Dice (mean over the scored classes), added to the summary;
    None without such a file."""
    rows = read_folder_rows(pred)
    if not rows:
        return None
    dice = {case: float(v) for case, v in zip(result.cases, result.foreground_values("dice"))}
    matched = sum(1 for r in rows if r["case"] in dice)
    quality = {"file": str(pred / "predictions.csv"), "cases_joined": matched,
               "real_dice": "per case, the mean Dice over the scored classes",
               "spearman": signal_correlations(rows, dice)}
    result.summary["quality_estimate"] = quality
    return quality


def track_evaluation(trackers: Sequence[str], results: list[EvalResult], truth: Path, out: Path) -> None:
    """``--log-to``: per run and class the mean of every metric, and the (case, class) rows as a table;
    the experiment is named after the references' dataset (the folder above ``masks``/``labelsTs``)."""
    if not trackers:
        return
    import warnings

    import numpy as np

    from unetcli.tracking import log_evaluation

    means, rows = {}, []
    warnings.filterwarnings("ignore", "Mean of empty slice", RuntimeWarning)
    for result in results:
        prefix = f"{result.name}/" if len(results) > 1 else ""
        for metric in result.metrics:
            for cls in result.classes:
                means[f"{prefix}{metric}_{cls}"] = float(np.nanmean(result.values(metric, cls)))
            means[f"{prefix}{metric}_mean"] = float(np.nanmean(result.foreground_values(metric)))
        rows += [{"run": result.name, **row} if len(results) > 1 else dict(row) for row in result.rows]
    reference = truth.resolve() if truth.is_dir() else truth.resolve().parent
    generic = reference.name.lower() in {"masks", "labels", "labelsts", "labelstr", "test", "val"}
    log_evaluation(trackers, out, reference.parent.name if generic else reference.name, rows, means)
