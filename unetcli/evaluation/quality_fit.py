"""How well the quality estimates of ``unet predict`` track the real Dice, and the fit of the
predicted Dice on a cross-validation's out-of-fold cases.

:func:`signal_correlations` gives Spearman's rho between each signal column of ``predictions.csv``
(and the predicted Dice) and the real per-case Dice (the mean over the scored classes), for
``unet eval``. :func:`fit_quality_model` fits the predicted Dice of
:class:`~unetcli.inference.quality.QualityModel` on out-of-fold cases (``unet cv``): least squares
of the real Dice on the softmax Dice and the out-of-distribution excess, shrunk towards the
unfitted model as if it were backed by :data:`PRIOR_CASES` cases, so that a handful of folds'
cases cannot turn it upside down; the flag threshold is the 5th percentile of the fitted
predictions on those cases.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from rich.table import Table

from unetcli.inference.quality import UNFITTED, QualityModel
from unetcli.inference.quality_report import SIGNAL_COLUMNS

MIN_CASES = 5
"""Fewer out-of-fold cases than this: the unfitted model is kept."""
PRIOR_CASES = 5.0
PRIOR_SPREAD = {"softmax_dice": 0.02, "ood_excess": 2.0}
"""The spread of each feature the prior's pseudo-cases are assumed to have."""
FLAG_PERCENTILE = 5.0


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, int]:
    """Spearman's rho over the pairs where both are numbers, and their number (NaN below 3 pairs
    or when either side is constant)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    n = int(keep.sum())
    if n < 3 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return math.nan, n
    from scipy.stats import spearmanr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a[keep], b[keep])[0]), n


def _number(text: object) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def signal_correlations(rows: Sequence[Mapping[str, object]], dice: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per signal column (and ``predicted_dice``): Spearman's rho with the real Dice of the same
    cases, and the number of cases it rests on. Uncertainty and distance signals should come out
    negative, the softmax Dice, margin and predicted Dice positive."""
    joined = [r for r in rows if str(r.get("case")) in dice]
    real = [dice[str(r["case"])] for r in joined]
    out = {}
    for column in ["predicted_dice", *SIGNAL_COLUMNS]:
        rho, n = spearman([_number(r.get(column)) for r in joined], real)
        out[column] = {"spearman_rho": rho, "cases": n}
    return out


def fit_quality_model(softmax_dice: Sequence[float], ood_excess: Sequence[float], dice: Sequence[float]) -> QualityModel:
    """The predicted-Dice model fitted on out-of-fold cases (see the module's docstring)."""
    s, e, y = (np.asarray(v, dtype=np.float64) for v in (softmax_dice, ood_excess, dice))
    keep = np.isfinite(s) & np.isfinite(e) & np.isfinite(y)
    n = int(keep.sum())
    if n < MIN_CASES:
        return QualityModel(details={"cases": n, "note": f"fewer than {MIN_CASES} out-of-fold cases: unfitted model kept"})
    s, e, y = s[keep], e[keep], y[keep]
    design = np.stack([np.ones(n), s, e], axis=1)
    prior = np.array([UNFITTED.intercept, UNFITTED.slope, UNFITTED.ood_slope])
    weight = np.diag([0.0, PRIOR_CASES * PRIOR_SPREAD["softmax_dice"] ** 2, PRIOR_CASES * PRIOR_SPREAD["ood_excess"] ** 2])
    beta = np.linalg.solve(design.T @ design + weight, design.T @ y + weight @ prior)
    if beta[1] < 0 or beta[2] > 0:  # more confidence never lowers the estimate, more distance never raises it
        beta[1], beta[2] = max(beta[1], 0.0), min(beta[2], 0.0)
        beta[0] = float(np.mean(y - beta[1] * s - beta[2] * e))
    model = QualityModel(float(beta[0]), float(beta[1]), float(beta[2]), fitted=True)
    predicted = np.array([model.predict(a, b) for a, b in zip(s, e)])
    model.threshold = float(np.percentile(predicted, FLAG_PERCENTILE))
    model.details = {"cases": n, "residual_sd": float(np.std(y - predicted)),
                     "spearman_rho_out_of_fold": spearman(predicted, y)[0],
                     "threshold_rule": f"{FLAG_PERCENTILE:g}th percentile of the predicted Dice of the out-of-fold cases"}
    return model


def quality_table(quality: Mapping[str, object]) -> Table:
    """``unet eval``: Spearman's rho of each quality signal with the real Dice, for the terminal."""
    table = Table(title=f"quality estimates vs real Dice ({quality['cases_joined']} case(s) of predictions.csv)")
    table.add_column("signal", no_wrap=True)
    table.add_column("Spearman ρ", justify="right")
    table.add_column("cases", justify="right")
    for name, entry in quality["spearman"].items():  # type: ignore[attr-defined]
        rho = entry["spearman_rho"]
        if entry["cases"] == 0:
            continue
        label = "[bold]predicted_dice[/bold]" if name == "predicted_dice" else name
        table.add_row(label, "–" if math.isnan(rho) else f"{rho:+.2f}", str(entry["cases"]))
    table.caption = "should be positive for predicted_dice, softmax_dice and margin; negative for the others"
    return table
