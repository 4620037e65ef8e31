"""Decisions made on out-of-fold predictions: per-fold and pooled figures with bootstrap CIs, and
whether keeping the largest connected component helps (nnU-Net's postprocessing step)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.data.image_io import is_volume, load_volume, write_label_volume
from unetcli.data.png import read_png_mask, write_png_mask
from unetcli.evaluation.scoring import evaluate
from unetcli.evaluation.stats import bootstrap_indices, bootstrap_mean_ci
from unetcli.evaluation.summary import EvalResult
from unetcli.inference.postprocessing import Postprocessing, keep_largest
from unetcli.workflows.cv.splits import Fold

TOLERANCE = 1e-4
"""A class counts as worse when its mean Dice drops by more than this."""


def class_dice(result: EvalResult, cases: list[str] | None = None) -> dict[str, float]:
    """Mean Dice per class (over ``cases``, default all), NaN-aware, plus ``mean`` over classes."""
    wanted = None if cases is None else set(cases)
    keep = [i for i, c in enumerate(result.cases) if wanted is None or c in wanted]
    out = {cls: float(np.nanmean(result.values("dice", cls)[keep])) for cls in result.classes}
    out["mean"] = float(np.nanmean(list(out.values())))
    return out


def pooled_with_ci(result: EvalResult) -> dict[str, dict[str, float]]:
    """Per class (and the foreground mean) over all out-of-fold cases: mean and a 95 % bootstrap CI."""
    indices = bootstrap_indices(len(result.cases))
    rows = {cls: result.values("dice", cls) for cls in result.classes}
    rows["mean"] = result.foreground_values("dice")
    out = {}
    for cls, values in rows.items():
        mean, lo, hi, n = bootstrap_mean_ci(values, indices)
        out[cls] = {"mean": mean, "ci_low": lo, "ci_high": hi, "cases": n}
    return out


def fold_summaries(result: EvalResult, splits: list[Fold]) -> list[dict[str, Any]]:
    return [{"fold": k, "cases": len(fold["val"]), "dice": class_dice(result, fold["val"])}
            for k, fold in enumerate(splits)]


def _postprocess_folder(src: Path, dst: Path, values: list[int], spec: Postprocessing) -> None:
    """Apply ``spec`` (class indices) to every label file of ``src`` (label ``values``) into ``dst``."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    classes = [values[c] for c in spec.classes]
    for path in sorted(src.iterdir()):
        if is_volume(path):
            volume = load_volume(path)  # the fold predictions: written by predict, in the data's own format
            labels = keep_largest(np.asarray(volume.data), spec.foreground, classes)
            write_label_volume(labels, volume.affine, volume.header, dst / path.name)
        elif path.suffix.lower() == ".png":
            write_png_mask(keep_largest(read_png_mask(path), spec.foreground, classes), dst / path.name)


def _better(candidate: dict[str, float], base: dict[str, float]) -> bool:
    classes = [k for k in base if k != "mean"]
    return candidate["mean"] > base["mean"] + TOLERANCE and all(
        not candidate[c] < base[c] - TOLERANCE for c in classes if np.isfinite(base[c]))


def choose_postprocessing(oof: Path, truth: Path, work: Path, baseline: EvalResult, meta: dict[str, Any],
                          options: dict[str, Any]) -> dict[str, Any]:
    """Keep the largest connected component of all foreground, then of each class, where that raises
    the out-of-fold mean Dice and makes no class worse; returns the choice and every trial's Dice."""
    values = [int(v) for v in meta["label_values"]]
    best, chosen = class_dice(baseline), Postprocessing()
    trials: dict[str, dict[str, float]] = {"none": best}
    candidates = [Postprocessing(foreground=True)] + [Postprocessing(classes=[c]) for c in range(1, len(values))]
    for candidate in candidates:
        spec = Postprocessing(chosen.foreground or candidate.foreground, chosen.classes + candidate.classes)
        name = "foreground" if candidate.foreground else f"class {candidate.classes[0]}"
        _postprocess_folder(oof, work / name.replace(" ", "_"), values, spec)
        scores = class_dice(evaluate(work / name.replace(" ", "_"), truth, **options))
        trials[name] = scores
        if _better(scores, best):
            best, chosen = scores, spec
    shutil.rmtree(work, ignore_errors=True)
    return {"choice": chosen.to_dict(), "trials": trials, "mean_dice_before": trials["none"]["mean"],
            "mean_dice_after": best["mean"]}
