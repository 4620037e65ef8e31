"""The learning-rate schedule: a plain function of the iteration, stored in checkpoints as its segments.

The rate at iteration ``i`` (0-based step index) is ``train.lr * schedule.factor(i)``. A schedule is a
list of segments; the first is the run's original schedule (linear warm-up, then poly (0.9),
cosine or constant). Because the factor depends on nothing but the iteration and the schedule, a
resumed run uses exactly the rates an uninterrupted run would have used.

When a run is given a different number of epochs after it started (``unet train --resume RUN
--epochs N``), :meth:`LRSchedule.reschedule` appends a segment that starts at the rate of the last step
taken and decays with the same shape to 0 over the remaining iterations: the rate never jumps
back up. (While still in warm-up, the warm-up simply continues into the longer schedule, which
is what a run planned with N epochs from the start would have done.)

A run with a time budget (``unet train --time 45m``) uses the clock ``seconds``: the segments span
elapsed training seconds (validation included) instead of iterations, so a 10-minute and a
10-hour run both complete their decay; the warm-up stays a ramp over the first
``train.warmup_iterations`` steps (or the first 1/30 of the budget, if that ends sooner),
multiplied in. Such a run is not bit-reproducible (its rates
depend on the machine's speed); iteration-budget runs are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


TIMED_WARMUP_SHARE = 1 / 30
"""A time-budget run warms up over at most this share of its budget (50 of the default 1,500 iterations)."""


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
class LRSchedule:
    """Segments ``{start, end, start_factor, warmup}``; iteration ``i`` uses the last segment with
    ``start <= i``: ``start_factor * lr_factor(schedule, i - start, end - start, warmup)``."""

    schedule: str
    segments: list[dict[str, Any]] = field(default_factory=list)
    clock: str = "iterations"
    """``iterations``: segments span iterations. ``seconds``: they span elapsed seconds and also
    iterations (``start_iteration`` .. ``end_iteration``, for ``--epochs`` given beside ``--time``):
    the progress is whichever is further along, so the decay ends with whichever budget ends first;
    :attr:`warmup` iterations ramp the rate up first."""
    warmup: int = 0
    """Warm-up iterations of a ``seconds`` schedule (an ``iterations`` schedule keeps them in its first segment)."""

    @classmethod
    def new(cls, schedule: str, total: int, warmup: int, seconds: float | None = None) -> "LRSchedule":
        """A schedule over ``total`` iterations, or over ``seconds`` of training when that is given."""
        if seconds is not None:
            return cls(schedule, [{"start": 0.0, "end": float(seconds), "start_iteration": 0, "end_iteration": int(total),
                                   "start_factor": 1.0, "warmup": 0}], "seconds", int(warmup))
        return cls(schedule, [{"start": 0, "end": int(total), "start_factor": 1.0, "warmup": int(warmup)}])

    @property
    def timed(self) -> bool:
        return self.clock == "seconds"

    @property
    def total(self) -> int:
        return int(self.segments[-1]["end"])

    def factor(self, iteration: int, elapsed: float = 0.0) -> float:
        """The multiplier at step ``iteration`` (0-based), ``elapsed`` seconds into a ``seconds`` schedule."""
        if not self.timed:
            return self._segment_factor(iteration)
        ramp = 1.0
        if self.warmup:  # whichever ends first: the warm-up steps, or the first 1/30 of the budget
            ramp = min(1.0, max((iteration + 1) / self.warmup, elapsed / (TIMED_WARMUP_SHARE * self.segments[0]["end"])))
        return ramp * self._timed_factor(iteration, elapsed)

    def _segment_at(self, position: float) -> dict[str, Any]:
        segment = self.segments[0]
        for candidate in self.segments:
            if candidate["start"] <= position:
                segment = candidate
        return segment

    def _segment_factor(self, iteration: int) -> float:
        segment = self._segment_at(iteration)
        start, end = segment["start"], segment["end"]
        return segment["start_factor"] * lr_factor(self.schedule, iteration - start, end - start, segment["warmup"])

    def _timed_factor(self, iteration: int, elapsed: float) -> float:
        segment = self._segment_at(elapsed)
        by_time = (elapsed - segment["start"]) / max(1e-9, segment["end"] - segment["start"])
        by_steps = (iteration - segment["start_iteration"]) / max(1, segment["end_iteration"] - segment["start_iteration"])
        return segment["start_factor"] * decay(self.schedule, max(by_time, by_steps))

    def reschedule_timed(self, iteration: int, elapsed: float, new_total: int, new_seconds: float) -> None:
        """A ``seconds`` schedule given another budget (time and/or iterations) after ``iteration`` steps and
        ``elapsed`` seconds: it decays on from the current rate, never back up."""
        last = self.segments[-1]
        if (new_seconds, new_total) == (last["end"], last["end_iteration"]):
            return
        start_factor = self._timed_factor(max(0, iteration - 1), elapsed)
        self.segments = [s for s in self.segments if s["start"] < elapsed]
        self.segments.append({"start": float(elapsed), "end": float(new_seconds), "start_iteration": int(iteration),
                              "end_iteration": int(new_total), "start_factor": float(start_factor), "warmup": 0})

    def reschedule(self, iteration: int, new_total: int) -> None:
        """Re-schedule the iterations from ``iteration`` on so that the schedule ends at ``new_total``."""
        if self.timed:
            raise ValueError("a schedule over time is extended with reschedule_timed")
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

    def apply(self, optimizer: torch.optim.Optimizer, base_lr: float, iteration: int, elapsed: float = 0.0) -> float:
        """Set every parameter group's rate for step ``iteration`` (``elapsed`` seconds in); returns it."""
        lr = base_lr * self.factor(iteration, elapsed)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule, "segments": [dict(s) for s in self.segments], "clock": self.clock, "warmup": self.warmup}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LRSchedule":
        clock = str(state.get("clock", "iterations"))  # plans saved before time budgets count iterations
        if clock == "seconds":
            segments = [{"start": float(s["start"]), "end": float(s["end"]), "start_iteration": int(s["start_iteration"]),
                         "end_iteration": int(s["end_iteration"]), "start_factor": float(s["start_factor"]), "warmup": 0}
                        for s in state["segments"]]
        else:
            segments = [{"start": int(s["start"]), "end": int(s["end"]), "start_factor": float(s["start_factor"]),
                         "warmup": int(s["warmup"])} for s in state["segments"]]
        return cls(str(state["schedule"]), segments, clock, int(state.get("warmup", 0)))
