"""The learning-rate schedule: a plain function of the iteration, stored in checkpoints as a plan.

The rate at iteration ``i`` (0-based step index) is ``train.lr * plan.factor(i)``. A plan is a
list of segments; the first is the run's original schedule (linear warm-up, then poly (0.9),
cosine or constant). Because the factor depends on nothing but the iteration and the plan, a
resumed run uses exactly the rates an uninterrupted run would have used.

When a run is given a different number of epochs after it started (``unet train --resume RUN
--epochs N``), :meth:`LRPlan.replan` appends a segment that starts at the rate of the last step
taken and decays with the same shape to 0 over the remaining iterations: the rate never jumps
back up. (While still in warm-up, the warm-up simply continues into the longer schedule, which
is what a run planned with N epochs from the start would have done.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


def decay(schedule: str, progress: float) -> float:
    """The shape of the schedule after warm-up at ``progress`` in [0, 1]: 1 -> 0 (poly, cosine) or 1."""
    progress = min(1.0, max(0.0, progress))
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def lr_factor(schedule: str, iteration: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier at ``iteration`` of ``total``: linear warm-up, then poly (0.9) or cosine."""
    if warmup and iteration < warmup:
        return (iteration + 1) / warmup
    return decay(schedule, (iteration - warmup) / max(1, total - warmup))


@dataclass
class LRPlan:
    """Segments ``{start, end, start_factor, warmup}``; iteration ``i`` uses the last segment with
    ``start <= i``: ``start_factor * lr_factor(schedule, i - start, end - start, warmup)``."""

    schedule: str
    segments: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def new(cls, schedule: str, total: int, warmup: int) -> "LRPlan":
        return cls(schedule, [{"start": 0, "end": int(total), "start_factor": 1.0, "warmup": int(warmup)}])

    @property
    def total(self) -> int:
        return int(self.segments[-1]["end"])

    def factor(self, iteration: int) -> float:
        segment = self.segments[0]
        for candidate in self.segments:
            if candidate["start"] <= iteration:
                segment = candidate
        start, end = segment["start"], segment["end"]
        return segment["start_factor"] * lr_factor(self.schedule, iteration - start, end - start, segment["warmup"])

    def replan(self, iteration: int, new_total: int) -> None:
        """Re-plan the iterations from ``iteration`` on so that the schedule ends at ``new_total``."""
        if new_total == self.total:
            return
        if new_total <= iteration:
            raise ValueError(f"cannot end the schedule at iteration {new_total}: {iteration} iterations are done")
        last = self.segments[-1]
        if last["warmup"] and iteration - last["start"] < last["warmup"] < new_total - last["start"]:
            # Still warming up: the ramp does not depend on the total, so stretching is seamless.
            last["end"] = int(new_total)
            return
        start_factor = self.factor(iteration - 1) if iteration > 0 else self.factor(0)
        self.segments = [s for s in self.segments if s["start"] < iteration]
        self.segments.append({"start": int(iteration), "end": int(new_total), "start_factor": float(start_factor), "warmup": 0})

    def apply(self, optimizer: torch.optim.Optimizer, base_lr: float, iteration: int) -> float:
        """Set every parameter group's rate for step ``iteration``; returns it."""
        lr = base_lr * self.factor(iteration)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "segments": [dict(s) for s in self.segments]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LRPlan":
        return cls(str(state["schedule"]), [
            {"start": int(s["start"]), "end": int(s["end"]), "start_factor": float(s["start_factor"]), "warmup": int(s["warmup"])}
            for s in state["segments"]
        ])
