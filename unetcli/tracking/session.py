"""The trackers of one run, every call guarded: a failing tracker warns once and is dropped.

Per-iteration figures are taken every ``every`` iterations; the loss stays on the device in
between (one host sync per log, not per step).
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import importlib
import json
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unetcli.atomic import atomic_write_text
from unetcli.errors import ConfigError
from unetcli.tracking.backends import BACKENDS, MODULES, Backend, RunInfo

log = logging.getLogger("unetcli")

TRACKERS = tuple(BACKENDS)
IDS_FILE = "trackers.json"
"""In a run folder (and a cross-validation folder): per tracker, the ids that continue its tracked run."""


def parse_trackers(value: str | Sequence[str] | None) -> list[str]:
    """``"tensorboard,mlflow"`` (or a list) -> the tracker names, checked; ``none`` or empty -> []."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = [str(n).strip().lower() for n in items if str(n).strip() and str(n).strip().lower() != "none"]
    for name in names:
        if name not in BACKENDS:
            close = difflib.get_close_matches(name, TRACKERS, n=1)
            raise ConfigError(f"--log-to '{name}' is not a tracker", hint=(f"did you mean '{close[0]}'? " if close else "")
                              + "choose from " + ", ".join(TRACKERS) + " (comma-separated)")
    return list(dict.fromkeys(names))


def require_installed(names: Iterable[str]) -> None:
    """Raise ConfigError naming the install command for the first tracker whose package is missing."""
    for name in names:
        try:
            importlib.import_module(MODULES[name])
        except ImportError as exc:
            raise ConfigError(f"--log-to {name} needs the {name} package ({exc}): pip install 'unetcli[{name}]'",
                              hint=f"install it with: pip install 'unetcli[{name}]', or leave {name} out of --log-to") from None


def _read_ids(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


class RunTracking:
    """The trackers of one run. Every method is safe to call with no trackers at all (a no-op)."""

    def __init__(self, backends: list[Backend] | None = None, every: int = 10, batch_size: int = 1) -> None:
        self.backends = backends or []
        self.every, self.batch_size = max(1, every), batch_size
        self._loss: Any = None
        self._count, self._since = 0, time.perf_counter()
        self.seconds = 0.0
        """Time spent in the trackers' calls (logged at the end: the overhead tracking adds)."""

    @property
    def active(self) -> bool:
        return bool(self.backends)

    @classmethod
    def open(cls, names: Sequence[str], info: RunInfo, params: dict[str, Any] | None = None, every: int = 10,
             batch_size: int = 1, fresh: bool = False) -> RunTracking:
        """Start (or, from ``info.run_dir/trackers.json`` unless ``fresh``, continue) a tracked run per name; record the ids."""
        require_installed(names)
        tracking = cls([], every, batch_size)
        saved, ids = ({} if fresh else _read_ids(info.run_dir)), {}
        for name in names:
            backend = BACKENDS[name]()
            started = tracking._guard(backend, "start", info, saved.get(name))
            if started is not None:
                tracking.backends.append(backend)
                ids[name] = started
        if ids:
            with contextlib.suppress(OSError):
                kept = {} if fresh else saved
                atomic_write_text(info.run_dir / IDS_FILE, json.dumps({**kept, **ids}, indent=1))
        if params:
            flat = {k: "" if v is None else str(v) for k, v in params.items()}
            for backend in list(tracking.backends):
                if not backend.resumed:  # a resumed MLflow run refuses a changed param; the first start logged them
                    tracking._guard(backend, "params", flat)
        return tracking

    def _guard(self, backend: Backend, method: str, *args: Any) -> Any:
        began = time.perf_counter()
        try:
            result = getattr(backend, method)(*args)
            return {} if result is None else result
        except Exception as exc:  # any failure of a tracker: warn once, drop it, keep training
            log.warning("tracking: %s failed in %s (%s: %s); training goes on without it", backend.name, method,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            if backend in self.backends:
                self.backends.remove(backend)
            return None
        finally:
            self.seconds += time.perf_counter() - began

    def _each(self, method: str, *args: Any, files_only: bool = False) -> None:
        for backend in list(self.backends):
            if not files_only or backend.stores_files:
                self._guard(backend, method, *args)

    # ------------------------------------------------------------------ what a run logs

    def step(self, iteration: int, loss: Any, lr: float) -> None:
        """After each training step: every ``every`` iterations, the mean loss since the last log
        (one host sync), the learning rate and the images per second."""
        if not self.backends:
            return
        self._loss = loss if self._loss is None else self._loss + loss
        self._count += 1
        if iteration % self.every:
            return
        seconds = time.perf_counter() - self._since
        values = {"train/loss": float(self._loss) / self._count, "train/lr": float(lr)}
        if seconds > 0:
            values["train/images_per_second"] = self._count * self.batch_size / seconds
        self.metrics(values, iteration)
        self.restart_window()

    def restart_window(self) -> None:
        """Start a new throughput window (after validation, which is not training time)."""
        self._loss, self._count, self._since = None, 0, time.perf_counter()

    def metrics(self, values: dict[str, Any], step: int) -> None:
        finite = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if finite:
            self._each("metrics", finite, step)

    def epoch(self, record: dict[str, Any]) -> None:
        """One epoch's record (``metrics.jsonl``): ``val_*`` as ``val/*``, the rest as ``epoch/*``, at its iteration."""
        if not self.backends:
            return
        values = {(f"val/{k[4:]}" if k.startswith("val_") else f"epoch/{k}"): v for k, v in record.items() if k != "iteration"}
        self.metrics(values, int(record["iteration"]))
        self.restart_window()

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self._each("image", tag, rgb, step)

    def finish(self, summary: dict[str, Any] | None = None, artifact: Path | None = None, ok: bool = True) -> None:
        """The final figures, ``artifact`` (stored by the trackers that keep files), then close every tracker."""
        if summary:
            self._each("summary", summary)
        if artifact is not None and artifact.is_file():
            self._each("artifact", artifact, "model", files_only=True)
        names = ", ".join(b.name for b in self.backends)
        self._each("finish", ok)
        if names:
            log.info("tracking: %.2f s in the calls to %s (start, logging, final upload)", self.seconds, names)
        self.backends = []


# --------------------------------------------------------------------------- cross-validation and eval

_GROUP: contextvars.ContextVar[tuple[str, dict[str, Any]] | None] = contextvars.ContextVar("unetcli_tracking_group", default=None)


def current_group() -> tuple[str, dict[str, Any]] | None:
    """``(name, per-tracker parent ids)`` of the cross-validation being run, if any."""
    return _GROUP.get()


def _open_group(names: Sequence[str], folder: Path, experiment: str) -> tuple[RunTracking, dict[str, Any]]:
    """The cross-validation's own tracked run (MLflow parent run); TensorBoard and W&B only group
    by name, so they start their summary run when the summary is there (:func:`log_cv_summary`)."""
    parents: dict[str, Any] = {}
    tracking = RunTracking()
    if "mlflow" in names:
        tracking = RunTracking.open(["mlflow"], RunInfo(folder, folder.name, experiment, job="cross-validation"))
        parents = _read_ids(folder)
    return tracking, parents


@contextlib.contextmanager
def cv_group(names: Sequence[str], folder: Path, experiment: str) -> Iterator[None]:
    """While running the folds of the cross-validation in ``folder``: every fold's tracked run is
    grouped under it (W&B group ``folder``'s name, MLflow child runs of one parent run)."""
    if not names:
        yield
        return
    tracking, parents = _open_group(names, folder, experiment)
    token = _GROUP.set((folder.name, parents))
    try:
        yield
    finally:
        _GROUP.reset(token)
        tracking.finish(ok=True)


def log_cv_summary(names: Sequence[str], folder: Path, experiment: str, pooled: dict[str, dict[str, float]],
                   folds: list[dict[str, Any]]) -> None:
    """The out-of-fold scores: on the MLflow parent run, a W&B run of the group, ``CV/tensorboard``."""
    if not names:
        return
    values = {f"oof/dice_{cls}": v["mean"] for cls, v in pooled.items()}
    values.update({f"oof/dice_{cls}_ci_low": v["ci_low"] for cls, v in pooled.items()})
    values.update({f"oof/dice_{cls}_ci_high": v["ci_high"] for cls, v in pooled.items()})
    rows = [[f["fold"], f["cases"], *(_plain(f["dice"].get(c)) for c in pooled)] for f in folds]
    info = RunInfo(folder, f"{folder.name}-summary", experiment, job="cross-validation", group=folder.name)
    tracking = RunTracking.open(names, info)
    tracking.metrics(values, 0)
    tracking._each("table", "folds", ["fold", "cases", *(f"dice_{c}" for c in pooled)], rows)
    tracking.finish({"cv_folder": str(folder.resolve()), **{k: v for k, v in values.items() if math.isfinite(v)}})


def log_evaluation(names: Sequence[str], out: Path, experiment: str, rows: list[dict[str, Any]],
                   means: dict[str, float]) -> None:
    """``unet eval --log-to``: a tracked run with the per-class means as metrics and every
    (case, class) row as a table; its summary files as artifacts where the tracker keeps files."""
    if not names:
        return
    tracking = RunTracking.open(names, RunInfo(out, out.name, experiment, job="eval"), fresh=True)
    tracking.metrics(means, 0)
    columns = list(rows[0]) if rows else []
    tracking._each("table", "metrics_table", columns, [[_plain(r.get(c)) for c in columns] for r in rows])
    for name in ("summary.json", "metrics.csv"):
        if (out / name).is_file():
            tracking._each("artifact", out / name, "eval", files_only=True)
    tracking.finish({"eval_folder": str(out.resolve())})


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
