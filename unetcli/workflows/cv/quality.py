"""The quality model of a cross-validation: every fold's ``oof/predictions.csv`` (the quality rows
of its held-out cases, written when the fold predicted them) joined with their real Dice, the
predicted-Dice fit on them and the training reference of all folds together, in
``CV/quality_model.json`` (read by ``unet predict CV``); the joined rows in ``CV/oof/predictions.csv``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from unetcli.atomic import atomic_write_text
from unetcli.checkpoint import load_checkpoint
from unetcli.evaluation.quality_fit import fit_quality_model, signal_correlations
from unetcli.evaluation.summary import EvalResult, write_json
from unetcli.inference.quality import excess
from unetcli.inference.quality_context import QUALITY_MODEL_FILE
from unetcli.inference.quality_report import CSV_NAME, read_rows, rows_csv_text
from unetcli.inference.quality_signals import merge_references


def _number(text: object) -> float:
    try:
        return float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def fit_cv_quality(out: Path, folds: int, oof: EvalResult) -> dict[str, Any] | None:
    """Write ``CV/oof/predictions.csv`` and ``CV/quality_model.json``; returns the model's record
    (None when the folds predicted without quality rows: then ``unet predict CV`` uses the unfitted one)."""
    rows = [row for k in range(folds) for row in read_rows(out / f"fold_{k}" / "oof" / CSV_NAME)]
    if not rows:
        return None
    atomic_write_text(out / "oof" / CSV_NAME, rows_csv_text(sorted(rows, key=lambda r: r["case"])))
    dice = {case: float(value) for case, value in zip(oof.cases, oof.foreground_values("dice"))}
    joined = [r for r in rows if r["case"] in dice]
    model = fit_quality_model([_number(r.get("softmax_dice")) for r in joined],
                              [excess(_number(r.get("ood_distance"))) for r in joined], [dice[r["case"]] for r in joined])
    references = [load_checkpoint(out / f"fold_{k}" / "checkpoints" / "last.pt")["metadata"].get("quality_reference")
                  for k in range(folds)]
    record = {"model": model.to_dict(), "reference": merge_references(references),
              "out_of_fold_spearman": signal_correlations(joined, dice)}
    write_json(out / QUALITY_MODEL_FILE, record)
    return record["model"]
