"""Learning curves (training loss and validation Dice per epoch) as a PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from unetcli.atomic import atomic_path  # noqa: E402


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Two panels: train loss, and every ``val_dice_*`` series, against the epoch."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], marker=".")
    ax_loss.set(xlabel="epoch", ylabel="training loss (CE + Dice)", title="Loss")
    for key in [k for k in history[-1] if k.startswith("val_dice_")]:
        style = {"linewidth": 2.5, "color": "black"} if key == "val_dice_mean" else {"alpha": 0.7}
        ax_dice.plot(epochs, [r.get(key, float("nan")) for r in history], label=key.removeprefix("val_dice_"), **style)
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice", ylim=(0, 1))
    ax_dice.legend(loc="lower right", fontsize="small")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
