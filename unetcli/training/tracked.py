"""What a training run sends to its experiment trackers (:mod:`unetcli.tracking`): the resolved
config and plan as parameters, the loss / learning rate / throughput every few iterations (from
:meth:`Trainer._train_epoch`), each epoch's record, a validation overlay every few epochs, and at
the end the best figures, the run folder and ``best.pt``. Under torchrun rank 0 alone tracks."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import yaml

from unetcli.config import config_to_dict
from unetcli.inference.sliding_window import sliding_window_predict
from unetcli.tracking import RunInfo, RunTracking, current_group
from unetcli.tracking.images import overlay_rgb
from unetcli.training.run_folder import is_main_process


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def run_params(trainer: Any) -> dict[str, Any]:
    """The resolved config (dotted keys), the plan configuration used (``plan.*``) and the run's facts."""
    params = _flatten(config_to_dict(trainer.cfg))
    plan_file = trainer.out / "plans.yaml"
    if plan_file.is_file():
        plan = yaml.safe_load(plan_file.read_text(encoding="utf-8")) or {}
        used = plan.get("used")
        params.update({"plan.used": used, "plan.source": plan.get("source")})
        params.update(_flatten((plan.get("configurations") or {}).get(used) or {}, "plan."))
    p = trainer.parts
    params.update({"run_dir": str(trainer.out.resolve()), "data_dir": str(trainer.data_dir), "train_cases": len(p.train_names),
                   "val_cases": len(p.val_names), "precision": trainer.precision, "device": str(trainer.device)})
    return params


@contextlib.contextmanager
def run_tracking(trainer: Any) -> Iterator[RunTracking]:
    """The run's trackers for the loop (none: a no-op), finished with the final figures and ``best.pt``."""
    t = trainer.cfg.train
    if not t.trackers or not is_main_process():
        yield RunTracking()
        return
    group = current_group()
    info = RunInfo(trainer.out, f"{group[0]}-{trainer.out.name}" if group else trainer.out.name, trainer.data_dir.name,
                   job="fold" if group else "train", group=group[0] if group else None, parents=group[1] if group else {},
                   resume_step=trainer.state.iteration if trainer.resume is not None else None)
    # A new run (also one --overwrite'd into an old folder) starts new tracked runs; a resumed one continues its own.
    tracking = RunTracking.open(t.trackers, info, run_params(trainer), t.track_interval, t.batch_size or 1,
                                fresh=trainer.resume is None)
    try:
        yield tracking
    except BaseException:
        tracking.finish(ok=False)
        raise
    s = trainer.state
    tracking.finish({"best_val_dice": s.best_dice, "best_epoch": s.best_epoch, "epochs": s.epoch, "iterations": s.iteration,
                     "run_dir": str(trainer.out.resolve())}, trainer.out / "checkpoints" / "best.pt")


def track_epoch(trainer: Any, record: dict[str, Any]) -> None:
    """The epoch's record, and every ``train.track_image_epochs`` epochs (and the last) a validation overlay."""
    tracking: RunTracking = trainer.tracking
    if not tracking.active:
        return
    tracking.epoch(record)
    every = trainer.cfg.train.track_image_epochs
    if every and (record["epoch"] % every == 0 or trainer._finished()):
        began = time.perf_counter()
        rgb = validation_overlay(trainer)
        tracking.seconds += time.perf_counter() - began  # part of what tracking costs
        if rgb is not None:
            tracking.image("val/overlay", rgb, int(record["iteration"]))
        tracking.restart_window()


def validation_overlay(trainer: Any) -> np.ndarray | None:
    """The first validation case predicted now; 3D: its axial slice (last axis) with the most reference foreground."""
    p, d = trainer.parts, trainer.dataset
    case = next((c for c in d.cases if c.name in p.val_names[:1] and c.label is not None), None)
    if case is None:
        return None
    p.model.eval()
    try:
        pred = sliding_window_predict(
            p.model, case.image, p.patch, d.num_classes, overlap=trainer.cfg.infer.overlap,
            window_batch_size=trainer.cfg.infer.windows_per_batch(d.spatial_dims), gaussian=trainer.cfg.infer.gaussian,
            margin=p.model.margin, device=trainer.device, precision=trainer.precision, output="labels",
            activation="sigmoid" if d.regions is not None else "softmax").numpy()
    finally:
        p.model.train()
    image, label = np.asarray(case.image[0]), np.asarray(case.label)
    if d.spatial_dims == 3:
        k = int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(0)))
        image, label, pred = image[..., k], label[..., k], pred[..., k]
    return overlay_rgb(image, label, pred, scale=max(1, 256 // max(image.shape)))
