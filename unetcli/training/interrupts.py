"""Stopping cleanly: Ctrl-C / SIGTERM become a flag the loop checks, and a NaN/Inf becomes an error
that says where, why, what was kept and how to continue."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

from unetcli.errors import Interrupted, TrainingError


class StopRequest:
    """Turns SIGINT (Ctrl-C) and SIGTERM into a flag the loop checks between iterations, so that it
    can save a checkpoint and stop cleanly. A second Ctrl-C stops at once (the last checkpoint on
    disk stays intact: checkpoints are written atomically). Handlers are installed only in the
    main thread and the previous ones are restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        with contextlib.suppress(OSError):
            os.write(2, f"\n{signal.Signals(signum).name}: saving a checkpoint, then stopping "
                        "(Ctrl-C again stops at once)\n".encode())

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def interrupted(signum: int, out: Path, epoch: int, iteration: int, epoch_iteration: int) -> Interrupted:
    """The error that ends a run stopped by ``signum`` after its checkpoint was saved."""
    where = f"at the end of epoch {epoch}" if epoch_iteration == 0 else f"in epoch {epoch + 1} after iteration {iteration}"
    return Interrupted(
        f"training interrupted by {signal.Signals(signum).name} {where}; checkpoint saved to {out / 'checkpoints' / 'last.pt'}; "
        f"resume with: unet train --resume {shlex.quote(str(out))}", signum)


def numerical_fault(at: int, ipe: int, lr_at: float, precision: str, base_lr: float, out: Path,
                    last_saved: tuple[int, int] | None, loss: bool) -> TrainingError:
    """The error for a loss (``loss``) or weights that became NaN/Inf at iteration ``at``."""
    what = "the loss became NaN or infinite" if loss else "the weights became NaN or infinite"
    epoch = (at - 1) // ipe + 1
    ckpt = out / "checkpoints" / "last.pt"
    if last_saved is None:
        kept = "no checkpoint had been saved yet"
    else:
        kept = f"the last good checkpoint {ckpt} (epoch {last_saved[0]}, iteration {last_saved[1]}) is kept"
    if precision != "fp32":
        cause = f"likely cause: overflow in {precision} arithmetic or a learning rate too high ({lr_at:.3g} at that step)"
    else:
        cause = f"likely cause: a learning rate too high ({lr_at:.3g} at that step) for this model and data"
    lower = f"a lower --lr (e.g. --lr {base_lr / 10:.3g})"
    if precision == "fp32":
        hint = f"train again with {lower}"
    else:
        hint = f"train again with --precision fp32 or {lower}"
        if last_saved:
            hint += f", or continue from the last good checkpoint in fp32: unet train --resume {shlex.quote(str(out))} --precision fp32"
    return TrainingError(f"{what} at iteration {at} (epoch {epoch}); training stopped and {kept}; {cause}", hint=hint)
