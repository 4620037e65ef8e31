"""``unet compare``, the figures: validation curves and, for the cases where the variants differ most, a case grid.

``curves.png``: validation Dice (and training loss) per epoch, mean over seeds with a min-max
band. ``overlays/CASE.png``: one column per variant (the first seed's run), the whole case and a
zoom on where the variants disagree most with the reference, drawn with the overlays of ``unet eval``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.atomic import atomic_write_with
from unetcli.evaluation.overlays import draw_case_view, read_case_view
from unetcli.evaluation.summary import EvalResult
from unetcli.workflows.compare.study import Study
from unetcli.workflows.compare.report import METRIC_TITLES, REPORT_METRICS, StudyScores, metric_digits

N_OVERLAY_CASES = 3


def write_curves(plan: Study, out: Path, histories: dict[str, list[list[dict[str, Any]]]]) -> Path:
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


def render_case_grid(case: str, results: dict[str, EvalResult], image_dir: Path | None, path: Path,
                     seed: int) -> Path:
    """One column per variant (the run of ``seed``): the whole case, then a zoom on the window where the
    variants disagree most with the reference; reference contours green, predictions magenta."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    view = read_case_view(case, list(results.values()), image_dir)
    disagreement = sum(p ^ t for masks in view.predictions for p, t in zip(masks, view.reference))
    r0, r1, c0, c1 = _zoom_box(np.asarray(disagreement))
    height, width = view.image.shape
    panel = 3.6  # inches per column
    ratios = [height * view.aspect / width, (r1 - r0) * view.aspect / (c1 - c0)]
    fig = Figure(figsize=(len(results) * panel, panel * sum(ratios) + 1.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(results), squeeze=False, gridspec_kw={"height_ratios": ratios})
    for j, (variant, result) in enumerate(results.items()):
        whole, zoom = axes[0, j], axes[1, j]
        draw_case_view(whole, view, j, linewidth=0.8, legend=j == len(results) - 1)
        draw_case_view(zoom, view, j, linewidth=1.5)
        whole.add_patch(Rectangle((c0 - 0.5, r0 - 0.5), c1 - c0, r1 - r0, fill=False, edgecolor="yellow", linewidth=1))
        zoom.set_xlim(c0 - 0.5, c1 - 0.5)
        zoom.set_ylim((r1 - 0.5, r0 - 0.5) if view.origin == "upper" else (r0 - 0.5, r1 - 0.5))
        i = result.cases.index(case)
        scores = ", ".join(f"{METRIC_TITLES[m]} {result.foreground_values(m)[i]:.{metric_digits(m)}f}" for m in REPORT_METRICS)
        whole.set_title(f"{variant}\n{scores}", fontsize=9)
        for ax in (whole, zoom):
            ax.set_axis_off()
    where = "" if view.slice_index is None else f", slice {view.slice_index} (last axis)"
    fig.suptitle(f"{case} (seed {seed}{where}); bottom row: the yellow box enlarged", fontsize=10)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    return path


def write_case_grids(plan: Study, out: Path, scores: StudyScores) -> list[str]:
    """``overlays/CASE.png`` for the cases where the variants differ most; returns those cases."""
    cases = pick_overlay_cases(scores.averaged)
    (out / "overlays").mkdir(exist_ok=True)
    first_seed = {v: scores.per_run[v][plan.seeds[0]] for v in scores.averaged}
    for case in cases:
        render_case_grid(case, first_seed, plan.data.test_images, out / "overlays" / f"{case}.png", plan.seeds[0])
    return cases
