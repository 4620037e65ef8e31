"""Experiment tracking: TensorBoard, MLflow and Weights & Biases, each optional.

``unet train --log-to tensorboard,mlflow,wandb`` (config key ``train.trackers``) sends a run's
config and plan, its loss, learning rate and throughput every ``train.track_interval`` iterations,
its per-epoch validation Dice, a validation overlay every ``train.track_image_epochs`` epochs, its
final figures and (MLflow, W&B) its ``best.pt`` to the trackers asked for. The trackers' run ids are
kept in ``RUN/trackers.json`` so that ``unet train --resume`` continues the same tracked runs.

A tracker that fails (server gone, disk full) is reported once and dropped for the rest of the run;
training never stops for it. This package imports nothing from training, inference or evaluation:
the trainer calls it (:class:`RunTracking`) with plain numbers and arrays.
"""

from unetcli.tracking.session import (TRACKERS, RunInfo, RunTracking, cv_group, current_group, log_cv_summary,
                                      log_evaluation, parse_trackers, require_installed)

__all__ = ["TRACKERS", "RunInfo", "RunTracking", "cv_group", "current_group", "log_cv_summary", "log_evaluation",
           "parse_trackers", "require_installed"]
