"""Where a run stands (:class:`TrainState`) and where a resumed run starts from (:class:`ResumePoint`).

A checkpoint holds the state at the top level (``epoch``, ``iteration``, ``best_dice``,
``best_epoch``) and under ``resume`` (position in the epoch, the running loss, the history, the
time spent); that layout is the checkpoint format of every unetcli release, so it is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unetcli.errors import CheckpointError, DataError
from unetcli.checkpoint import state_dict_problem
from unetcli.training.schedule import LRSchedule
from unetcli.training.setup import TrainComponents


@dataclass
class TrainState:
    """The counters and records of a run; everything here is saved in ``last.pt``."""

    loss_sum: torch.Tensor
    """Sum of this epoch's losses so far, on the device (no host sync per step)."""
    epoch: int = 0
    """Completed epochs."""
    iteration: int = 0
    """Completed iterations, over all epochs."""
    epoch_iteration: int = 0
    """Iterations into the current epoch."""
    best_dice: float = -1.0
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    """One record per completed epoch (what ``metrics.jsonl`` holds)."""
    elapsed_before: float = 0.0
    """Seconds trained by earlier processes of this run (a resumed run)."""
    last_saved: tuple[int, int] | None = None
    """(epoch, iteration) of the newest checkpoint on disk; not saved."""

    @classmethod
    def fresh(cls, device: torch.device) -> "TrainState":
        return cls(loss_sum=torch.zeros((), device=device))

    def to_checkpoint(self, elapsed_seconds: float, finished: bool) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "iteration": self.iteration, "best_dice": self.best_dice, "best_epoch": self.best_epoch,
            "resume": {
                "epoch_iteration": self.epoch_iteration, "loss_sum": self.loss_sum.detach().to("cpu", copy=True),
                "history": self.history, "elapsed_seconds": elapsed_seconds,
                "finished": finished,
            },
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: dict[str, Any], device: torch.device) -> "TrainState":
        resume = checkpoint["resume"]
        epoch, iteration = int(checkpoint["epoch"]), int(checkpoint["iteration"])
        return cls(
            loss_sum=resume["loss_sum"].to(device=device, dtype=torch.float32),
            epoch=epoch, iteration=iteration, epoch_iteration=int(resume["epoch_iteration"]),
            best_dice=float(checkpoint["best_dice"]), best_epoch=int(checkpoint["best_epoch"]),
            history=[dict(r) for r in resume["history"]], elapsed_before=float(resume.get("elapsed_seconds", 0.0)),
            last_saved=(epoch, iteration),
        )


@dataclass(frozen=True)
class ResumePoint:
    """A run's ``last.pt``, loaded safely, to continue from."""

    path: Path
    checkpoint: dict[str, Any]

    @property
    def split(self) -> tuple[list[str], list[str]]:
        split = self.checkpoint["resume"]["split"]
        return [str(n) for n in split["train"]], [str(n) for n in split["val"]]

    def split_for(self, case_names: list[str], data_dir: Path) -> tuple[list[str], list[str]]:
        """The run's own train/val split, after checking that ``data_dir`` (holding ``case_names``)
        still holds exactly those cases."""
        train_names, val_names = self.split
        expected, found = set(train_names) | set(val_names), set(case_names)
        missing, extra = sorted(expected - found), sorted(found - expected)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"case(s) of the run missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            if extra:
                parts.append(f"case(s) not in the run: {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}")
            raise DataError(f"{data_dir}: does not hold the cases the run was trained on ({'; '.join(parts)})",
                            hint="resume with the run's original data folder (its split is in RUN/split.json)")
        return train_names, val_names

    @property
    def data_dir(self) -> Path | None:
        stored = self.checkpoint["resume"].get("data_dir")
        return Path(stored) if stored else None

    @property
    def precision(self) -> str | None:
        return self.checkpoint["resume"].get("precision")

    def restore(self, parts: TrainComponents, device: torch.device) -> TrainState:
        """Load the weights, optimiser, sampler, LR plan and grad scaler into ``parts`` (the plan
        object is replaced) and return the run's state."""
        ckpt = self.checkpoint
        try:
            parts.model.load_state_dict(ckpt["model"])
            parts.optimizer.load_state_dict(ckpt["optimizer"])
            parts.sampler.load_state_dict(ckpt["sampler"])
            parts.schedule = LRSchedule.from_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler") and parts.scaler.is_enabled():
                parts.scaler.load_state_dict(ckpt["scaler"])
            return TrainState.from_checkpoint(ckpt, device)
        except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{self.path}: its training state does not fit the model and optimiser its config describes "
                                  f"({state_dict_problem(exc)})",
                                  hint="the checkpoint may come from another unetcli version; start a new run") from exc
