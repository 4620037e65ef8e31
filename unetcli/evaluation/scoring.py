"""Score every case and class of one or more prediction folders, in worker processes.

Conventions (defaults; :mod:`unetcli.evaluation.metrics` has the metric definitions)
-------------------------------------------------------------------------------------
- A class absent from both masks of a case: every metric NaN, left out of means (``n`` says how
  many cases entered). With ``keep_empty`` such a pair counts as perfect instead: Dice, IoU,
  precision, recall and NSD 1, HD, HD95, ASSD and volume difference 0 (and it enters the means).
- A class absent from exactly one mask: Dice = IoU = NSD = 0; HD, HD95 and ASSD are NaN (never
  an infinity in a mean) and counted in ``cases_one_mask_empty``; precision is NaN when the
  prediction is empty, recall NaN when the reference is empty.
- Default classes: every non-zero label found in any prediction or reference. ``regions`` adds
  region classes (the union of several labels, e.g. whole tumour = 1+2+3); with regions and no
  explicit ``labels`` only the regions are scored.

Cases are scored in worker processes (``jobs``), each reading its own pair of files
(:mod:`unetcli.evaluation.cases`); :mod:`unetcli.evaluation.summary` turns the scores into
``metrics.csv`` and ``summary.json``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.errors import ConfigError, DataError, UnetCliError
from unetcli.evaluation.cases import CasePair, find_cases, read_pair, unique_run_names
from unetcli.evaluation.metrics import METRIC_NAMES, case_metrics
from unetcli.evaluation.summary import EvalResult, summarise

PERFECT_VALUES = {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "nsd": 1.0,
                  "volume_difference": 0.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0}
"""What ``keep_empty`` assigns to a class absent from both masks."""

# How worker processes start (see _start_method). Measured on this project's 2-core machine,
# starting a 2-worker pool and getting a first result: fork 0.07 s; forkserver 5-6 s and spawn
# 7-9 s when the main script imports torch (both re-import the main module in every worker),
# about 1 s from the `unet` command. One 160x160x128 case with 3 classes takes about 1 s.
PARALLEL_MIN_SECONDS = 1.0
"""Use worker processes only when the remaining cases are estimated to take longer than this."""


@dataclass
class CaseScores:
    """What one worker returns for one case."""

    name: str
    scores: dict[str, dict[str, float]]  # class key -> metric -> value
    counts: dict[str, tuple[int, int]]  # class key -> (prediction voxels, reference voxels)
    spacing: tuple[float, ...] | None
    shape: tuple[int, ...]
    above_ignore: tuple[int, ...] = ()  # reference label values above the ignore label (refused once, for all cases)


# --------------------------------------------------------------------------- one case (worker)


@dataclass(frozen=True)
class _Task:
    pair: CasePair
    kind: str
    groups: dict[str, list[int]] | None  # None: every non-zero label found in the case
    spacing: tuple[float, ...] | None  # None: the NIfTI header's, or 1 for PNG
    tolerance_mm: float
    metrics: tuple[str, ...]
    keep_empty: bool
    ignore_label: int | None = None


def _label_counts(arr: np.ndarray) -> dict[int, int]:
    """``{label value: voxel count}`` of a non-negative integer label map."""
    if arr.size == 0:
        return {}
    if int(arr.max()) < 1 << 16:
        counts = np.bincount(arr.ravel())
        nonzero = np.flatnonzero(counts)
        return dict(zip(nonzero.tolist(), counts[nonzero].tolist()))
    values, counts = np.unique(arr, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


def _absent_scores(metrics: Sequence[str], keep_empty: bool) -> dict[str, float]:
    return {m: (PERFECT_VALUES[m] if keep_empty else math.nan) for m in metrics}


def score_case(task: _Task) -> CaseScores:
    """Read one pair and compute every metric for every class (in the worker process)."""
    pred, truth, spacing = read_pair(task.pair, task.kind, task.spacing)
    above: tuple[int, ...] = ()
    if task.ignore_label is not None:  # unlabelled reference voxels: background in both masks, so never scored
        above = tuple(sorted(int(v) for v in np.unique(truth) if v > task.ignore_label))
        unlabelled = truth == task.ignore_label
        pred, truth = np.where(unlabelled, 0, pred), np.where(unlabelled, 0, truth)
    if spacing is not None and len(spacing) != pred.ndim:
        raise ConfigError(f"--spacing has {len(spacing)} value(s) but {task.pair.truth} has {pred.ndim} axes",
                          hint="give one spacing per axis (PNG: ROW,COL; NIfTI: X,Y,Z)")
    c_pred, c_truth = _label_counts(pred), _label_counts(truth)
    groups = task.groups
    if groups is None:  # the ignore label is no class, even where a prediction holds its value
        groups = {str(v): [v] for v in sorted((set(c_pred) | set(c_truth)) - {0, task.ignore_label})}
    scores = case_metrics(pred, truth, groups, spacing=spacing, tolerance_mm=task.tolerance_mm,
                          metrics=task.metrics) if groups else {}
    counts = {key: (sum(c_pred.get(v, 0) for v in vals), sum(c_truth.get(v, 0) for v in vals))
              for key, vals in groups.items()}
    if task.keep_empty:
        for key, (n_pred, n_truth) in counts.items():
            if n_pred == 0 and n_truth == 0:
                scores[key] = _absent_scores(task.metrics, True)
    return CaseScores(task.pair.name, scores, counts, spacing, tuple(pred.shape), above)


def _score_task(task: _Task) -> tuple[str, Any]:
    """Worker entry point: a result, or a project error as plain data (it crosses a process)."""
    try:
        return "ok", score_case(task)
    except UnetCliError as exc:
        return "error", (type(exc).__name__, exc.message, exc.hint)


# --------------------------------------------------------------------------- the process pool


def _start_method() -> str:
    """"fork" when this process is single-threaded and has not imported torch, else "forkserver".

    fork starts workers in milliseconds and does not re-import ``__main__`` (so it also works
    from notebooks and stdin scripts), and the workers only run numpy/scipy/nibabel/Pillow code.
    It is only unsafe when another thread may hold a lock at the moment of the fork: torch's
    thread pools (after ``--run`` read a checkpoint, or in a test session) or any Python thread.
    Then a fresh single-threaded server forks the workers instead (``forkserver``, which
    preloads this module). Platforms without fork (Windows, and macOS by default) use spawn.
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and sys.platform == "linux" and "torch" not in sys.modules and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def default_jobs() -> int:
    """Worker processes by default: the usable CPU cores, at most 4."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def _score_in_pool(tasks: list[_Task], jobs: int, on_done: Callable[[], None] | None) -> list[tuple[str, Any]]:
    """Score ``tasks`` in ``jobs`` worker processes, in order."""
    method = _start_method()
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])  # numpy, scipy, nibabel imported once, in the server
    outcomes = []
    try:
        with ProcessPoolExecutor(jobs, mp_context=context) as pool:
            for outcome in pool.map(_score_task, tasks, chunksize=1):
                outcomes.append(outcome)
                if on_done:
                    on_done()
    except BrokenProcessPool as exc:
        raise UnetCliError(f"an evaluation worker process died ({exc})",
                           hint="out of memory? run again with fewer --jobs (e.g. --jobs 1)") from exc
    return outcomes


def _raise_worker_errors(outcomes: list[tuple[str, Any]]) -> None:
    """One error listing every distinct problem the workers met; a ConfigError if they all were."""
    errors = [value for status, value in outcomes if status == "error"]
    if not errors:
        return
    messages = list(dict.fromkeys(message for _, message, _ in errors))  # one line per distinct problem
    hints = [hint for _, _, hint in errors if hint]
    error = DataError.from_problems(messages, hint=hints[0] if hints else None)
    if {kind for kind, _, _ in errors} == {"ConfigError"}:
        raise ConfigError(error.message, error.hint)
    raise error


def _run_tasks(tasks: list[_Task], jobs: int, parallel_min_seconds: float,
               on_done: Callable[[], None] | None = None) -> list[CaseScores]:
    """Score every task; the first in this process (its time decides whether a pool pays off)."""
    if not tasks:
        return []
    start = time.perf_counter()
    outcomes = [_score_task(tasks[0])]
    if on_done:
        on_done()
    rest = tasks[1:]
    first_seconds = time.perf_counter() - start
    jobs = max(1, min(jobs, len(rest)))
    if jobs > 1 and first_seconds * len(rest) >= parallel_min_seconds:
        outcomes += _score_in_pool(rest, jobs, on_done)
    else:
        for task in rest:
            outcomes.append(_score_task(task))
            if on_done:
                on_done()
    _raise_worker_errors(outcomes)
    return [value for _, value in outcomes]


def _run_tasks_with_progress(tasks: list[_Task], jobs: int, parallel_min_seconds: float) -> list[CaseScores]:
    """:func:`_run_tasks` with a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import Progress

    # auto_refresh=False: no refresh thread, so worker processes can still be forked safely.
    with Progress(console=Console(stderr=True), transient=True, auto_refresh=False) as bar:
        task_id = bar.add_task("scoring cases", total=len(tasks))

        def advance() -> None:
            bar.advance(task_id)
            bar.refresh()

        return _run_tasks(tasks, jobs, parallel_min_seconds, advance)


# --------------------------------------------------------------------------- evaluation


def _class_layout(labels: Sequence[int] | None, regions: Mapping[str, Sequence[int]] | None,
                  found: Iterable[int], names: Mapping[int, str] | None
                  ) -> tuple[list[str], dict[str, list[int]], dict[str, str]]:
    """(class keys, key -> label values, key -> display name)."""
    groups: dict[str, list[int]] = {}
    display: dict[str, str] = {}
    singles = list(labels) if labels is not None else ([] if regions else sorted(set(found) - {0}))
    for lab in singles:
        groups[str(lab)] = [int(lab)]
        display[str(lab)] = names.get(int(lab), str(lab)) if names else str(lab)
    for region, values in (regions or {}).items():
        key = f"region:{region}"
        groups[key] = [int(v) for v in values]
        display[key] = region
    seen: dict[str, int] = {}
    for name in display.values():
        seen[name] = seen.get(name, 0) + 1
    for key in display:  # two classes with one name: tell them apart by their labels
        if seen[display[key]] > 1:
            display[key] = f"{display[key]} ({'+'.join(map(str, groups[key]))})"
    return list(groups), groups, display


def _check_ignore_label(ignore_label: int | None, labels: Sequence[int] | None, regions: Mapping[str, Sequence[int]] | None,
                        names: Mapping[int, str] | None) -> None:
    """The ignore label marks unlabelled voxels: never background, never a class that is scored or named."""
    if ignore_label is None:
        return
    if ignore_label <= 0:
        raise ConfigError(f"--ignore-label {ignore_label}: must be a label value > 0 (0 is background)",
                          hint="the ignore label is the highest label value, marking unlabelled voxels")
    scored = [int(v) for v in labels or []] + [int(v) for values in (regions or {}).values() for v in values]
    if ignore_label in scored:
        raise ConfigError(f"--ignore-label {ignore_label} is also a label to score (--labels / --region)",
                          hint="unlabelled voxels are never scored; drop it from --labels / --region")
    name = (names or {}).get(ignore_label)
    if name is not None and name.strip().lower() != "ignore":
        raise ConfigError(f"--ignore-label {ignore_label} is the class '{name}' of the class names given",
                          hint="the ignore label is the highest label value, named 'ignore' in dataset.json")


def _refuse_labels_above_ignore(scored: Sequence[CaseScores], ignore_label: int | None, truth: Path) -> None:
    """nnU-Net's convention: the ignore label is the highest label value. A reference above it means
    a real class was named as the ignore label; its voxels would silently go unscored."""
    bad = [case for case in scored if case.above_ignore]
    if ignore_label is None or not bad:
        return
    values = sorted({v for case in bad for v in case.above_ignore})
    raise ConfigError(f"{truth}: {len(bad)} reference(s) (e.g. {bad[0].name}) hold label value(s) {values[:5]} above the "
                      f"ignore label {ignore_label}",
                      hint="the ignore label must be the highest label value (a real class is never ignored); "
                           "check --ignore-label or the 'ignore' entry of dataset.json")


def _check_options(tolerance_mm: float, spacing: Sequence[float] | None, labels: Sequence[int] | None,
                   regions: Mapping[str, Sequence[int]] | None) -> None:
    """Refuse option values no case could be scored with, before any file is read."""
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ConfigError(f"--tolerance {tolerance_mm} must be a finite number >= 0 (mm)")
    if spacing is not None and (not spacing or any(not math.isfinite(s) or s <= 0 for s in spacing)):
        raise ConfigError(f"--spacing {','.join(map(str, spacing))}: every value must be a number > 0 (mm)")
    if labels is not None and (not labels or any(int(v) < 0 for v in labels)):
        raise ConfigError("--labels must list label values >= 0, e.g. --labels 1,2")
    for region, values in (regions or {}).items():
        if not values or any(int(v) < 0 for v in values):
            raise ConfigError(f"--region {region}: needs label values >= 0, e.g. --region {region}=1,2,3")


def _pair_runs(preds: Sequence[Path], truth: Path) -> tuple[str, list[list[CasePair]]]:
    """``(kind, pairs of every run)``; one error listing the unmatched files of all runs."""
    problems: list[str] = []
    runs: list[tuple[str, list[CasePair]]] = []
    for pred in preds:
        try:
            runs.append(find_cases(pred, truth))
        except DataError as exc:
            problems.extend(exc.message.splitlines())
    if problems:
        raise DataError.from_problems(problems, hint="predictions and references are paired by file name")
    kinds = {kind for kind, _ in runs}
    if len(kinds) > 1:
        raise DataError("the prediction folders mix PNG and NIfTI files")
    return kinds.pop(), [pairs for _, pairs in runs]


def _spacing_per_axis(spacing: Sequence[float] | None, kind: str) -> tuple[float, ...] | None:
    """``--spacing`` with one value per axis of ``kind``'s masks (one value is repeated)."""
    if spacing is None:
        return None
    sp = tuple(float(s) for s in spacing)
    axes = 2 if kind == "png" else 3
    if len(sp) == 1:
        sp = sp * axes
    if len(sp) != axes:
        raise ConfigError(f"--spacing {','.join(map(str, spacing))}: {kind.upper()} masks have {axes} axes, "
                          f"give {axes} values (or one for all)",
                          hint="PNG: --spacing ROW,COL; NIfTI: --spacing X,Y,Z (overrides the header)")
    return sp


def evaluate_runs(preds: Sequence[Path], truth: Path, labels: Sequence[int] | None = None,
                  label_names: Sequence[str] | Mapping[int, str] | None = None,
                  regions: Mapping[str, Sequence[int]] | None = None, spacing: Sequence[float] | None = None,
                  tolerance_mm: float = 1.0, metrics: Sequence[str] = METRIC_NAMES, keep_empty: bool = False,
                  jobs: int = 1, parallel_min_seconds: float = PARALLEL_MIN_SECONDS,
                  progress: bool = False, ignore_label: int | None = None) -> list[EvalResult]:
    """Score one or more prediction folders against ``truth``; all runs get the same classes.

    ``labels`` default: every non-zero label found in any file (of any run). ``label_names``:
    names in label order, or ``{label: name}``. ``regions``: ``{name: [labels]}`` scored as
    the union of the labels. ``jobs``: worker processes (the cases of all runs are shared out).
    ``ignore_label``: reference voxels with this value (partial annotations) are not scored:
    they count as background in both masks (exact for Dice and the overlap metrics; surface
    distances then also see the edge of the labelled area).
    """
    _check_options(tolerance_mm, spacing, labels, regions)
    names = dict(enumerate(label_names)) if isinstance(label_names, Sequence) else (dict(label_names) if label_names else None)
    _check_ignore_label(ignore_label, labels, regions, names)
    kind, runs = _pair_runs(preds, truth)
    given = _class_layout(labels, regions, [], names)[1] if labels is not None or regions else None
    sp = _spacing_per_axis(spacing, kind)
    tasks = [_Task(pair, kind, given, sp, float(tolerance_mm), tuple(metrics), keep_empty, ignore_label)
             for pairs in runs for pair in pairs]
    if progress:
        scored = _run_tasks_with_progress(tasks, jobs, parallel_min_seconds)
    else:
        scored = _run_tasks(tasks, jobs, parallel_min_seconds)

    _refuse_labels_above_ignore(scored, ignore_label, truth)
    found = {int(k) for case in scored for k in case.scores} if given is None else set()
    keys, groups, display = _class_layout(labels, regions, found, names)
    if not keys:
        raise DataError(f"{truth}: every mask is all background; nothing to score",
                        hint="pass --labels to score classes anyway")
    results = []
    offset = 0
    for pairs, pred, run_name in zip(runs, preds, unique_run_names(preds)):
        cases = scored[offset:offset + len(pairs)]
        offset += len(pairs)
        results.append(_assemble(cases, pairs, kind, keys, groups, display, list(metrics), keep_empty,
                                 tolerance_mm, sp, pred, truth, run_name))
        results[-1].summary["ignore_label"] = ignore_label  # recorded: the scores exclude those voxels
    return results


def evaluate(pred: Path, truth: Path, **options: Any) -> EvalResult:
    """Score every matched case of one prediction folder; see :func:`evaluate_runs`."""
    return evaluate_runs([pred], truth, **options)[0]


def _assemble(cases: list[CaseScores], pairs: list[CasePair], kind: str, keys: list[str],
              groups: dict[str, list[int]], display: dict[str, str], metrics: list[str], keep_empty: bool,
              tolerance_mm: float, spacing: Sequence[float] | None, pred: Path, truth: Path,
              run_name: str) -> EvalResult:
    """One run's result: a row per case and class (absent classes filled in) and its summary."""
    rows: list[dict[str, object]] = []
    counts: dict[str, list[tuple[int, int]]] = {display[k]: [] for k in keys}
    for case in cases:
        for key in keys:
            values = case.scores.get(key) or _absent_scores(metrics, keep_empty)
            rows.append({"case": case.name, "class": display[key], "label": "+".join(map(str, groups[key])), **values})
            counts[display[key]].append(case.counts.get(key, (0, 0)))
    classes = [display[k] for k in keys]
    spacings = {case.name: case.spacing for case in cases}
    summary = summarise(rows, classes, metrics, counts, tolerance_mm=tolerance_mm, keep_empty=keep_empty,
                        kind=kind, spacing_given=spacing, spacings=list(spacings.values()))
    summary = {"run": str(pred), "reference": str(truth), **summary}
    return EvalResult(rows, summary, metrics, classes, [c.name for c in cases], pairs, kind,
                      {display[k]: groups[k] for k in keys}, spacings, run_name)
