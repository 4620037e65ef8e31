"""``unet demo``: train -> predict -> eval on real MRI shipped with the package (2D slices or 3D blocks)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from unetcli.config import RunConfig
from unetcli.errors import DataError, OutputError
from unetcli.evaluation.scoring import evaluate
from unetcli.evaluation.summary import EvalResult, write_reports
from unetcli.inference.predict import predict
from unetcli.training.trainer import TrainResult, train

log = logging.getLogger("unetcli")


DEMO_SECONDS = {"2d": 150.0, "3d": 150.0}
"""Each demo trains for its epochs or this many seconds, whichever ends first (the learning-rate
schedule follows whichever ends first), so that a slow CPU shortens the demo instead of stretching
it: either demo takes about 3 minutes at most in all."""

DEMO_3D_SPACING = [4.0, 4.0, 4.0]
"""The 3D demo trains at 4 mm (its 2 mm scans are resampled; masks come back at 2 mm): a step costs
about a sixth of one at 2 mm, so 1,000 steps fit in its 150 s on 2 cores, where at 2 mm 150 s gave
389 steps and held-out Dice 0.42 (``scripts/bench_demo.py --3d``, docs/benchmarks.md)."""


@dataclass(frozen=True)
class DemoSpec:
    folder: str
    train: str
    test_images: str
    test_labels: str
    description: str
    overrides: dict[str, object] = field(default_factory=dict)
    """Demo defaults (a short budget for 2 CPU cores); --config, --set and flags still win."""


DEMOS = {
    "2d": DemoSpec(
        "mni_tissue_2d", "train", "test/images", "test/masks",
        "MNI ICBM 2009a T1 axial slices, 3 tissue classes; held-out slices z=90..118",
        {"model.features": [16, 32, 64, 128], "train.epochs": 8, "train.iterations_per_epoch": 40,
         "train.time_limit": DEMO_SECONDS["2d"]},
    ),
    "3d": DemoSpec(
        "colin27_lobes_3d", ".", "imagesTs", "labelsTs",
        "Colin27 T1 at 2 mm cut into 4 blocks, 8 AAL lobe classes, trained at 4 mm on 3 blocks; held-out block colin_rh_sup",
        # Three training blocks are too few to hold one out for validation: validate on them.
        {"model.features": [16, 32, 64, 128], "train.epochs": 40, "train.iterations_per_epoch": 25,
         "data.val_fraction": 0.0, "data.target_spacing": DEMO_3D_SPACING, "train.lr": 0.01,
         "train.time_limit": DEMO_SECONDS["3d"]},
    ),
}


@dataclass
class DemoResult:
    train: TrainResult
    evaluation: EvalResult
    run_dir: Path


def demo_data_dir(kind: str = "2d") -> Path:
    path = Path(str(resources.files("unetcli") / "demo_data" / DEMOS[kind].folder))
    if not (path / DEMOS[kind].train).is_dir():
        raise DataError(f"{path}: the demo data is missing from this installation", hint="reinstall unetcli")
    return path


def demo_label_names(kind: str = "2d") -> list[str] | None:
    """The class names in the demo data's ``labels.json`` (``{"0": name, ...}``), in index order; None without one."""
    path = demo_data_dir(kind) / "labels.json"
    if not path.is_file():
        return None
    names = json.loads(path.read_text(encoding="utf-8"))
    return [names[str(i)] for i in range(len(names))]


def run_demo(cfg: RunConfig, out: Path, kind: str = "2d", overwrite: bool = False, progress: bool = True) -> DemoResult:
    """Train, predict the held-out images into ``out/predictions``, score them into ``out/eval``."""
    spec, data = DEMOS[kind], demo_data_dir(kind)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"{out}: demo folder already exists and is not empty", hint="pass --out NEW_FOLDER or --overwrite")
    names = demo_label_names(kind)
    if names is not None:
        cfg.data.label_names = names
    log.info("demo: %s (%s)", data, spec.description)
    trained = train(data / spec.train, cfg, out, overwrite=overwrite, progress=progress)
    predict(out, data / spec.test_images, out / "predictions", device_name=cfg.train.device,
            overwrite=overwrite, progress=progress)
    result = evaluate(out / "predictions", data / spec.test_labels, label_names=cfg.data.label_names)
    write_reports(result, out / "eval")
    return DemoResult(trained, result, out)
