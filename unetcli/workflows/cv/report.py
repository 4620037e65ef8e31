"""The cross-validation table: per class the pooled out-of-fold Dice with its 95 % CI, and per fold."""

from __future__ import annotations

from rich.table import Table

from unetcli.workflows.cv.runner import CVResult


def cv_table(result: CVResult) -> Table:
    classes = [c for c in result.pooled if c != "mean"] + ["mean"]
    table = Table(title=f"cross-validation: out-of-fold Dice over {len(result.oof.cases) if result.oof else 0} cases")
    table.add_column("")
    for cls in classes:
        table.add_column("foreground mean" if cls == "mean" else cls, justify="right")
    table.add_row("all folds (95 % CI)", *(
        f"{result.pooled[c]['mean']:.3f} ({result.pooled[c]['ci_low']:.3f}-{result.pooled[c]['ci_high']:.3f})" for c in classes))
    for fold in result.folds:
        table.add_row(f"fold {fold['fold']} ({fold['cases']} cases)", *(f"{fold['dice'][c]:.3f}" for c in classes))
    if result.postprocessing:
        after = result.postprocessing["mean_dice_after"]
        table.caption = (f"postprocessing chosen: {result.postprocessing['choice']} "
                         f"(out-of-fold mean Dice {result.postprocessing['mean_dice_before']:.4f} -> {after:.4f})")
    return table
