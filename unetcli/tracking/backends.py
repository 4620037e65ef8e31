"""One class per tracker, each a thin layer over the tracker's own client. They may raise anything:
:class:`~unetcli.tracking.session.RunTracking` wraps every call. The packages are imported only
when a tracker is asked for (they are optional extras)."""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RunInfo:
    """What a tracked run is called and where it belongs."""

    run_dir: Path
    name: str
    experiment: str
    """MLflow experiment / W&B project: the dataset's folder name (unless MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT say otherwise)."""
    job: str = "train"
    group: str | None = None
    """The cross-validation this run is a fold of (W&B group, MLflow parent run)."""
    parents: dict[str, Any] = field(default_factory=dict)
    """Per tracker, the group's stored ids (MLflow: the parent run's)."""
    resume_step: int | None = None
    """The iteration a resumed run continues after; ``None`` for a new run."""


class Backend:
    """The calls a tracker takes. ``start`` returns the ids that continue this run later."""

    name = ""
    stores_files = False

    def start(self, info: RunInfo, saved: dict[str, Any] | None) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def resumed(self) -> bool:
        return False

    def params(self, values: dict[str, str]) -> None: ...

    def metrics(self, values: dict[str, float], step: int) -> None: ...

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None: ...

    def artifact(self, path: Path, folder: str) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def finish(self, ok: bool) -> None: ...


class TensorBoardBackend(Backend):
    """Event files in ``RUN/tensorboard/`` (``tensorboard --logdir RUN``)."""

    name = "tensorboard"

    def start(self, info: RunInfo, saved: dict[str, Any] | None) -> dict[str, Any]:
        from torch.utils.tensorboard import SummaryWriter

        self._resumed = info.resume_step is not None
        # A resumed run drops what the interrupted one logged after its last checkpoint: those steps are trained again.
        purge = info.resume_step + 1 if info.resume_step is not None else None
        self.writer = SummaryWriter(str(info.run_dir / "tensorboard"), purge_step=purge, flush_secs=30)
        return {"logdir": str((info.run_dir / "tensorboard").resolve())}

    @property
    def resumed(self) -> bool:
        return self._resumed

    def params(self, values: dict[str, str]) -> None:
        table = "| key | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in values.items())
        self.writer.add_text("config", table, 0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.writer.add_image(tag, rgb, step, dataformats="HWC")

    def summary(self, values: dict[str, Any]) -> None:
        self.writer.add_text("summary", "".join(f"- {k}: {v}\n" for k, v in values.items()), 0)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]
        self.writer.add_text(name, "\n".join(lines), 0)

    def finish(self, ok: bool) -> None:
        self.writer.close()


def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else a file store in ``./mlruns`` (allowed explicitly: MLflow 3 asks for that)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


_MLFLOW_KEY = re.compile(r"[^\w\-. /]")


def mlflow_key(key: str) -> str:
    return _MLFLOW_KEY.sub("_", key)[:250]


class MlflowBackend(Backend):
    """A run in ``MLFLOW_TRACKING_URI`` (default ``./mlruns``), experiment named after the dataset."""

    name = "mlflow"
    stores_files = True

    def start(self, info: RunInfo, saved: dict[str, Any] | None) -> dict[str, Any]:
        if saved and str(saved.get("tracking_uri", "")).startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        uri = saved["tracking_uri"] if saved else mlflow_tracking_uri()
        self.client = MlflowClient(uri)
        self._resumed = bool(saved)
        if saved:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return dict(saved)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or info.experiment
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else self.client.create_experiment(experiment)
        tags = {"run_dir": str(info.run_dir.resolve()), "unetcli.job": info.job}
        parent = info.parents.get("mlflow") or {}
        if parent.get("run_id"):
            tags["mlflow.parentRunId"] = parent["run_id"]
        self.run_id = self.client.create_run(experiment_id, run_name=info.name, tags=tags).info.run_id
        return {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": uri}

    @property
    def resumed(self) -> bool:
        return self._resumed

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(mlflow_key(k), str(v)[:6000]) for k, v in values.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(mlflow_key(k), float(v), now, step) for k, v in values.items()])

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, rgb, key=mlflow_key(tag).replace("/", "_"), step=step)

    def artifact(self, path: Path, folder: str) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.client.log_metric(self.run_id, mlflow_key(key), float(value))
            else:
                self.client.set_tag(self.run_id, mlflow_key(key), str(value))

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """MLflow's table artifact (what ``log_table`` writes, without needing pandas)."""
        import json

        path = f"{name}.json"
        self.client.log_dict(self.run_id, {"columns": columns, "data": rows}, path)
        logged = json.loads(self.client.get_run(self.run_id).data.tags.get("mlflow.loggedArtifacts", "[]"))
        if {"path": path, "type": "table"} not in logged:
            self.client.set_tag(self.run_id, "mlflow.loggedArtifacts", json.dumps([*logged, {"path": path, "type": "table"}]))

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


class WandbBackend(Backend):
    """A W&B run in the mode the environment sets (``WANDB_MODE=offline`` needs no network), files in ``RUN/wandb/``."""

    name = "wandb"
    stores_files = True

    def start(self, info: RunInfo, saved: dict[str, Any] | None) -> dict[str, Any]:
        import wandb

        self._resumed = bool(saved)
        project = saved["project"] if saved else os.environ.get("WANDB_PROJECT") or info.experiment
        self.run = wandb.init(project=project, name=info.name, dir=str(info.run_dir), id=saved["id"] if saved else None,
                              resume="allow" if saved else None, group=info.group, job_type=info.job,
                              settings=wandb.Settings(console="off", silent=True), reinit="create_new")
        return {"id": self.run.id, "project": project}

    @property
    def resumed(self) -> bool:
        return self._resumed

    def params(self, values: dict[str, str]) -> None:
        self.run.config.update(values, allow_val_change=True)

    def metrics(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def image(self, tag: str, rgb: np.ndarray, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(rgb)}, step=step)

    def artifact(self, path: Path, folder: str) -> None:
        import wandb

        artifact = wandb.Artifact(f"{folder}-{self.run.id}", type=folder)
        artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def summary(self, values: dict[str, Any]) -> None:
        self.run.summary.update(values)

    def table(self, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({name: wandb.Table(columns=columns, data=rows)})

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


BACKENDS: dict[str, type[Backend]] = {"tensorboard": TensorBoardBackend, "mlflow": MlflowBackend, "wandb": WandbBackend}
MODULES = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow.tracking", "wandb": "wandb"}
"""What must import for each tracker (torch's SummaryWriter needs the tensorboard package)."""
