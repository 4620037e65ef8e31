"""``unet eval``: pair predictions with references, score every case and class, write reports.

Inputs
------
PRED and TRUTH are folders (or single files) of PNG masks or of NIfTI label maps
(``.nii.gz`` / ``.nii``); files are paired by stem (``nifti_stem`` for NIfTI), and every
unmatched file is listed in one error. A TRUTH folder in nnU-Net layout (``labelsTr``,
``labelsTs``) is just a folder of label files. NIfTI pairs must have the same shape and affine
(``np.allclose``, atol 1e-4); the voxel spacing is taken from the reference's affine (column
norms, i.e. the voxel size along each array axis, in the array's own ``(X, Y, Z)`` order).
PNG masks have no spacing: ``spacing`` (``--spacing ROW,COL``) or 1 (pixel units). Binary
0/255 PNG masks are read as 0/1, as in training.

Outputs (written atomically)
----------------------------
- ``metrics.csv``: long form, one row per case, class and metric: ``case, class, label, metric,
  value``; ``label`` is the label value, or ``1+2+3`` for a region; NaN is an empty cell.
- ``summary.json``: per class and metric ``{mean, std, median, n}`` (``std`` is the population
  standard deviation, ``n`` the number of cases that entered the mean); per class
  ``cases_absent_in_both``, ``cases_one_mask_empty`` (split into ``cases_prediction_empty`` and
  ``cases_reference_empty``); ``foreground_mean`` (per metric, the mean over classes of the
  class means); the ``conventions`` used; the spacings met.

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

Cases are scored in worker processes (``jobs``), each reading its own pair of files.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from unetcli.atomic import atomic_write_text
from unetcli.data.nifti import AFFINE_ATOL, _affine_diff, _voxel_sizes, is_nifti, nifti_stem, read_label
from unetcli.data.png import PNG_SUFFIX, read_png_mask
from unetcli.errors import ConfigError, DataError, UnetCliError
from unetcli.evaluation.metrics import METRIC_NAMES, case_metrics

log = logging.getLogger("unetcli")

DEFAULT_TABLE_METRICS = ("dice", "hd95", "assd", "nsd")
DISTANCE_METRICS = ("hd", "hd95", "assd")
PERFECT_VALUES = {"dice": 1.0, "iou": 1.0, "precision": 1.0, "recall": 1.0, "nsd": 1.0,
                  "volume_difference": 0.0, "hd": 0.0, "hd95": 0.0, "assd": 0.0}
"""What ``keep_empty`` assigns to a class absent from both masks."""

# How worker processes start (see _start_method). Measured on this project's 2-core machine,
# starting a 2-worker pool and getting a first result: fork 0.07 s; forkserver 5-6 s and spawn
# 7-9 s when the main script imports torch (both re-import the main module in every worker),
# about 1 s from the `unet` command. One 160x160x128 case with 3 classes takes about 1 s.
PARALLEL_MIN_SECONDS = 1.0
"""Use worker processes only when the remaining cases are estimated to take longer than this."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class CasePair:
    name: str
    pred: Path
    truth: Path


@dataclass
class CaseScores:
    """What one worker returns for one case."""

    name: str
    scores: dict[str, dict[str, float]]  # class key -> metric -> value
    counts: dict[str, tuple[int, int]]  # class key -> (prediction voxels, reference voxels)
    spacing: tuple[float, ...] | None
    shape: tuple[int, ...]


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


# --------------------------------------------------------------------------- file discovery


def read_label_map(path: Path) -> np.ndarray:
    """A PNG mask as class indices; binary 0/255 masks become 0/1 (as in training)."""
    labels = read_png_mask(path)
    values = np.unique(labels)
    if 255 in values and set(values.tolist()) <= {0, 255}:
        labels = (labels == 255).astype(np.int64)
    return labels


def _stem(path: Path) -> str:
    return nifti_stem(path) if is_nifti(path) else path.stem


def _suffix(path: Path) -> str:
    return path.name[len(_stem(path)):]


def _files(path: Path) -> tuple[str, dict[str, Path]]:
    """``(kind, {stem: file})`` for a file or a folder of PNG masks or NIfTI label maps."""
    if path.is_file():
        if is_nifti(path):
            return "nifti", {nifti_stem(path): path}
        if path.suffix.lower() == PNG_SUFFIX:
            return "png", {path.stem: path}
        raise DataError(f"{path}: not a .png, .nii or .nii.gz file")
    if not path.is_dir():
        raise DataError(f"{path}: not found", hint="pass a folder (or file) of PNG masks or NIfTI label maps")
    visible = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    niftis = {nifti_stem(p): p for p in visible if is_nifti(p)}
    pngs = {p.stem: p for p in visible if p.suffix.lower() == PNG_SUFFIX}
    if niftis and pngs:
        raise DataError(f"{path}: holds both .png masks and NIfTI files", hint="keep one format per folder")
    if not niftis and not pngs:
        raise DataError(f"{path}: no .png masks or .nii/.nii.gz label maps found")
    return ("nifti", niftis) if niftis else ("png", pngs)


def find_cases(pred: Path, truth: Path) -> tuple[str, list[CasePair]]:
    """``(kind, pairs)``: prediction and reference files paired by stem, sorted by case name.

    A single file on one side is paired with the file of the same stem on the other; two files
    are paired whatever their names. Raises one ``DataError`` listing every unmatched file.
    """
    pred_kind, preds = _files(pred)
    truth_kind, truths = _files(truth)
    if pred_kind != truth_kind:
        raise DataError(f"{pred}: predictions are {pred_kind.upper()} but references {truth} are {truth_kind.upper()}",
                        hint="evaluate PNG against PNG and NIfTI against NIfTI")
    if pred.is_file() and truth.is_file():
        return truth_kind, [CasePair(next(iter(truths)), pred, truth)]
    if pred.is_file():
        truths = {s: truths[s] for s in preds if s in truths} or truths
    elif truth.is_file():
        preds = {s: preds[s] for s in truths if s in preds} or preds
    problems = [f"{preds[s]}: no reference named {s}{_suffix(preds[s])} in {truth}" for s in sorted(set(preds) - set(truths))]
    problems += [f"{truths[s]}: no prediction named {s}{_suffix(truths[s])} in {pred}" for s in sorted(set(truths) - set(preds))]
    if problems:
        raise DataError.from_problems(problems, hint="predictions and references are paired by file name")
    return truth_kind, [CasePair(s, preds[s], truths[s]) for s in sorted(truths)]


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


def _nifti_affine(path: Path) -> np.ndarray:
    import nibabel as nib

    try:
        return np.asarray(nib.load(str(path)).affine, dtype=np.float64)
    except Exception as exc:  # noqa: BLE001 - read_label accepted the file; any failure here is the file's
        raise DataError(f"{path}: cannot read the NIfTI header ({type(exc).__name__}: {exc})") from exc


def read_pair(pair: CasePair, kind: str, spacing: Sequence[float] | None = None
              ) -> tuple[np.ndarray, np.ndarray, tuple[float, ...] | None]:
    """``(prediction, reference, spacing)``: two integer label maps of the same shape.

    NIfTI: shape and affine must agree (DataError naming both files); the spacing is the
    reference's voxel size per array axis unless ``spacing`` is given. PNG: ``spacing`` or None.
    """
    if kind == "nifti":
        truth = read_label(pair.truth)
        pred = read_label(pair.pred)
        if pred.shape != truth.shape:
            raise DataError(f"{pair.pred}: shape {pred.shape} differs from reference {pair.truth}'s {truth.shape}",
                            hint="predictions must be on the reference's voxel grid")
        a_pred, a_truth = _nifti_affine(pair.pred), _nifti_affine(pair.truth)
        if not np.allclose(a_pred, a_truth, atol=AFFINE_ATOL):
            raise DataError(f"{pair.pred}: affine differs from reference {pair.truth}'s ({_affine_diff(a_pred, a_truth)})",
                            hint="predictions must be on the reference's voxel grid (same origin, spacing, orientation)")
        used = tuple(float(s) for s in spacing) if spacing else _voxel_sizes(a_truth)
        return pred, truth, used
    pred, truth = read_label_map(pair.pred), read_label_map(pair.truth)
    if pred.shape != truth.shape:
        raise DataError(f"{pair.pred}: size {pred.shape[::-1]} differs from reference {pair.truth}'s "
                        f"{truth.shape[::-1]} (W x H)", hint="predict at the reference's size")
    return pred, truth, (tuple(float(s) for s in spacing) if spacing else None)


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
    if spacing is not None and len(spacing) != pred.ndim:
        raise ConfigError(f"--spacing has {len(spacing)} value(s) but {task.pair.truth} has {pred.ndim} axes",
                          hint="give one spacing per axis (PNG: ROW,COL; NIfTI: X,Y,Z)")
    c_pred, c_truth = _label_counts(pred), _label_counts(truth)
    groups = task.groups
    if groups is None:
        groups = {str(v): [v] for v in sorted((set(c_pred) | set(c_truth)) - {0})}
    scores = case_metrics(pred, truth, groups, spacing=spacing, tolerance_mm=task.tolerance_mm,
                          metrics=task.metrics) if groups else {}
    counts = {key: (sum(c_pred.get(v, 0) for v in vals), sum(c_truth.get(v, 0) for v in vals))
              for key, vals in groups.items()}
    if task.keep_empty:
        for key, (n_pred, n_truth) in counts.items():
            if n_pred == 0 and n_truth == 0:
                scores[key] = _absent_scores(task.metrics, True)
    return CaseScores(task.pair.name, scores, counts, spacing, tuple(pred.shape))


def _score_task(task: _Task) -> tuple[str, Any]:
    """Worker entry point: a result, or a project error as plain data (it crosses a process)."""
    try:
        return "ok", score_case(task)
    except UnetCliError as exc:
        return "error", (type(exc).__name__, exc.message, exc.hint)


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


def _run_tasks(tasks: list[_Task], jobs: int, parallel_min_seconds: float,
               on_done: Callable[[], None] | None = None) -> list[CaseScores]:
    """Score every task; the first in this process (its time decides whether a pool pays off)."""
    outcomes: list[tuple[str, Any]] = []
    if not tasks:
        return []
    start = time.perf_counter()
    outcomes.append(_score_task(tasks[0]))
    if on_done:
        on_done()
    rest = tasks[1:]
    first_seconds = time.perf_counter() - start
    jobs = max(1, min(jobs, len(rest)))
    if jobs > 1 and first_seconds * len(rest) >= parallel_min_seconds:
        method = _start_method()
        context = multiprocessing.get_context(method)
        if method == "forkserver":
            context.set_forkserver_preload([__name__])  # numpy, scipy, nibabel imported once, in the server
        try:
            with ProcessPoolExecutor(jobs, mp_context=context) as pool:
                for outcome in pool.map(_score_task, rest, chunksize=1):
                    outcomes.append(outcome)
                    if on_done:
                        on_done()
        except BrokenProcessPool as exc:
            raise UnetCliError(f"an evaluation worker process died ({exc})",
                               hint="out of memory? run again with fewer --jobs (e.g. --jobs 1)") from exc
    else:
        for task in rest:
            outcomes.append(_score_task(task))
            if on_done:
                on_done()
    errors = [value for status, value in outcomes if status == "error"]
    if errors:
        messages = list(dict.fromkeys(message for _, message, _ in errors))  # one line per distinct problem
        hints = [hint for _, _, hint in errors if hint]
        error = DataError.from_problems(messages, hint=hints[0] if hints else None)
        if {kind for kind, _, _ in errors} == {"ConfigError"}:
            raise ConfigError(error.message, error.hint)
        raise error
    return [value for _, value in outcomes]


# --------------------------------------------------------------------------- class names


def _names_from_mapping(labels: object) -> dict[int, str]:
    """nnU-Net ``{"name": index}`` or Decathlon ``{"index": "name"}`` -> ``{index: name}``.

    nnU-Net region entries (``"whole_tumour": [1, 2, 3]``) are skipped.
    """
    out: dict[int, str] = {}
    if not isinstance(labels, dict):
        return out
    for key, value in labels.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, int):
            out[value] = str(key)
        elif isinstance(value, str) and str(key).strip().lstrip("-").isdigit():
            out[int(key)] = value
    return out


def dataset_label_names(truth: Path) -> dict[int, str] | None:
    """Class names from a ``dataset.json`` in TRUTH (its folder for a file) or its parent folder."""
    folder = truth if truth.is_dir() else truth.parent
    for candidate in (folder / "dataset.json", folder.parent / "dataset.json"):
        if candidate.is_file():
            try:
                meta = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                log.warning("%s: ignored, not readable JSON (%s)", candidate, exc)
                return None
            names = _names_from_mapping(meta.get("labels") if isinstance(meta, dict) else None)
            if names:
                return names
            log.warning("%s: no usable 'labels' entry; classes are named by their label values", candidate)
            return None
    return None


def checkpoint_label_names(run: Path) -> dict[int, str]:
    """Class names stored in a run's checkpoint (``metadata["label_names"]``), keyed by the label
    value written in prediction files (``label_values``) and by class index."""
    from unetcli.errors import CheckpointError
    from unetcli.training.checkpoint import load_checkpoint, resolve_checkpoint

    meta = load_checkpoint(resolve_checkpoint(run))["metadata"]
    names = meta.get("label_names") if isinstance(meta, dict) else None
    if not isinstance(names, (list, tuple)) or not names:
        raise CheckpointError(f"{run}: the checkpoint stores no class names", hint="pass --label-names instead")
    out = {i: str(n) for i, n in enumerate(names)}
    values = meta.get("label_values")
    if isinstance(values, (list, tuple)) and len(values) == len(names):
        for value, name in zip(values, names):
            if isinstance(value, int) and not isinstance(value, bool):
                out[value] = str(name)
    return out


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


def evaluate_runs(preds: Sequence[Path], truth: Path, labels: Sequence[int] | None = None,
                  label_names: Sequence[str] | Mapping[int, str] | None = None,
                  regions: Mapping[str, Sequence[int]] | None = None, spacing: Sequence[float] | None = None,
                  tolerance_mm: float = 1.0, metrics: Sequence[str] = METRIC_NAMES, keep_empty: bool = False,
                  jobs: int = 1, parallel_min_seconds: float = PARALLEL_MIN_SECONDS,
                  progress: bool = False) -> list[EvalResult]:
    """Score one or more prediction folders against ``truth``; all runs get the same classes.

    ``labels`` default: every non-zero label found in any file (of any run). ``label_names``:
    names in label order, or ``{label: name}``. ``regions``: ``{name: [labels]}`` scored as
    the union of the labels. ``jobs``: worker processes (the cases of all runs are shared out).
    """
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ConfigError(f"--tolerance {tolerance_mm} must be a finite number >= 0 (mm)")
    if spacing is not None and (not spacing or any(not math.isfinite(s) or s <= 0 for s in spacing)):
        raise ConfigError(f"--spacing {','.join(map(str, spacing))}: every value must be a number > 0 (mm)")
    if labels is not None and (not labels or any(int(v) < 0 for v in labels)):
        raise ConfigError("--labels must list label values >= 0, e.g. --labels 1,2")
    for region, values in (regions or {}).items():
        if not values or any(int(v) < 0 for v in values):
            raise ConfigError(f"--region {region}: needs label values >= 0, e.g. --region {region}=1,2,3")
    names = dict(enumerate(label_names)) if isinstance(label_names, Sequence) else (dict(label_names) if label_names else None)

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
    kind = kinds.pop()

    given = None
    if labels is not None or regions:
        _, given, _ = _class_layout(labels, regions, [], names)
    sp = None
    if spacing is not None:
        sp = tuple(float(s) for s in spacing)
        axes = 2 if kind == "png" else 3
        if len(sp) == 1:
            sp = sp * axes
        if len(sp) != axes:
            raise ConfigError(f"--spacing {','.join(map(str, spacing))}: {kind.upper()} masks have {axes} axes, "
                              f"give {axes} values (or one for all)",
                              hint="PNG: --spacing ROW,COL; NIfTI: --spacing X,Y,Z (overrides the header)")
    tasks = [_Task(pair, kind, given, sp, float(tolerance_mm), tuple(metrics), keep_empty)
             for _, pairs in runs for pair in pairs]

    if progress:
        from rich.console import Console
        from rich.progress import Progress

        # auto_refresh=False: no refresh thread, so worker processes can still be forked safely.
        with Progress(console=Console(stderr=True), transient=True, auto_refresh=False) as bar:
            task_id = bar.add_task("scoring cases", total=len(tasks))

            def advance() -> None:
                bar.advance(task_id)
                bar.refresh()

            scored = _run_tasks(tasks, jobs, parallel_min_seconds, advance)
    else:
        scored = _run_tasks(tasks, jobs, parallel_min_seconds)

    found = {int(k) for case in scored for k in case.scores} if given is None else set()
    keys, groups, display = _class_layout(labels, regions, found, names)
    if not keys:
        raise DataError(f"{truth}: every mask is all background; nothing to score",
                        hint="pass --labels to score classes anyway")
    results = []
    offset = 0
    run_names = unique_run_names(preds)
    for (_, pairs), pred, run_name in zip(runs, preds, run_names):
        cases = scored[offset:offset + len(pairs)]
        offset += len(pairs)
        results.append(_assemble(cases, pairs, kind, keys, groups, display, list(metrics), keep_empty,
                                 tolerance_mm, sp, pred, truth, run_name))
    return results


def evaluate(pred: Path, truth: Path, **options: Any) -> EvalResult:
    """Score every matched case of one prediction folder; see :func:`evaluate_runs`."""
    return evaluate_runs([pred], truth, **options)[0]


def unique_run_names(preds: Sequence[Path]) -> list[str]:
    """Run names: each prediction folder's name; equal names get their parent folder's name
    prepended (``runA/preds`` -> ``runA_preds``), then a counter if still equal."""
    base = [p.resolve().name if p.resolve().is_dir() else _stem(p.resolve()) for p in preds]
    names = []
    for path, name in zip(preds, base):
        if base.count(name) > 1 and path.resolve().parent.name:
            name = f"{path.resolve().parent.name}_{name}"
        candidate, k = name, 2
        while candidate in names:
            candidate, k = f"{name}_{k}", k + 1
        names.append(candidate)
    return names


def _assemble(cases: list[CaseScores], pairs: list[CasePair], kind: str, keys: list[str],
              groups: dict[str, list[int]], display: dict[str, str], metrics: list[str], keep_empty: bool,
              tolerance_mm: float, spacing: Sequence[float] | None, pred: Path, truth: Path,
              run_name: str) -> EvalResult:
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


def summarise(rows: list[dict[str, object]], classes: list[str], metrics: list[str],
              counts: Mapping[str, Sequence[tuple[int, int]]] | None = None, tolerance_mm: float = 1.0,
              keep_empty: bool = False, kind: str = "png", spacing_given: Sequence[float] | None = None,
              spacings: Sequence[tuple[float, ...] | None] = ()) -> dict[str, object]:
    """Mean, std, median, n per class and metric; empty-mask counts; foreground mean; conventions."""
    per_class: dict[str, dict[str, object]] = {}
    for cls in classes:
        cls_rows = [r for r in rows if r["class"] == cls]
        entry: dict[str, object] = {"label": cls_rows[0]["label"] if cls_rows else ""}
        entry.update({m: _stats(float(r[m]) for r in cls_rows) for m in metrics})  # type: ignore[arg-type]
        pairs = list(counts.get(cls, [])) if counts else []
        entry["cases_absent_in_both"] = sum(1 for p, t in pairs if p == 0 and t == 0)
        entry["cases_prediction_empty"] = sum(1 for p, t in pairs if p == 0 and t > 0)
        entry["cases_reference_empty"] = sum(1 for p, t in pairs if p > 0 and t == 0)
        entry["cases_one_mask_empty"] = entry["cases_prediction_empty"] + entry["cases_reference_empty"]  # type: ignore[operator]
        per_class[cls] = entry
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
    csv_path, json_path = out_dir / "metrics.csv", out_dir / "summary.json"
    atomic_write_text(csv_path, metrics_csv_text(result))
    atomic_write_text(json_path, json.dumps(json_safe(result.summary), indent=2) + "\n")
    return csv_path, json_path


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


# --------------------------------------------------------------------------- the command


@dataclass
class EvalOutcome:
    results: list[EvalResult]
    comparison: Any = None  # unetcli.evaluation.compare.Comparison in compare mode
    written: list[Path] = field(default_factory=list)


def _check_outputs(out: Path, inputs: Sequence[Path], names: Sequence[str], overlays: Path | None,
                   overwrite: bool) -> None:
    from unetcli.errors import OutputError

    for target in [out] + ([overlays] if overlays else []):
        resolved = target.resolve()
        for inp in inputs:
            folder = inp.resolve() if inp.is_dir() else inp.resolve().parent
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


def run_evaluation(preds: Sequence[Path], truth: Path, out: Path, *, overlays: Path | None = None,
                   worst: int = 5, image_dir: Path | None = None, overwrite: bool = False,
                   **options: Any) -> EvalOutcome:
    """``unet eval``: score, write the reports (and in compare mode the comparison), draw overlays.

    One prediction folder: ``out/metrics.csv`` + ``out/summary.json``. Several (compare mode):
    ``out/RUN/metrics.csv`` + ``out/RUN/summary.json`` per run, ``out/comparison.csv``,
    ``out/comparison.png`` and ``out/summary.json`` (runs, conventions, comparison). Overlays go to
    ``overlays/CASE.png`` (compare mode: ``overlays/RUN/CASE.png``). ``options`` go to
    :func:`evaluate_runs`.
    """
    if worst < 1:
        raise ConfigError(f"--worst {worst} must be at least 1")
    if image_dir is not None and not image_dir.is_dir():
        raise DataError(f"{image_dir}: image folder not found", hint="--image-dir takes the folder of the cases' images")
    compare = len(preds) > 1
    run_names = unique_run_names(preds)
    names = ["summary.json", "comparison.csv", "comparison.png", *run_names] if compare else ["metrics.csv", "summary.json"]
    _check_outputs(out, [*preds, truth] + ([image_dir] if image_dir else []), names, overlays, overwrite)
    results = evaluate_runs(preds, truth, **options)
    outcome = EvalOutcome(results)
    if not compare:
        outcome.written.extend(write_reports(results[0], out))
    else:
        from unetcli.evaluation.compare import compare_results, write_comparison

        for result in results:
            outcome.written.extend(write_reports(result, out / result.name))
        comparison = compare_results(results)
        outcome.comparison = comparison
        outcome.written.extend(write_comparison(comparison, out))
        summary = {"reference": str(truth), "runs": {r.name: {"predictions": r.summary["run"], "reports": r.name}
                                                     for r in results},
                   "cases": results[0].summary["cases"], "conventions": results[0].summary["conventions"],
                   "comparison": comparison.as_dict()}
        json_path = out / "summary.json"
        atomic_write_text(json_path, json.dumps(json_safe(summary), indent=2) + "\n")
        outcome.written.append(json_path)
    if overlays is not None:
        from unetcli.evaluation.overlays import write_overlays

        for result in results:
            outcome.written.extend(write_overlays(result, overlays / result.name if compare else overlays,
                                                  worst, image_dir))
    return outcome
