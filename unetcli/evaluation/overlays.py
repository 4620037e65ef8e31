"""PNG overlays of the worst cases: the image, reference contours (green), prediction contours (magenta).

Cases are ranked by foreground Dice (per case, the mean Dice over the classes scored in it;
cases where every class is absent from both masks are not ranked). The background is the
case's image from ``image_dir`` when one matches (``NAME.png`` / ``NAME_0000.png`` or
``NAME.nii.gz`` / ``NAME_0000.nii.gz``, first channel), else the reference label map. For a
3D case the axial slice (last array axis) with the most voxels where prediction and reference
disagree on a scored class is shown (if they agree everywhere, the slice with the largest
reference area), with the X axis horizontal, Y vertical and the voxel aspect from the spacing.
Every class is drawn with its own contour, so borders between touching classes show.

:func:`read_case_view` and :func:`draw_case_view` are shared with ``unet compare``'s per-variant
case grids (:mod:`unetcli.workflows.compare.figures`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.atomic import atomic_write_with
from unetcli.data.nifti import read_image
from unetcli.data.png import read_png_image
from unetcli.errors import UnetCliError
from unetcli.evaluation.cases import CasePair, read_pair
from unetcli.evaluation.summary import EvalResult

log = logging.getLogger("unetcli")

REFERENCE_COLOUR = "#00e000"
PREDICTION_COLOUR = "#ff00ff"


def worst_cases(result: EvalResult, n: int) -> list[tuple[str, float]]:
    """The ``n`` cases with the lowest foreground Dice (ties by name), as ``(case, dice)``."""
    dice = result.foreground_values("dice")
    ranked = sorted((float(d), c) for c, d in zip(result.cases, dice) if np.isfinite(d))
    return [(c, d) for d, c in ranked[: max(n, 0)]]


def _find_image(image_dir: Path, name: str, kind: str) -> Path | None:
    suffixes = (".png",) if kind == "png" else (".nii.gz", ".nii")
    for stem in (name, f"{name}_0000"):
        for suffix in suffixes:
            candidate = image_dir / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_background(image_dir: Path | None, pair: CasePair, kind: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The case's image as float (first channel) on the label grid, or None (with a warning why)."""
    if image_dir is None:
        return None
    path = _find_image(image_dir, pair.name, kind)
    if path is None:
        log.warning("overlay %s: no image %s(_0000) in %s; drawing on the reference labels", pair.name, pair.name, image_dir)
        return None
    try:
        if kind == "png":
            image = read_png_image(path)
            image = image.mean(axis=0) if image.shape[0] == 3 else image[0]
        else:
            image = read_image([path])[0][0]
    except UnetCliError as exc:
        log.warning("overlay %s: %s; drawing on the reference labels", pair.name, exc.message)
        return None
    if image.shape != shape:
        log.warning("overlay %s: image %s has shape %s, the labels %s; drawing on the reference labels",
                    pair.name, path, image.shape, shape)
        return None
    return image


def _pick_slice(pred_masks: list[np.ndarray], truth_masks: list[np.ndarray]) -> int:
    """Axial (last-axis) slice with the most disagreement, else the largest reference area, else the middle."""
    disagreement = sum(np.count_nonzero(p ^ t, axis=(0, 1)) for p, t in zip(pred_masks, truth_masks))
    if np.any(disagreement):
        return int(np.argmax(disagreement))
    area = sum(np.count_nonzero(t, axis=(0, 1)) for t in truth_masks)
    if np.any(area):
        return int(np.argmax(area))
    return truth_masks[0].shape[-1] // 2


def _normalise(image: np.ndarray) -> np.ndarray:
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return np.zeros_like(image, dtype=np.float32)
    low, high = np.percentile(finite, [1, 99])
    if high <= low:
        high = low + 1.0
    return np.clip((image - low) / (high - low), 0, 1).astype(np.float32)


@dataclass
class CaseView:
    """One case as an overlay shows it: a grey image in [0, 1] and, per class, the reference's mask and
    every prediction's mask, all 2D, on the same slice and in display orientation."""

    image: np.ndarray
    reference: list[np.ndarray]
    predictions: list[list[np.ndarray]]  # per result read, per class
    origin: str  # imshow origin: "upper" (PNG rows) or "lower" (a 3D slice, Y up)
    aspect: float  # row height / column width, from the spacing
    slice_index: int | None = None  # 3D: the axial (last-axis) slice shown
    depth: int = 1  # 3D: the number of axial slices


def _case_pair(result: EvalResult, case: str) -> CasePair:
    return next(p for p in result.pairs if p.name == case)


def read_case_view(case: str, results: Sequence[EvalResult], image_dir: Path | None = None) -> CaseView:
    """``case`` as scored in each of ``results`` (runs on the same references), ready to draw.

    The background is the case's image from ``image_dir``, else the reference labels; a 3D case
    shows the slice where the predictions disagree most with the reference (see the module text).
    """
    predictions: list[list[np.ndarray]] = []
    for result in results:
        pred, truth, spacing = read_pair(_case_pair(result, case), result.kind, result.spacings.get(case))
        groups = list(result.groups.values())
        predictions.append([np.isin(pred, g) for g in groups])
        reference = [np.isin(truth, g) for g in groups]
    background = _read_background(image_dir, _case_pair(results[0], case), results[0].kind, truth.shape)
    if background is None:
        background = truth.astype(np.float32)
    if truth.ndim == 2:
        return CaseView(_normalise(background), reference, predictions, "upper",
                        spacing[0] / spacing[1] if spacing else 1.0)
    z = _pick_slice([m for masks in predictions for m in masks], reference * len(predictions))
    # (X, Y) slice shown with X horizontal, Y vertical: transpose, origin lower.
    return CaseView(_normalise(background[:, :, z].T), [m[:, :, z].T for m in reference],
                    [[m[:, :, z].T for m in masks] for masks in predictions], "lower",
                    spacing[1] / spacing[0] if spacing else 1.0, z, truth.shape[-1])


def _draw_contours(ax: Any, masks: list[np.ndarray], colour: str, width: float) -> None:
    """Each mask's outline; padded so that a region touching the image border is closed."""
    limits = ax.get_xlim(), ax.get_ylim()
    for mask in masks:
        if mask.any():
            rows, cols = mask.shape
            ax.contour(np.arange(-1, cols + 1), np.arange(-1, rows + 1), np.pad(mask, 1).astype(np.float32),
                       levels=[0.5], colors=[colour], linewidths=width)
    ax.set_xlim(*limits[0])  # the padding must not widen the view beyond the image
    ax.set_ylim(*limits[1])


def draw_case_view(ax: Any, view: CaseView, prediction: int = 0, linewidth: float = 1.0, legend: bool = False) -> None:
    """On the matplotlib axes ``ax``: the image, the reference's contours (green) and those of
    prediction number ``prediction`` (magenta); with ``legend``, a legend of the two colours."""
    from matplotlib.lines import Line2D

    ax.imshow(view.image, cmap="gray", origin=view.origin, aspect=view.aspect, interpolation="nearest")
    _draw_contours(ax, view.reference, REFERENCE_COLOUR, linewidth)
    _draw_contours(ax, view.predictions[prediction], PREDICTION_COLOUR, linewidth)
    if legend:
        ax.legend(handles=[Line2D([], [], color=REFERENCE_COLOUR, label="reference"),
                           Line2D([], [], color=PREDICTION_COLOUR, label="prediction")],
                  loc="lower right", fontsize=7, framealpha=0.6)


def render_overlay(result: EvalResult, case: str, dice: float, path: Path, image_dir: Path | None = None) -> Path:
    """Write one overlay PNG for ``case`` of ``result`` to ``path`` (atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    view = read_case_view(case, [result], image_dir)
    height, width = view.image.shape
    scale = 6.0 / max(height * view.aspect, width)
    fig = Figure(figsize=(max(width * scale, 3.0), height * view.aspect * scale + 0.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    draw_case_view(ax, view, linewidth=1.0, legend=True)
    ax.set_axis_off()
    where = "" if view.slice_index is None else f", slice {view.slice_index} of {view.depth} (last axis)"
    dice_text = "–" if math.isnan(dice) else f"{dice:.3f}"
    ax.set_title(f"{case}: foreground Dice {dice_text}{where}", fontsize=9)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    return path


def write_overlays(result: EvalResult, out_dir: Path, worst: int = 5, image_dir: Path | None = None) -> list[Path]:
    """Overlays ``out_dir/CASE.png`` for the ``worst`` cases by foreground Dice; returns the paths."""
    return [render_overlay(result, case, dice, out_dir / f"{case}.png", image_dir)
            for case, dice in worst_cases(result, worst)]
