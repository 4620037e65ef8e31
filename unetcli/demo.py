"""``unet demo``: train -> predict -> eval on the real 2D MRI slices shipped with the package."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from unetcli.config import RunConfig
from unetcli.errors import DataError, OutputError
from unetcli.evaluation.report import EvalResult, evaluate, write_reports
from unetcli.inference.predict import predict
from unetcli.training.trainer import TrainResult, train

log = logging.getLogger("unetcli")

DEMO_2D = "mni_tissue_2d"

DEMO_OVERRIDES: dict[str, object] = {
    # A smaller network and a short schedule keep the demo within a few minutes on 2 CPU cores;
    # flags and --set given to `unet demo` still override these.
    "model.features": [16, 32, 64, 128],
    "train.epochs": 8,
    "train.iterations_per_epoch": 40,
}


@dataclass
class DemoResult:
    train: TrainResult
    evaluation: EvalResult
    run_dir: Path


def demo_data_dir(name: str = DEMO_2D) -> Path:
    path = Path(str(resources.files("unetcli") / "demo_data" / name))
    if not (path / "train").is_dir():
        raise DataError(f"{path}: the demo data is missing from this installation", hint="reinstall unetcli")
    return path


def run_demo(cfg: RunConfig, out: Path, overwrite: bool = False, progress: bool = True) -> DemoResult:
    """Train on ``train/``, predict ``test/images`` into ``out/predictions``, score into ``out/eval``."""
    data = demo_data_dir()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: demo folder already exists and is not empty", hint="pass --out NEW_FOLDER or --overwrite")
    names = json.loads((data / "labels.json").read_text(encoding="utf-8"))
    cfg.data.label_names = [names[str(i)] for i in range(len(names))]
    log.info("demo: %s (MNI ICBM 2009a T1 axial slices; held-out slices z=90..118)", data)
    trained = train(data / "train", cfg, out, overwrite=overwrite, progress=progress)
    predict(out, data / "test" / "images", out / "predictions", device_name=cfg.train.device,
            overwrite=overwrite, progress=progress)
    result = evaluate(out / "predictions", data / "test" / "masks", label_names=cfg.data.label_names)
    write_reports(result, out / "eval")
    return DemoResult(trained, result, out)
